"""dnas's search step side by side with a PyTorch reference step, timed in alternation.

One process builds both sides on the same configuration and the same random batch, warms
both up (dnas: ``lower().compile()`` of ``Searcher.compiled_step()``, timed as the compile
time, then a warm-up step), then runs ``--rounds`` interleaved rounds of ``--steps`` steps
per side (the side that goes first alternates between rounds), timing every step (dnas: until
``block_until_ready``; PyTorch: synchronous). It prints one JSON object (and writes it to
``--out``): per configuration the per-side median/min step time, dnas's compile time and
XLA's FLOP/temp-memory figures, parameter counts, and the ratios dnas/reference; plus the
machine (CPU count, PyTorch threads, JAX devices, ``XLA_FLAGS``, load average before and
after, versions).

The step on both sides is dnas's first-order DARTS step: an architecture step (gradient of
the validation loss w.r.t. alpha only; Adam lr 3e-4, betas (0.5, 0.999), L2 decay 1e-3) on a
validation batch, then a weight step with the updated alpha (SGD lr 0.025, momentum 0.9, L2
decay 3e-4, gradient-norm clip 5) on a training batch. ``--reference-arch-backward all`` makes
the PyTorch alpha step back-propagate into every parameter, as xautodl's own search scripts do
(``loss.backward()``), instead of into alpha only (what dnas computes).

Configurations (``--config``, comma-separated, default all three):

* ``nb201-darts``: NAS-Bench-201 search network, C=16, N=5 (15 cells), batch 64, 32x32x3,
  10 classes. dnas ``make_searcher("nb201", "darts")`` vs xautodl's ``DARTS-V1`` network
  (``xautodl.models.get_cell_based_tiny_net``, affine=False, track_running_stats=False: the
  defaults of xautodl's NATS search script ``exps/NATS-algos/search-cell.py``).
* ``nb201-gdas``: the same with dnas's ``gdas`` relaxation vs xautodl's ``GDAS`` network (tau 10).
* ``darts-darts``: the DARTS CNN space, C=16, 8 cells, batch 64, 32x32. dnas
  ``make_searcher("darts", "darts")`` vs ``torch_darts_reference.DartsSearchNetwork`` (this
  folder; written from the DARTS paper's description).

On a machine with a GPU both sides run on it (``--torch-device auto``; JAX uses its default
backend) and the PyTorch step is timed between ``torch.cuda.synchronize()`` calls; with
``--memory`` the workers then also report each side's peak GPU memory (``device_peak_mb``).
``--precision bfloat16`` times ``dnas --precision bfloat16`` against PyTorch's
``autocast(bfloat16)``. ``--out`` is rewritten after every configuration, so a run stopped at a
time limit keeps what it measured. ``benchmarks/gpu_figures.sh`` runs the GPU figures.

``--channels/--cells/--batch-size`` override every chosen configuration (small smoke runs:
``--cells 1 --batch-size 8``). ``--memory`` also runs each side once in a fresh subprocess
(this script with ``--worker dnas|torch``: build, compile, two steps) and reports the RSS after
imports, after construction (and after compilation for dnas) and the peak RSS
(``ru_maxrss``) of both, and the peak ratio dnas/reference.

Install the reference side (not a runtime dependency of dnas):

    pip install -e ".[bench]"              # torch>=2.13 (a CPU-only machine: pip install "torch==2.13.0+cpu")
    pip install --no-deps xautodl          # NAS-Bench-201 reference nets; --no-deps: its numpy pin
                                           # does not build on Python 3.11, and it needs none of its deps here

Examples:

    python benchmarks/bench_vs_pytorch.py --config nb201-darts --cells 1 --batch-size 8 --rounds 1 --steps 1
    python benchmarks/bench_vs_pytorch.py --config darts-darts --cells 2 --channels 4 --batch-size 8 --memory
    python benchmarks/bench_vs_pytorch.py --config nb201-darts --rounds 2 --steps 2     # full size

On a shared machine read the ``min`` figures and the ratios of one run, and the load average.
The PyTorch side is far more sensitive to other processes than the dnas side: with
``torch.set_num_threads(os.cpu_count())`` every small op is an OpenMP parallel region whose
barrier waits for a thread that another process may have descheduled. On the 2-core machine,
with another job busy, a tiny DARTS-space forward+backward took 5-13 s with 2 threads against
0.3 s with 1 thread (and 1.2-1.5 s with ``OMP_WAIT_POLICY=PASSIVE``). Measure on a quiet
machine; ``--torch-threads 1`` shows whether contention is in play.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata

import numpy as np

from dnas.cli import LOOP_FLAGS   # --loops -> the space option unroll (dnas.cli imports no JAX)

HERE = os.path.dirname(os.path.abspath(__file__))

CONFIGS = {
    "nb201-darts": {"space": "nb201", "relaxation": "darts", "reference": "DARTS-V1",
                    "channels": 16, "cells": 5, "batch_size": 64},
    "nb201-gdas": {"space": "nb201", "relaxation": "gdas", "reference": "GDAS",
                   "channels": 16, "cells": 5, "batch_size": 64},
    "darts-darts": {"space": "darts", "relaxation": "darts", "reference": "torch_darts_reference",
                    "channels": 16, "cells": 8, "batch_size": 64},
}
NB201_OPS = ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]
NUM_CLASSES, IN_CHANNELS = 10, 3
GDAS_TAU = 10.0

INSTALL_HINT = """\
the PyTorch reference side needs packages that are not dnas dependencies; install them with
    pip install -e ".[bench]"        (torch>=2.13; on a CPU-only machine: pip install "torch==2.13.0+cpu")
    pip install --no-deps xautodl    (the NAS-Bench-201 configurations; --no-deps because its numpy pin
                                      does not build on Python 3.11)"""


def log(msg: str) -> None:
    print(f"[bench_vs_pytorch] {msg}", file=sys.stderr, flush=True)


def require_reference(configs) -> None:
    """Exit with the install commands if torch (or xautodl, for NB201 configs) is missing."""
    # find_spec, not import: the parent of the --memory workers stays small
    from importlib.util import find_spec
    missing = [] if find_spec("torch") else ["torch"]
    if any(CONFIGS[c]["space"] == "nb201" for c in configs) and not find_spec("xautodl"):
        missing.append("xautodl")
    if missing:
        sys.exit(f"bench_vs_pytorch.py: missing {', '.join(missing)}: {INSTALL_HINT}")


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident set size (Linux /proc; falls back to ru_maxrss elsewhere)."""
    v = _proc_status_mb("VmRSS")
    return v if v is not None else ru_maxrss_mb()


def ru_maxrss_mb() -> float:
    """``getrusage(RUSAGE_SELF).ru_maxrss``. On Linux it includes the RSS of the process that
    forked this one at the time of the exec, so the workers are started while the parent is small."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20  # KiB on Linux, bytes on macOS


def peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM (Linux), else ru_maxrss."""
    v = _proc_status_mb("VmHWM")
    return v if v is not None else ru_maxrss_mb()


def make_batches(batch_size: int, image_size: int, seed: int):
    """A training and a validation batch, NHWC float32 images and int32 labels."""
    rng = np.random.default_rng(seed)

    def one():
        return (rng.standard_normal((batch_size, image_size, image_size, IN_CHANNELS)).astype(np.float32),
                rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32))
    return one(), one()


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "mean_s": statistics.fmean(times),
            "max_s": max(times), "n_steps": len(times), "steps_s": [round(t, 4) for t in times]}


# ------------------------------------------------------------------------------ dnas side

class DnasSide:
    name = "dnas"

    def __init__(self, cfg: dict, batches, seed: int, loops: str = "auto", precision: str = "float32"):
        import jax

        from dnas.searcher import make_searcher
        self.jax = jax
        opts = {"channels": cfg["channels"], "in_channels": IN_CHANNELS, "num_classes": NUM_CLASSES,
                ("cells_per_stage" if cfg["space"] == "nb201" else "layers"): cfg["cells"]}
        if loops != "auto":   # the space's loop mode, as `dnas search --loops`
            opts["unroll"] = LOOP_FLAGS[loops]
        self.searcher = s = make_searcher(cfg["space"], cfg["relaxation"], space_options=opts, total_steps=1000,
                                          precision=precision)
        self.state = s.replicate(s.init(jax.random.PRNGKey(seed)))
        self.tb, self.vb = (s.shard(jax.device_put(b)) for b in batches)
        self.params = int(sum(x.size for x in jax.tree_util.tree_leaves(self.state.params)))
        self.compiled = None
        self.compile_s = None
        self.metrics = None

    def prepare(self) -> None:
        from dnas.bench import compiled_costs
        from dnas.hugepages import trim_heap
        t0 = time.perf_counter()
        self.compiled = self.searcher.compiled_step(donate=True).lower(self.state, self.tb, self.vb).compile()
        self.compile_s = time.perf_counter() - t0
        trim_heap()  # as `dnas search` and `dnas bench` do after compiling
        self.costs = compiled_costs(self.compiled)

    def step(self) -> float:
        t0 = time.perf_counter()
        self.state, self.metrics = self.compiled(self.state, self.tb, self.vb)
        self.jax.block_until_ready((self.state, self.metrics))
        return time.perf_counter() - t0

    def checked_step(self) -> tuple[float, dict]:
        """A (warm-up) step that also checks that alpha and the weights moved."""
        def get(tree):  # host copies (np.array copies: on CPU device_get may alias the donated buffers)
            return self.jax.tree_util.tree_map(lambda a: np.array(a, copy=True), tree)
        a0, w0 = get(self.state.arch), get(self.state.params)
        dt = self.step()
        leaves = self.jax.tree_util.tree_leaves
        d_alpha = max(float(np.abs(a - b).max()) for a, b in zip(leaves(get(self.state.arch)), leaves(a0), strict=True))
        d_w = max(float(np.abs(a - b).max()) for a, b in zip(leaves(get(self.state.params)), leaves(w0), strict=True))
        return dt, {"alpha_grad_norm": float(self.metrics["a_grad_norm"]), "max_alpha_change": d_alpha,
                    "max_weight_change": d_w, "val_loss": float(self.metrics["val_loss"]),
                    "train_loss": float(self.metrics["train_loss"])}

    def facts(self) -> dict:
        return {"compile_s": self.compile_s, "params": self.params, "flops": self.costs.get("flops"),
                "temp_bytes": self.costs.get("temp_bytes"),
                "final_train_loss": float(self.metrics["train_loss"]) if self.metrics else None,
                "device": str(self.jax.devices()[0]), "precision": self.searcher.precision,
                "what": f"dnas make_searcher({self.searcher.space.name!r}, {self.searcher.relax.name!r})"
                        " compiled_step(), first-order hypergradient"}


# ------------------------------------------------------------------------------ PyTorch side

class TorchSide:
    name = "reference"

    def __init__(self, cfg: dict, batches, seed: int, arch_backward: str = "alpha", threads: int | None = None,
                 device: str = "cpu", precision: str = "float32"):
        import contextlib

        import torch
        import torch.nn.functional as F
        self.torch, self.F = torch, F
        self.device = torch.device(device)
        # bfloat16: PyTorch's own mixed precision (autocast: convolutions and matrix products in
        # bfloat16, weights and the optimiser in float32), the counterpart of dnas --precision
        self.precision = precision
        self.autocast = ((lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if precision == "bfloat16"
                         else contextlib.nullcontext)
        torch.set_num_threads(threads or os.cpu_count() or 1)
        torch.manual_seed(seed)
        self.arch_backward = arch_backward
        if cfg["space"] == "nb201":
            from xautodl.models import get_cell_based_tiny_net
            net = get_cell_based_tiny_net({
                "name": cfg["reference"], "C": cfg["channels"], "N": cfg["cells"], "max_nodes": 4,
                "num_classes": NUM_CLASSES, "space": list(NB201_OPS), "affine": False,
                "track_running_stats": False})
            cells = [m for m in net.cells if type(m).__name__ == "NAS201SearchCell"]
            bns = [m for c in cells for m in c.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            assert bns and not any(b.affine or b.track_running_stats for b in bns), "xautodl BN settings not applied"
            if cfg["reference"] == "GDAS":
                net.set_tau(GDAS_TAU)
            self.weights, self.alphas = list(net.get_weights()), list(net.get_alphas())
            self.forward = lambda x: net(x)[1]  # xautodl nets return (features, logits)
            tau = f", tau={GDAS_TAU}" if cfg["reference"] == "GDAS" else ""
            self.what = (f"xautodl {type(net).__name__} ({cfg['reference']}), C={cfg['channels']}, N={cfg['cells']}, "
                         f"affine=False, track_running_stats=False{tau}")
        else:
            sys.path.insert(0, HERE)
            from torch_darts_reference import DartsSearchNetwork
            net = DartsSearchNetwork(cfg["channels"], cfg["cells"], NUM_CLASSES, IN_CHANNELS)
            self.weights, self.alphas = net.weights(), net.alphas()
            self.forward = net
            self.what = (f"benchmarks/torch_darts_reference.py DartsSearchNetwork, C={cfg['channels']}, "
                         f"{cfg['cells']} cells")
        self.net = net.to(self.device).train()
        if cfg["space"] == "nb201":   # get_weights/get_alphas again: the same tensors, now on the device
            self.weights, self.alphas = list(net.get_weights()), list(net.get_alphas())
        else:
            self.weights, self.alphas = net.weights(), net.alphas()
        (xt, yt), (xv, yv) = batches

        def to_torch(x, y):
            return (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(self.device),
                    torch.from_numpy(y.astype(np.int64)).to(self.device))
        self.tb, self.vb = to_torch(xt, yt), to_torch(xv, yv)
        self.a_opt = torch.optim.Adam(self.alphas, lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
        self.w_opt = torch.optim.SGD(self.weights, lr=0.025, momentum=0.9, weight_decay=3e-4)
        self.params = int(sum(p.numel() for p in self.weights))
        self.last = {}

    def prepare(self) -> None:
        pass

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def step(self) -> float:
        torch, F = self.torch, self.F
        self._sync()
        t0 = time.perf_counter()
        # 1. architecture step on the validation batch (first order: the weights are constants)
        self.a_opt.zero_grad(set_to_none=True)
        with self.autocast():
            v_loss = F.cross_entropy(self.forward(self.vb[0]).float(), self.vb[1])
        v_loss.backward(inputs=self.alphas if self.arch_backward == "alpha" else None)
        self.a_opt.step()
        # 2. weight step on the training batch with the updated alpha
        self.w_opt.zero_grad(set_to_none=True)
        with self.autocast():
            t_loss = F.cross_entropy(self.forward(self.tb[0]).float(), self.tb[1])
        t_loss.backward(inputs=self.weights)
        torch.nn.utils.clip_grad_norm_(self.weights, 5.0)
        self.w_opt.step()
        self._sync()   # CUDA runs asynchronously: the step ends when its kernels have
        dt = time.perf_counter() - t0
        self.last = {"v_loss": v_loss.detach(), "t_loss": t_loss.detach()}
        return dt

    def checked_step(self) -> tuple[float, dict]:
        torch = self.torch
        a0 = [a.detach().clone() for a in self.alphas]
        w0 = [w.detach().clone() for w in self.weights]
        dt = self.step()
        a_grad = float(torch.sqrt(sum((a.grad ** 2).sum() for a in self.alphas if a.grad is not None)))
        with torch.no_grad():
            d_alpha = max(float((a - b).abs().max()) for a, b in zip(self.alphas, a0, strict=True))
            d_w = max(float((a - b).abs().max()) for a, b in zip(self.weights, w0, strict=True))
        return dt, {"alpha_grad_norm": a_grad, "max_alpha_change": d_alpha, "max_weight_change": d_w,
                    "val_loss": float(self.last["v_loss"]), "train_loss": float(self.last["t_loss"])}

    def facts(self) -> dict:
        return {"params": self.params, "threads": self.torch.get_num_threads(), "arch_backward": self.arch_backward,
                "device": str(self.device), "precision": self.precision,
                "final_train_loss": float(self.last["t_loss"]) if self.last else None, "what": self.what}


# ------------------------------------------------------------------------------ runs

def resolve(name: str, args) -> dict:
    cfg = dict(CONFIGS[name])
    for key in ("channels", "cells", "batch_size"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    return cfg


def build_side(which: str, cfg: dict, args):
    batches = make_batches(cfg["batch_size"], args.image_size, args.seed)
    if which == "dnas":
        return DnasSide(cfg, batches, args.seed, args.loops, args.precision)
    return TorchSide(cfg, batches, args.seed, args.reference_arch_backward, args.torch_threads,
                     torch_device(args.torch_device), args.precision)


def torch_device(choice: str) -> str:
    """``--torch-device``: ``auto`` is ``cuda`` when PyTorch sees a GPU (and JAX then runs on
    its GPU backend too), else ``cpu``."""
    if choice != "auto":
        return choice
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_config(name: str, args) -> dict:
    cfg = resolve(name, args)
    load_before = os.getloadavg()
    log(f"{name}: building ({cfg})")
    sides = {}
    for which in ("dnas", "torch"):
        t0 = time.perf_counter()
        side = build_side(which, cfg, args)
        side.prepare()  # dnas: lower + compile
        side.build_s = time.perf_counter() - t0
        sides[which] = side
        log(f"{name}: {which} built in {side.build_s:.1f} s")
    checks = {}
    for which, side in sides.items():  # warm-up; the first step also checks that alpha and w moved
        _, checks[which] = side.checked_step()
        for _ in range(args.warmup - 1):
            side.step()
    times = {which: [] for which in sides}
    order = list(sides)
    for r in range(args.rounds):
        for which in (order if r % 2 == 0 else order[::-1]):
            for _ in range(args.steps):
                times[which].append(sides[which].step())
        log(f"{name}: round {r + 1}/{args.rounds}: " + ", ".join(
            f"{w} {statistics.median(t[-args.steps:]):.3f} s" for w, t in times.items()))
    d, ref = summary(times["dnas"]), summary(times["torch"])
    out = {
        "config": name, "space": cfg["space"], "relaxation": cfg["relaxation"], "channels": cfg["channels"],
        "cells": cfg["cells"], "batch_size": cfg["batch_size"], "image_size": args.image_size,
        "dnas": {**d, **sides["dnas"].facts(), "build_s": sides["dnas"].build_s, "warmup_check": checks["dnas"]},
        "reference": {**ref, **sides["torch"].facts(), "build_s": sides["torch"].build_s,
                      "warmup_check": checks["torch"]},
        "ratio_median": d["median_s"] / ref["median_s"], "ratio_min": d["min_s"] / ref["min_s"],
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }
    return out


def memory_runs(name: str, args) -> dict:
    """Each side once in a fresh interpreter (``--worker``), so its RSS is its own."""
    cfg = resolve(name, args)
    res = {}
    for which in ("dnas", "torch"):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", which, "--config", name,
               "--channels", str(cfg["channels"]), "--cells", str(cfg["cells"]), "--batch-size", str(cfg["batch_size"]),
               "--image-size", str(args.image_size), "--seed", str(args.seed), "--steps", str(max(args.steps, 2)),
               "--reference-arch-backward", args.reference_arch_backward, "--loops", args.loops,
               "--torch-threads", str(args.torch_threads or os.cpu_count() or 1),
               "--torch-device", args.torch_device, "--precision", args.precision]
        log(f"{name}: memory run of {which} in a subprocess")
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"worker {which} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        res["dnas" if which == "dnas" else "reference"] = json.loads(proc.stdout.strip().splitlines()[-1])
    res["ratio"] = res["dnas"]["peak_rss_mb"] / res["reference"]["peak_rss_mb"]
    if "device_peak_mb" in res["dnas"] and "device_peak_mb" in res["reference"]:
        res["device_ratio"] = res["dnas"]["device_peak_mb"] / res["reference"]["device_peak_mb"]
    return res


def worker(args) -> None:
    """``--worker dnas|torch``: build, compile, run a few steps; print the RSS figures as JSON."""
    rss_start = rss_mb()
    if args.worker == "dnas":
        import jax  # noqa: F401

        import dnas.searcher  # noqa: F401
    else:
        require_reference([args.config])
        import torch  # noqa: F401
        if CONFIGS[args.config]["space"] == "nb201":
            import xautodl.models  # noqa: F401
    rss_imports = rss_mb()
    cfg = resolve(args.config, args)
    side = build_side(args.worker, cfg, args)
    rss_built = rss_mb()
    side.prepare()
    rss_prepared = rss_mb()
    times = [side.step() for _ in range(max(args.steps, 2))]
    out = {"side": args.worker, "rss_start_mb": rss_start, "rss_after_imports_mb": rss_imports,
           "rss_after_build_mb": rss_built, "steps_s": [round(t, 4) for t in times], "peak_rss_mb": peak_rss_mb(),
           "ru_maxrss_mb": ru_maxrss_mb(), "rss_end_mb": rss_mb()}
    if args.worker == "dnas":
        out["rss_after_compile_mb"] = rss_prepared
        out["compile_s"] = side.compile_s
        stats = side.jax.devices()[0].memory_stats() or {}   # GPU/TPU allocators report; the CPU's not
        if "peak_bytes_in_use" in stats:
            out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
    else:
        out["threads"] = side.torch.get_num_threads()
        if side.device.type == "cuda":
            out["device_peak_mb"] = side.torch.cuda.max_memory_allocated(side.device) / 2**20
    print(json.dumps(out))


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "torch", "xautodl", "numpy", "dnas"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Time dnas's search step against a PyTorch reference, interleaved.")
    ap.add_argument("--config", default="all",
                    help=f"comma-separated, from {', '.join(CONFIGS)}; or 'all' (default)")
    ap.add_argument("--channels", type=int, default=None, help="override C of every chosen configuration")
    ap.add_argument("--cells", type=int, default=None,
                    help="override the cells: NB201 cells per stage (N), DARTS number of cells")
    ap.add_argument("--batch-size", type=int, default=None, help="override the batch size (default 64)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per side per round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side after building/compiling")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference-arch-backward", choices=("alpha", "all"), default="alpha",
                    help="PyTorch alpha step: back-propagate into alpha only (what dnas computes; default) or into "
                         "every parameter (what xautodl's search scripts do)")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads (default: os.cpu_count(), as the issue asks)")
    ap.add_argument("--loops", choices=["auto", *LOOP_FLAGS], default="auto",
                    help="dnas's loop mode (`dnas search --loops`): unroll (CPU default), scan-cells or scan")
    ap.add_argument("--torch-device", default="auto",
                    help="the PyTorch side's device: cpu, cuda, or auto (cuda when available; JAX uses its default "
                         "backend, a GPU when one is there)")
    ap.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                    help="bfloat16: dnas --precision bfloat16 against PyTorch autocast(bfloat16)")
    ap.add_argument("--memory", action="store_true", help="also measure each side's peak RSS in a subprocess")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--worker", choices=("dnas", "torch"), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.warmup < 1:
        ap.error("--rounds, --steps and --warmup must be >= 1")
    names = list(CONFIGS) if args.config == "all" else [c.strip() for c in args.config.split(",") if c.strip()]
    bad = [c for c in names if c not in CONFIGS]
    if bad:
        ap.error(f"unknown config(s) {bad}; choose from {', '.join(CONFIGS)} or 'all'")
    if args.worker:
        if len(names) != 1:
            ap.error("--worker needs exactly one --config")
        args.config = names[0]
        worker(args)
        return
    require_reference(names)
    # the memory workers first, while this process has imported neither jax nor torch (see ru_maxrss_mb)
    memory = {name: memory_runs(name, args) for name in names} if args.memory else {}
    import jax
    import torch
    torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
    result = {
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "jax_devices": [str(d) for d in jax.devices()], "xla_flags": os.environ.get("XLA_FLAGS"),
                    "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
                    "platform": platform.platform(), "load_average_before": os.getloadavg()},
        "versions": versions(),
        "settings": {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
                     "torch_threads": torch.get_num_threads(),
                     "reference_arch_backward": args.reference_arch_backward, "loops": args.loops,
                     "torch_device": torch_device(args.torch_device), "precision": args.precision},
        "configs": {},
    }
    for name in names:
        result["configs"][name] = run_config(name, args)
        if name in memory:
            result["configs"][name]["peak_rss_mb"] = memory[name]
        if args.out:   # after every configuration: a run stopped at a time limit keeps what it measured
            write_json(args.out, result)
    result["machine"]["load_average_after"] = os.getloadavg()
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)


def write_json(path: str, result: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    from dnas.hugepages import reexec_with_hugepages   # as the `dnas` command does (DNAS_HUGEPAGES=0: off)
    from dnas.xla_flags import apply_cpu_defaults      # likewise (DNAS_XLA_DEFAULTS=0: off)
    reexec_with_hugepages()
    apply_cpu_defaults()
    main()
