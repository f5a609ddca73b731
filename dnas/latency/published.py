"""Loaders for the latency tables users already have, into :class:`LatencyTable`.

* **ProxylessNAS / once-for-all YAML** (Cai, Zhu & Han, ICLR 2019; Cai et al., ICLR 2020;
  files of ``han-cai/files``): a mapping ``key -> {count, mean, var}`` (ProxylessNAS) or
  ``{count, mean, std}`` (once-for-all), milliseconds, batch 1. Key kinds found in the
  published files:

  - ``Conv-input:224x224x3-output:112x112x32`` — the first 3x3 stride-2 conv (+BN+act);
  - ``expanded_conv-input:56x56x24-output:28x28x40-expand:6-kernel:5-stride:2-idskip:0`` —
    an MBConv block; ``expand`` is the expansion *ratio* in the ProxylessNAS table and the
    *number of middle channels* in the once-for-all tables (``expand:144`` for 24 -> 6x);
    ``idskip:1`` includes the residual addition; once-for-all keys add ``-se:{0,1}``
    (squeeze-and-excitation) and ``-hs:{0,1}`` (h-swish instead of ReLU);
  - ``Conv_1-input:7x7x320-output:7x7x1280`` — the final 1x1 feature-mixing conv;
  - ``Logits-input:7x7x1280-output:1000`` — global pooling + classifier (ProxylessNAS);
    once-for-all splits it into ``AvgPool2D-input:7x7x1152-output:1x1x1152``,
    ``Conv_2-input:1x1x1152-output:1x1x1536`` (MobileNetV3's 1x1 conv after pooling) and
    ``Logits-input:1x1x1536-output:1000``.

  The keys are kept verbatim, so they are exactly the keys :mod:`dnas.latency.space_latency`
  produces for the chain space.

* **FBNet per-layer lists** (Wu et al., CVPR 2019; the format of ``jh88/fbnet``'s
  ``lookup_table.py``): a JSON list with one entry per supernet layer, ``null`` for a fixed
  layer, else the list of candidate latencies in **microseconds** (mean of runs), in the
  supernet's candidate order; a trailing extra entry is the ``skip`` candidate of layers that
  keep their shape. Keys become ``fbnet/<op>-input:..-output:..-stride:<s>-layer:<i>``
  (shapes of jh88/fbnet's default CIFAR supernet when the list has its 28 layers) or
  ``fbnet/<op>-layer:<i>`` otherwise; ``meta["layers"]`` keeps the per-layer key lists.

:func:`load_table` reads any of these or a native ``dnas-latency-table`` JSON file, or a table
shipped with dnas by name (``cpu-2core-nb201``, ``cpu-2core-darts``, ``cpu-2core-chain``:
:func:`shipped_tables`).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

from dnas.latency.table import LatencyTable, LatencyTableError, signature_key

#: Device labels of the published files in ``../shared/data/latency`` (by file-name pattern).
_KNOWN_DEVICES = [(r"proxylessnas_mobile", "Google Pixel 1 (TFLite, ProxylessNAS mobile table)"),
                  (r"note10", "Samsung Galaxy Note10 (once-for-all table)"),
                  (r"raspi4|raspberry", "Raspberry Pi 4")]


def _device_from_name(path: Path) -> str | None:
    for pattern, label in _KNOWN_DEVICES:
        if re.search(pattern, path.name, re.IGNORECASE):
            return label
    return None


def load_proxyless_yaml(path: str | os.PathLike, device_kind: str | None = None) -> LatencyTable:
    """A ProxylessNAS (``{count, mean, var}``) or once-for-all (``{count, mean, std}``) YAML
    lookup table. ``std_ms`` is ``std``, or ``sqrt(var)``."""
    import yaml

    path = Path(path)
    name = f"latency table {str(path)!r}"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LatencyTableError(f"{name} not found") from None
    except yaml.YAMLError as e:
        raise LatencyTableError(f"{name} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or not data:
        raise LatencyTableError(f"{name}: expected a mapping key -> {{count, mean, var|std}}")
    entries, has_var, input_size = {}, False, None
    for key, v in data.items():
        if not isinstance(v, dict) or "mean" not in v:
            raise LatencyTableError(f"{name}: entry {key!r} must be a mapping with 'mean' and 'var' or 'std', got {v!r}")
        if "std" in v:
            std = float(v["std"])
        elif "var" in v:
            std, has_var = math.sqrt(max(float(v["var"]), 0.0)), True
        else:
            raise LatencyTableError(f"{name}: entry {key!r} has neither 'var' nor 'std'")
        entries[str(key)] = {"mean_ms": float(v["mean"]), "std_ms": std, "count": int(v.get("count", 1))}
        m = re.match(r"Conv-input:(\d+)x(\d+)x\d+-", str(key))
        if m:
            input_size = int(m.group(1))
    meta = {"backend": "tflite", "device_kind": device_kind or _device_from_name(path), "dtype": "float32",
            "batch_size": 1, "input_size": input_size, "method": "published",
            "space": "chain" if re.search("proxylessnas", path.name, re.IGNORECASE) else None,
            "source": path.name, "source_format": "proxylessnas-yaml" if has_var else "once-for-all-yaml",
            "unit": "ms"}
    return LatencyTable(entries, meta, name)


#: jh88/fbnet's default CIFAR supernet (``fbnet/blocks.py: get_super_net``): candidate
#: ``(expansion, kernel, group)`` per searchable layer, then ``skip`` where the shape is kept.
FBNET_CANDIDATES = (("k3_e1", 1, 3, 1), ("k3_e1_g2", 1, 3, 2), ("k3_e3", 3, 3, 1), ("k3_e6", 6, 3, 1),
                    ("k5_e1", 1, 5, 1), ("k5_e1_g2", 1, 5, 2), ("k5_e3", 3, 5, 1), ("k5_e6", 6, 5, 1))
FBNET_OPS = tuple(c[0] for c in FBNET_CANDIDATES) + ("skip",)
_FBNET_FS = (16, 16, 24, 32, 64, 112, 184, 352, 1984)
_FBNET_NS = (1, 1, 4, 4, 4, 4, 4, 1, 1)
_FBNET_SS = (2, 1, 2, 2, 2, 1, 2, 1, 1)


def fbnet_cifar_layers(input_size: int = 32, in_channels: int = 3) -> list[dict | None]:
    """The layers of jh88/fbnet's default supernet (conv1, bn1, 22 searchable layers, conv2,
    bn2, pool, dense): ``None`` for fixed layers, else ``{"input", "output", "stride", "skip"}``
    (per-example shapes; ``skip``: the layer also offers the identity)."""
    layers: list[dict | None] = [None, None]
    h = -(-input_size // _FBNET_SS[0])
    c = _FBNET_FS[0]
    for i, (f, n, s) in enumerate(zip(_FBNET_FS[1:-1], _FBNET_NS[1:-1], _FBNET_SS[1:-1])):
        for j in range(n):
            stride = s if j == 0 else 1
            h_out = -(-h // stride)
            skip = (_FBNET_FS[i] == _FBNET_FS[i + 1] or j > 0) and stride == 1
            layers.append({"input": (h, h, c), "output": (h_out, h_out, f), "stride": stride, "skip": skip})
            h, c = h_out, f
    return layers + [None] * 4


def load_fbnet_list(path: str | os.PathLike, op_names: Sequence[str] | None = None, unit: str = "us",
                    device_kind: str | None = None, input_size: int = 32) -> LatencyTable:
    """An FBNet-style per-layer latency list (``null`` for fixed layers).

    ``op_names``: the candidate names in list order (default :data:`FBNET_OPS`, jh88/fbnet's
    supernet; a layer with one value more than the non-skip candidates has ``skip`` last).
    ``unit``: ``"us"`` (jh88/fbnet) or ``"ms"``.
    """
    path = Path(path)
    name = f"latency table {str(path)!r}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LatencyTableError(f"{name} not found") from None
    except json.JSONDecodeError as e:
        raise LatencyTableError(f"{name} is not valid JSON: {e.msg} (line {e.lineno})") from None
    return fbnet_table_from_list(data, op_names, unit, device_kind or _device_from_name(path), input_size,
                                 name=name, source=path.name)


def fbnet_table_from_list(data: Any, op_names: Sequence[str] | None = None, unit: str = "us",
                          device_kind: str | None = None, input_size: int = 32, name: str = "FBNet list",
                          source: str | None = None) -> LatencyTable:
    if unit not in ("us", "ms"):
        raise LatencyTableError(f"{name}: unit must be 'us' or 'ms', got {unit!r}")
    if not isinstance(data, list):
        raise LatencyTableError(f"{name}: an FBNet table is a list (one entry per supernet layer, null for "
                                f"fixed layers), got {type(data).__name__}")
    ops = tuple(op_names) if op_names is not None else FBNET_OPS
    scale = 1e-3 if unit == "us" else 1.0
    shapes = fbnet_cifar_layers(input_size) if op_names is None and len(data) == 28 else None
    entries, layers = {}, []
    for i, row in enumerate(data):
        if row is None:
            layers.append(None)
            continue
        if not isinstance(row, list) or not all(isinstance(v, (int, float)) for v in row):
            raise LatencyTableError(f"{name}: layer {i} must be null or a list of numbers, got {row!r}")
        if len(row) > len(ops):
            raise LatencyTableError(f"{name}: layer {i} has {len(row)} candidates but only {len(ops)} op names "
                                    f"are known ({', '.join(ops)}); pass op_names")
        names = list(ops[:len(row)])
        if op_names is None and len(row) == len(ops) - 1:
            names = list(ops[:-1])       # no skip at this layer
        keys = []
        for op, v in zip(names, row):
            if shapes is not None and shapes[i] is not None:
                sh = shapes[i]
                key = signature_key(f"fbnet/{op}", sh["input"], sh["output"], [("stride", sh["stride"]), ("layer", i)])
            else:
                key = f"fbnet/{op}-layer:{i}"
            entries[key] = {"mean_ms": float(v) * scale, "std_ms": float("nan"), "count": 10}
            keys.append(key)
        layers.append(keys)
    meta = {"backend": "tflite", "device_kind": device_kind, "dtype": "float32", "batch_size": 1,
            "input_size": input_size, "method": "published", "source": source, "source_format": "fbnet-list",
            "unit": "ms (converted from us)" if unit == "us" else "ms", "layers": layers}
    return LatencyTable(entries, meta, name)


#: Where the tables shipped with dnas live (package data: ``dnas/latency/tables/<name>.json``).
TABLES_DIR = Path(__file__).resolve().parent / "tables"


def shipped_tables() -> dict[str, Path]:
    """The latency tables shipped with dnas, by name (the file name without ``.json``), e.g.
    ``cpu-2core-nb201`` (docs/latency.md says how each was measured)."""
    if not TABLES_DIR.is_dir():
        return {}
    return {f.stem: f for f in sorted(TABLES_DIR.glob("*.json"))}


def resolve_table(path: str | os.PathLike) -> Path:
    """``path`` itself when it is a file, else the shipped table of that name (``.json``
    optional); neither -> :class:`LatencyTableError` listing the shipped names."""
    p = Path(path)
    if p.exists():
        return p
    shipped = shipped_tables()
    name = p.name[:-5] if p.name.endswith(".json") else p.name
    if str(p.parent) in ("", ".") and name in shipped:
        return shipped[name]
    names = ", ".join(shipped) or "none"
    raise LatencyTableError(f"latency table {str(path)!r} not found: it is neither a file nor the name of a table "
                            f"shipped with dnas (shipped: {names})")


def load_table(path: str | os.PathLike, **options) -> LatencyTable:
    """Read a latency table in any supported format, chosen by content/extension:
    ``.yaml``/``.yml`` -> :func:`load_proxyless_yaml`; a JSON object -> the native
    ``dnas-latency-table`` format; a JSON list -> :func:`load_fbnet_list`. ``path`` may also
    be the name of a table shipped with dnas (:func:`shipped_tables`, e.g. ``cpu-2core-nb201``)."""
    path = resolve_table(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        return load_proxyless_yaml(path, **options)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LatencyTableError(f"latency table {str(path)!r} is neither YAML (by extension) nor valid JSON: "
                                f"{e.msg} (line {e.lineno})") from None
    if isinstance(data, list):
        return load_fbnet_list(path, **options)
    if options:
        raise LatencyTableError(f"options {sorted(options)} do not apply to a dnas-latency-table JSON file")
    return LatencyTable.from_json(data, name=f"latency table {str(path)!r}")
