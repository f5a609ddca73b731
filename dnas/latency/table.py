"""The latency lookup-table format and the signature keys of candidate operations.

A table is one JSON document (format ``dnas-latency-table``, version 1)::

    {
      "format": "dnas-latency-table",
      "version": 1,
      "meta": {
        "backend": "cpu",                   # jax.default_backend(), or e.g. "tflite" for a published table
        "device_kind": "AMD EPYC ..., 2 cores",  # jax.devices()[0].device_kind (on CPU: the processor and
                                            # core count), or the phone's name
        "dtype": "float32",
        "batch_size": 1,
        "input_size": 224,                  # the network's input resolution (H = W)
        "jax_version": "0.10.2", "jaxlib_version": "0.10.2",
        "date": "2025-01-01T12:00:00+00:00",
        "method": "profile",                # profile | published | fit | ...
        "space": "chain",                   # the search space the table was made for (or null)
        "space_config": {...},              # its configuration (dataclasses.asdict(space.config))
        ...                                 # free-form extras (repeats, warm-up, source file, unit)
      },
      "entries": {
        "<signature key>": {"mean_ms": 1.23, "std_ms": 0.04, "count": 50},
        ...
      }
    }

Latencies are always milliseconds (per forward pass of the op alone at ``batch_size``).
Keys of the standard meta fields that are unknown (a published table does not say which
jaxlib measured it) are ``null``.

Signature keys
--------------
A key names one operator instance by everything its cost depends on, in the style of the
ProxylessNAS / once-for-all tables (Cai et al., ICLR 2019; Cai et al., ICLR 2020), whose keys
it reproduces exactly for MBConv blocks::

    <op>-input:<H>x<W>x<C>-output:<H>x<W>x<C>[-<attr>:<value>]...

``op`` is the operator name, possibly qualified by the space that defines it
(``nb201/nor_conv_3x3``, ``darts/sep_conv_5x5``; the ProxylessNAS names ``Conv``,
``expanded_conv``, ``Conv_1``, ``Logits`` are kept as they are); shapes are per example
(NHWC without the batch); an output that is a vector is written ``output:<C>``; the
attributes (``stride``, ``kernel``, ``expand``, ``idskip``, ``dilation``, ...) follow in the
order given. :func:`signature_key` builds a key, :func:`parse_key` reads one back.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

FORMAT = "dnas-latency-table"
VERSION = 1

#: The standard meta fields (always present in a saved table; ``None`` when unknown).
META_FIELDS = ("backend", "device_kind", "dtype", "batch_size", "input_size", "jax_version",
               "jaxlib_version", "date", "method", "space", "space_config")


class LatencyTableError(ValueError):
    """A malformed table file, or a lookup of keys the table does not have."""


class MissingLatencyKeysError(LatencyTableError, KeyError):
    """Keys a table lacks; ``.missing`` lists every one of them."""

    def __init__(self, missing: Sequence[str], table_name: str = "latency table", hint: str = ""):
        self.missing = list(dict.fromkeys(missing))
        shown = "\n  ".join(self.missing)
        msg = f"{table_name} lacks {len(self.missing)} key(s) the search space needs:\n  {shown}"
        if hint:
            msg += f"\n{hint}"
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


# ------------------------------------------------------------------------------ keys

def _shape(shape: Sequence[int] | int) -> str:
    if isinstance(shape, int):
        return str(shape)
    return "x".join(str(int(s)) for s in shape)


def signature_key(op: str, input_shape: Sequence[int] | int, output_shape: Sequence[int] | int,
                  attrs: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> str:
    """``op-input:HxWxC-output:HxWxC-attr:value-...`` (see the module docstring).

    ``attrs`` keeps its order (a dict or a list of pairs); booleans are written 0/1. Op and
    attribute names must not contain ``-`` or ``:`` (the key's separators).
    """
    for name in [op, *(k for k, _ in _pairs(attrs))]:
        if "-" in name or ":" in name or not name:
            raise LatencyTableError(f"signature name {name!r} must be non-empty and contain no '-' or ':'")
    parts = [op, f"input:{_shape(input_shape)}", f"output:{_shape(output_shape)}"]
    for k, v in _pairs(attrs):
        if isinstance(v, bool):
            v = int(v)
        parts.append(f"{k}:{v}")
    return "-".join(parts)


def _pairs(attrs) -> list[tuple[str, Any]]:
    return list(attrs.items()) if isinstance(attrs, Mapping) else list(attrs)


def parse_key(key: str) -> tuple[str, dict[str, str]]:
    """``"expanded_conv-input:56x56x24-output:28x28x40-expand:6"`` ->
    ``("expanded_conv", {"input": "56x56x24", "output": "28x28x40", "expand": "6"})``."""
    op, *rest = key.split("-")
    fields = {}
    for part in rest:
        if ":" not in part:
            raise LatencyTableError(f"malformed signature key {key!r}: part {part!r} is not 'name:value'")
        k, v = part.split(":", 1)
        fields[k] = v
    return op, fields


# ------------------------------------------------------------------------------ table

def _check_entry(key: str, entry: Any, where: str) -> dict:
    if not isinstance(entry, Mapping):
        raise LatencyTableError(f"{where}: entry {key!r} must be an object with mean_ms/std_ms/count, got {entry!r}")
    if "mean_ms" not in entry:
        raise LatencyTableError(f"{where}: entry {key!r} has no 'mean_ms'")
    out = {}
    for field in ("mean_ms", "std_ms"):
        v = entry.get(field, 0.0 if field == "std_ms" else None)
        if v is None:
            v = float("nan") if field == "std_ms" else v
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise LatencyTableError(f"{where}: entry {key!r}: {field} is not a number: {v!r}") from None
        if field == "mean_ms" and (not math.isfinite(v) or v < 0):
            raise LatencyTableError(f"{where}: entry {key!r}: mean_ms must be finite and >= 0, got {v}")
        out[field] = v
    count = entry.get("count", 1)
    try:
        out["count"] = int(count)
    except (TypeError, ValueError):
        raise LatencyTableError(f"{where}: entry {key!r}: count is not an integer: {count!r}") from None
    return out


@dataclasses.dataclass
class LatencyTable:
    """Per-signature latencies (ms) plus the metadata of how they were obtained.

    ``entries[key] = {"mean_ms": float, "std_ms": float, "count": int}``.
    """

    entries: dict[str, dict] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    name: str = "latency table"      # for error messages (the file it came from)

    def __post_init__(self):
        self.entries = {str(k): _check_entry(str(k), v, self.name) for k, v in self.entries.items()}
        self.meta = {**{f: None for f in META_FIELDS}, **dict(self.meta)}

    # -- access
    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def keys(self) -> list[str]:
        return list(self.entries)

    def add(self, key: str, mean_ms: float, std_ms: float = 0.0, count: int = 1) -> None:
        self.entries[key] = _check_entry(key, {"mean_ms": mean_ms, "std_ms": std_ms, "count": count}, self.name)

    def missing(self, keys: Iterable[str | None]) -> list[str]:
        """The keys (``None`` = a free op, never missing) this table lacks, in order, unique."""
        return list(dict.fromkeys(k for k in keys if k is not None and k not in self.entries))

    def require(self, keys: Iterable[str | None], hint: str = "") -> None:
        """Raise :class:`MissingLatencyKeysError` naming every key of ``keys`` the table lacks."""
        missing = self.missing(keys)
        if missing:
            raise MissingLatencyKeysError(missing, self.name, hint)

    def lookup(self, key: str | None) -> float:
        """Mean latency (ms) of one key; ``None`` (a free op such as ``zero``) is 0 ms."""
        if key is None:
            return 0.0
        self.require([key])
        return self.entries[key]["mean_ms"]

    def lookup_many(self, keys: Iterable[str | None], hint: str = "") -> list[float]:
        """Mean latencies of ``keys``; every missing key is named in one error."""
        keys = list(keys)
        self.require(keys, hint)
        return [0.0 if k is None else self.entries[k]["mean_ms"] for k in keys]

    # -- I/O
    def to_json(self) -> dict:
        def clean(v):   # NaN (unknown std) is written as null: strict JSON
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return {"format": FORMAT, "version": VERSION, "meta": dict(self.meta),
                "entries": {k: {f: clean(x) for f, x in v.items()} for k, v in sorted(self.entries.items())}}

    @classmethod
    def from_json(cls, data: Any, name: str = "latency table") -> "LatencyTable":
        if not isinstance(data, Mapping):
            raise LatencyTableError(f"{name}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise LatencyTableError(f"{name}: not a dnas latency table (format {data.get('format')!r}, "
                                    f"expected {FORMAT!r}); published ProxylessNAS/OFA YAML or FBNet lists "
                                    f"are read by dnas.latency.published.load_table")
        if data.get("version") != VERSION:
            raise LatencyTableError(f"{name}: unsupported table version {data.get('version')!r} "
                                    f"(this dnas reads version {VERSION})")
        entries, meta = data.get("entries"), data.get("meta", {})
        if not isinstance(entries, Mapping):
            raise LatencyTableError(f"{name}: 'entries' must be an object of key -> {{mean_ms, std_ms, count}}")
        if not isinstance(meta, Mapping):
            raise LatencyTableError(f"{name}: 'meta' must be an object")
        return cls(dict(entries), dict(meta), name)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as indented JSON (atomically; parent folders created)."""
        path = Path(path)
        text = json.dumps(self.to_json(), indent=1, allow_nan=False, default=_json_default)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
        """Read a table written by :meth:`save` (for published YAML/FBNet files use
        :func:`dnas.latency.published.load_table`, which accepts every format)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LatencyTableError(f"latency table {str(path)!r} not found") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LatencyTableError(f"latency table {str(path)!r} is not valid JSON: {e.msg} "
                                    f"(line {e.lineno})") from None
        return cls.from_json(data, name=f"latency table {str(path)!r}")


def _json_default(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, (set, frozenset, tuple)):
        return list(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"latency table meta value of type {type(x).__name__} is not JSON serialisable")


def runtime_meta(**extra) -> dict:
    """The standard meta fields describing the current JAX backend (plus ``extra``)."""
    import jax
    import jaxlib

    dev = jax.devices()[0]
    backend = jax.default_backend()
    kind = getattr(dev, "device_kind", str(dev))
    cpu = cpu_info()
    if backend == "cpu":   # jax says only "cpu": name the processor and the cores the process may use
        kind = f"{cpu['cpu_model']}, {cpu['cpu_cores']} cores"
    meta = {"backend": backend, "device_kind": kind,
            "jax_version": jax.__version__, "jaxlib_version": getattr(jaxlib, "__version__", None),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "num_devices": jax.device_count(), **cpu}
    meta.update(extra)
    return meta


def cpu_info() -> dict:
    """The host processor: ``cpu_model`` (``/proc/cpuinfo``'s model name, with family/model
    numbers when the name is generic), ``cpu_cores`` (CPUs this process may run on),
    ``cpu_isa`` (the widest x86 vector extension: avx512 / avx2 / ..., else the machine)."""
    import platform

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            k, sep, v = line.partition(":")
            if sep and k.strip() not in fields:
                fields[k.strip()] = v.strip()
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    if not any(ch.isdigit() for ch in model) and fields.get("cpu family"):   # a generic name ("AMD EPYC")
        model += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    flags = set(fields.get("flags", "").split())
    isa = next((n for f, n in (("avx512f", "avx512"), ("avx2", "avx2"), ("avx", "avx"), ("sse4_2", "sse4.2"))
                if f in flags), platform.machine())
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count()
    return {"cpu_model": model, "cpu_cores": cores, "cpu_isa": isa}
