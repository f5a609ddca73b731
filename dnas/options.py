"""Strict reading of option values: command-line ``KEY=VALUE`` pairs, config files, ``--set``.

A value that does not mean what its option expects is an error naming the option, the
expected type and the value: ``edge_norm=False`` is a boolean (any case), ``edge_norm=maybe``
and ``k=abc`` are refused instead of being passed on as strings. Types come from the
dataclass field (:class:`~dnas.run.SearchConfig`, :class:`~dnas.train.TrainConfig`) or from
the factory's signature (a relaxation's or a space's options: the annotation, else the type of
the default).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import types
import typing
from pathlib import Path
from typing import Any


class OptionError(ValueError):
    """An option value of the wrong type, an unknown option or an unreadable config file."""


_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def parse_scalar(text: str) -> Any:
    """``"true"``/``"False"`` → bool, ``"3"`` → 3, ``"1e-3"`` → 0.001, ``"null"``/``"none"`` →
    None, JSON lists/objects as JSON; anything else stays a string (its option's type decides
    whether a string is acceptable)."""
    s = text.strip()
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none"):
        return None
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    if s[:1] in "[{":
        try:
            return json.loads(s)
        except json.JSONDecodeError as e:
            raise OptionError(f"cannot read {text!r} as JSON: {e.msg}") from None
    return s


def key_values(items, flag: str) -> dict:
    """``["k=v", ...]`` → ``{k: parse_scalar(v)}`` (dashes in keys become underscores)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise OptionError(f"{flag} expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        if not k.strip():
            raise OptionError(f"{flag} {item!r}: the key is empty")
        out[k.strip().replace("-", "_")] = parse_scalar(v)
    return out


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def coerce(value: Any, hint: Any, name: str) -> Any:
    """``value`` as type ``hint`` (bool, int, float, str, tuples, dicts, unions, Any, a
    dataclass); raises :class:`OptionError` naming ``name`` when it is not one."""
    if hint is Any or hint is inspect.Parameter.empty:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return coerce(value, a, name)
            except OptionError:
                pass
        raise OptionError(f"{name}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise OptionError(f"{name}: expected a mapping of {hint.__name__} fields, got {value!r}")
        return dataclass_from_dict(hint, value, what=name)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise OptionError(f"{name}: expected true or false, got {value!r}")
    if hint in (int, float):
        return _number(value, hint, name)
    if hint is str:
        if isinstance(value, str):
            return value
        raise OptionError(f"{name}: expected a string, got {value!r}")
    if origin is tuple or hint is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise OptionError(f"{name}: expected a list, got {value!r}")
        if args and args[-1] is not Ellipsis and len(args) == len(value):
            return tuple(coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        elem = args[0] if args else Any
        return tuple(coerce(v, elem, f"{name}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise OptionError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _number(value: Any, kind: type, name: str):
    """``value`` as an int (integral floats accepted) or a float; booleans are no numbers."""
    expected = "an integer" if kind is int else "a number"
    if isinstance(value, str):
        try:
            value = kind(value.strip())
        except ValueError:
            raise OptionError(f"{name}: expected {expected}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(f"{name}: expected {expected}, got {value!r}")
    if kind is int and isinstance(value, float):
        if not value.is_integer():
            raise OptionError(f"{name}: expected {expected}, got {value!r}")
        return int(value)
    return kind(value)


def dataclass_from_dict(cls, data: dict, what: str = "config", ignore=()) -> Any:
    """An instance of dataclass ``cls`` from ``data``, every value checked against its field's
    type; a key that is no field (and not in ``ignore``) is an error listing the fields."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields - set(ignore))
    if unknown:
        raise OptionError(f"{what}: unknown key(s) {unknown}; the keys are {sorted(fields)}")
    return cls(**{k: coerce(v, hints[k], f"{what}.{k}" if what != "config" else k)
                  for k, v in data.items() if k in fields})


def config_to_dict(cfg) -> dict:
    """A dataclass config as plain JSON-able values (what :func:`dataclass_from_dict` reads)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def load_config_file(path: str | Path) -> dict:
    """A YAML or JSON mapping (a run's own ``config.json`` included)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise OptionError(f"cannot read the config file {str(path)!r}: {e.strerror}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 — json and yaml errors alike
        raise OptionError(f"config file {str(path)!r} is not valid {path.suffix.lstrip('.') or 'YAML'}: {e}") from None
    if not isinstance(data, dict):
        raise OptionError(f"config file {str(path)!r} must hold a mapping of options, got {type(data).__name__}")
    return data


def apply_sets(data: dict, sets) -> dict:
    """``--set a.b=v`` (repeatable): ``data["a"]["b"] = parse_scalar(v)``, on a copy."""
    data = json.loads(json.dumps(data, default=str))
    for item in sets or []:
        if "=" not in item:
            raise OptionError(f"--set expects KEY=VALUE (KEY may be dotted: hyper.w_lr=0.01), got {item!r}")
        key, v = item.split("=", 1)
        parts = [p.strip().replace("-", "_") for p in key.split(".")]
        node = data
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise OptionError(f"--set {item!r}: {p!r} is not a mapping")
            node = node[p]
        node[parts[-1]] = parse_scalar(v)
    return data


def differences(a, b, prefix: str = "") -> list[str]:
    """The dotted names of the fields in which two (nested) dataclass configs differ."""
    out = []
    for f in dataclasses.fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(va) and dataclasses.is_dataclass(vb):
            out += differences(va, vb, prefix + f.name + ".")
        elif _plain(va) != _plain(vb):
            out.append(prefix + f.name)
    return out


def _plain(v):
    return json.loads(json.dumps(v, default=str))


def coerce_options(factory, options: dict, what: str) -> dict:
    """``options`` checked against ``factory``'s signature: each value converted to its
    parameter's annotated type, or to the type of its default (a string default accepts any
    string). Parameters without either pass their value through."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return dict(options)
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # noqa: BLE001 — unresolvable annotations: fall back to the defaults
        hints = {}
    out = dict(options)
    for k, v in options.items():
        p = sig.parameters.get(k)
        if p is None:
            continue
        hint = hints.get(k, inspect.Parameter.empty)
        if hint is inspect.Parameter.empty and p.default is not inspect.Parameter.empty and p.default is not None:
            hint = type(p.default) if type(p.default) in (bool, int, float, str) else inspect.Parameter.empty
        if hint is float and isinstance(v, float) and not math.isfinite(v):
            raise OptionError(f"{what} option {k}: expected a finite number, got {v!r}")
        out[k] = coerce(v, hint, f"{what} option {k}")
    return out


__all__ = ["OptionError", "parse_scalar", "key_values", "coerce", "dataclass_from_dict", "config_to_dict",
           "load_config_file", "apply_sets", "differences", "coerce_options"]
