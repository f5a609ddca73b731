"""The ``dnas`` command line: ``dnas search``, ``dnas train``, ``dnas bench``, ``dnas latency``.

JAX is imported only after the arguments are parsed, because ``--devices N`` on a CPU-only
machine must set ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX starts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


# dnas.searcher.PRECISIONS's names (not imported here: JAX must start after the arguments are parsed)
PRECISION_CHOICES = ("float32", "bfloat16")
# dnas.backend.KERNEL_CHOICES (dnas.backend imports JAX only inside its functions)
from dnas.backend import KERNEL_CHOICES  # noqa: E402


def _positive(x: str) -> int:
    v = int(x)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {x}")
    return v


#: ``--loops`` -> the spaces' ``unroll`` option (``dnas.supernet.context.loop_mode``); "auto" sets none.
LOOP_FLAGS = {"unroll": True, "scan-cells": "scan_cells", "scan": False}


def _space_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", default="nb201",
                   help="search space: nb201 (NAS-Bench-201 cell, 6 edges x 5 ops), darts (DARTS CNN cells, 14 edges "
                        "x 8 ops), chain (the ProxylessNAS/MobileNetV2 chain, MBConv k3/5/7 x e3/6 + zero per block), "
                        "a space registered by an installed package, or your own: an import spec "
                        "'my_pkg.module:factory' (a Flax NNX model with dnas.nnx choice points or a SearchSpace, "
                        "or a function of keyword options returning one; docs/own_model.md)")
    p.add_argument("--space-option", action="append", metavar="KEY=VALUE",
                   help="option of a space given by spec or registered name, passed to its factory (repeatable)")
    p.add_argument("--relaxation", default="darts",
                   help="relaxation of the architecture choice: darts, gdas, snas, pc_darts, drnas, proxyless, or an "
                        "import spec 'my_pkg.module:factory' (default: darts)")
    p.add_argument("--channels", type=_positive, default=None,
                   help="initial channels C of the supernet (search default: 16 for nb201, 8 for darts; bench: 16)")
    p.add_argument("--cells", type=_positive, default=None,
                   help="nb201: cells per stage (N); darts: number of cells (layers); chain: max blocks per stage")
    p.add_argument("--width-mult", type=float, default=None, help="chain: width multiplier (1.0 = ProxylessNAS mobile)")
    p.add_argument("--conv-impl", choices=["auto", "native", "dense"], default="auto",
                   help="separable convolution formulation: native (depthwise then pointwise; on CPU as shifted "
                        "views and a matrix product), dense (one convolution with the fused kernel); auto = native, "
                        "except dense on CPU inside sampled ops' conditionals, in scanned cells with unrolled edges and "
                        "for --seeds")
    p.add_argument("--loops", choices=["auto", *LOOP_FLAGS], default="auto",
                   help="the supernet's loops over cells and edges: unrolled at trace time (fastest steps on CPU, "
                        "long compiles), scan-cells (runs of equal cells under lax.scan, edges unrolled) or scan "
                        "(cells and edges scanned: shortest compiles; nb201 scans its cells only, darts its edges "
                        "only). On CPU scanning trades step time for compile time (docs/benchmarks.md, 'Loop "
                        "modes'); auto = unroll on CPU (darts: its edges looped for short runs), scan on GPU/TPU")
    p.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto",
                   help="kernel formulations (dnas.backend, docs/cpu.md): xla_cpu (XLA:CPU's: 1x1 convolutions as "
                        "matrix products, depthwise as shifted views, custom-VJP convolutions in conditionals and "
                        "loops, pinned BatchNorm outputs and cell nodes, unrolled loops), native (JAX's own "
                        "convolutions and scanned loops, what GPUs/TPUs run); auto = xla_cpu on the CPU, else native")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="float32",
                   help="bfloat16: mixed precision, convolutions read bfloat16 inputs and kernels (GPU/TPU tensor "
                        "cores; slow on CPU); weights, BatchNorm, α, the mixing and the loss stay float32")
    p.add_argument("--devices", type=_positive, default=1,
                   help="data-parallel devices (per process; state replicated, batch split); on a CPU-only machine "
                        "this many host devices are simulated")
    d = p.add_argument_group("multi-process (jax.distributed; see dnas/distributed.py)")
    d.add_argument("--distributed", action="store_true",
                   help="join JAX's multi-process runtime, detecting the cluster from the launcher (SLURM, Open MPI, "
                        "Cloud TPU, Kubernetes) or JAX_COORDINATOR_ADDRESS")
    d.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="address of process 0's coordinator")
    d.add_argument("--num-processes", type=_positive, default=None)
    d.add_argument("--process-id", type=int, default=None)


def _seed_list(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative integers, got {text!r}")
    return seeds


def _key_values(items: list[str] | None, flag: str) -> dict:
    """``["k=v", ...]`` → ``{k: v}``, ``v`` read strictly (:func:`dnas.options.key_values`)."""
    from dnas.options import OptionError, key_values
    try:
        return key_values(items, flag)
    except OptionError as e:
        raise SystemExit(f"dnas: {e}") from None


def _run_args(p: argparse.ArgumentParser, command: str) -> None:
    """The flags of a run's lifecycle (dnas/rundir.py): config files, resume, overwrite."""
    r = p.add_argument_group("run files (config, resume; docs/runs.md)")
    r.add_argument("--config", default=None, metavar="FILE",
                   help="read the options from a YAML or JSON file (a run's own config.json reruns it); flags given "
                        "on the command line and --set override it")
    r.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="override one option of the configuration (dotted for nested ones, e.g. hyper.w_lr=0.01 "
                        "or space_options.channels=8; repeatable)")
    r.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help=f"continue the {command} in RUN_DIR from its latest good checkpoint; it ends as if never "
                        "interrupted. Only the run's length (--epochs, --max-steps) may change")
    r.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    r.add_argument("--checkpoint-every", type=_positive, default=1, metavar="EPOCHS", help="checkpoint every N epochs")
    r.add_argument("--checkpoint-steps", type=_positive, default=None, metavar="N",
                   help="also checkpoint every N steps (SIGTERM/SIGINT always checkpoint before the run stops)")


def _merge_config(args, build, default_args, what: str, from_dict, saved_for_resume):
    """The run's configuration: ``build(args)`` alone, or — with ``--config`` / ``--resume`` —
    that file's (or the run's) configuration with the flags given on the command line and the
    ``--set`` pairs applied on top. A flag counts as given when its value differs from the
    parser's default (so passing a default value explicitly does not override a file)."""
    from dnas.options import apply_sets, config_to_dict, differences, load_config_file
    cli = build(args)
    if not (args.config or args.resume or args.set):
        return cli
    if args.config and args.resume:
        raise SystemExit(f"dnas {what}: --config and --resume exclude each other (a resumed run keeps its own)")
    if args.resume:
        base = config_to_dict(saved_for_resume(args.resume))
        base["out"] = str(args.resume)
    elif args.config:
        base = load_config_file(args.config)
        base.pop("resolved", None)
        base.pop("out", None)      # a run's config.json names its own --out: the rerun goes elsewhere
    else:
        base = config_to_dict(cli)
    given = differences(build(default_args), cli)
    cli_dict = config_to_dict(cli)
    for name in given:
        node, src = base, cli_dict
        parts = name.split(".")
        for part in parts[:-1]:
            node, src = node.setdefault(part, {}), src[part]
        node[parts[-1]] = src[parts[-1]]
    return from_dict(apply_sets(base, args.set))


def _hypergrad_args(p: argparse.ArgumentParser) -> None:
    from dnas.hypergrad import ESTIMATORS  # light: no JAX device is touched at import

    p.add_argument("--relaxation-option", action="append", metavar="KEY=VALUE",
                   help="option of the relaxation factory, e.g. k=2 or edge_norm=false for pc_darts (repeatable)")
    p.add_argument("--hypergrad", choices=list(ESTIMATORS), default="first",
                   help="bilevel hypergradient: first order, DARTS 2nd order (exact HVP / finite difference), "
                        "K unrolled steps, or implicit differentiation (CG / Neumann)")
    p.add_argument("--unroll-steps", type=_positive, default=None, help="unrolled-k: inner steps K (default 2)")
    p.add_argument("--cg-iters", type=_positive, default=None, help="implicit-cg: CG iterations (default 10)")
    p.add_argument("--cg-damping", type=float, default=None, help="implicit-cg: damping δ of H + δI (default 1.0)")
    p.add_argument("--neumann-terms", type=_positive, default=None, help="implicit-neumann: series terms (default 10)")
    p.add_argument("--neumann-lr", type=float, default=None, help="implicit-neumann: step η of the series (default 0.01)")
    p.add_argument("--tune", default="", help="comma list of weight-optimizer hyperparameters learnt as outer "
                                              "variables (log scale): lr, wd")
    p.add_argument("--hyper-lr", type=float, default=1e-2, help="Adam step size of the tuned log-hyperparameters")


_HYPERGRAD_FLAGS = {"unroll_steps": ("unrolled-k", "steps"), "cg_iters": ("implicit-cg", "iters"),
                    "cg_damping": ("implicit-cg", "damping"), "neumann_terms": ("implicit-neumann", "terms"),
                    "neumann_lr": ("implicit-neumann", "lr")}


def _hypergrad_options(args) -> dict:
    opts = {}
    for flag, (estimator, option) in _HYPERGRAD_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if args.hypergrad != estimator:
            raise SystemExit(f"dnas: --{flag.replace('_', '-')} applies to --hypergrad {estimator}, "
                             f"not {args.hypergrad}")
        opts[option] = value
    return opts


def _tune(args) -> tuple[str, ...]:
    return tuple(t.strip() for t in args.tune.split(",") if t.strip())


def _space_options(args, defaults: str | None = "search_defaults") -> dict:
    """The space options the flags describe. A built-in space reads the shared flags itself
    (``SearchSpace.options_from_flags``), unset ones taken from its ``defaults`` attribute
    (``search_defaults``, ``bench_defaults``; None: the space's config defaults); a user's space
    takes ``--space-option KEY=VALUE`` only."""
    from dnas.supernet.spaces import SPACES

    flags = {"--channels": args.channels or None, "--cells": args.cells or None,
             "--width-mult": args.width_mult or None,
             "--conv-impl": None if args.conv_impl == "auto" else args.conv_impl,
             "--loops": None if getattr(args, "loops", "auto") == "auto" else LOOP_FLAGS[args.loops],
             "--stem-stride": getattr(args, "stem_stride", None)}
    if args.space not in SPACES:   # a user's space: only its own options
        for flag, value in flags.items():
            if value is not None:
                raise SystemExit(f"dnas: {flag} applies to the built-in spaces, not to {args.space!r}; "
                                 "use --space-option KEY=VALUE")
        return _key_values(args.space_option, "--space-option")
    if getattr(args, "space_option", None):
        raise SystemExit(f"dnas: --space-option is for spaces given by spec or registered name; the built-in "
                         f"{args.space!r} space takes --channels, --cells, ...")
    cls = SPACES[args.space][0]
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return cls.options_from_flags({**(getattr(cls, defaults) if defaults else {}), **given})
    except ValueError as e:
        raise SystemExit(f"dnas: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dnas", description="Differentiable neural architecture search in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("search", help="run an architecture search and write the derived architecture",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _space_args(s)
    s.add_argument("--dataset", default=None,
                   help="'digits' (embedded, default), a tensorflow-datasets name (cifar10, ...) or an image "
                        "folder PATH with PATH/train/<class>/*.jpg|png")
    s.add_argument("--data-dir", default=None, help="tensorflow-datasets data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    s.add_argument("--epochs", type=_positive, default=30)
    s.add_argument("--batch-size", type=_positive, default=64, help="global batch size (split over devices)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--seeds", type=_seed_list, default=None, metavar="S1,S2,...",
                   help="run one independent search per seed in a single vmapped program; writes OUT/seed-<s>/ "
                        "per seed and OUT/op_frequency.json (how often each op was chosen per edge)")
    s.add_argument("--out", default=None, help="output directory (default: runs/<timestamp>)")
    s.add_argument("--limit-examples", type=_positive, default=None,
                   help="use at most N training examples (stratified), for quick runs")
    s.add_argument("--max-steps", type=_positive, default=None, help="stop after N search steps")
    s.add_argument("--w-lr", type=float, default=0.025, help="weight learning rate (cosine to --w-lr-min)")
    s.add_argument("--w-lr-min", type=float, default=0.001)
    s.add_argument("--a-lr", type=float, default=3e-4, help="architecture (Adam) learning rate")
    s.add_argument("--w-wd", type=float, default=3e-4, help="weight decay of the weights")
    lat = s.add_argument_group("latency-aware search (docs/latency.md)")
    lat.add_argument("--latency-table", default=None, metavar="PATH",
                     help="latency lookup table (dnas JSON, ProxylessNAS/once-for-all YAML, FBNet list); adds the "
                          "expected latency to the architecture loss")
    lat.add_argument("--latency-loss", default="hinge",
                     help="fbnet | additive | additive_relative | multiplicative | mul_log | hinge")
    lat.add_argument("--latency-target", type=float, default=None, metavar="MS", help="target latency in ms")
    lat.add_argument("--latency-weight", type=float, default=None, help="weight of the latency term (λ)")
    lat.add_argument("--latency-space-option", action="append", metavar="KEY=VALUE",
                     help="option of the deployed network whose latency the table gives, where it differs from "
                          "the searched supernet (same choice points), e.g. width_mult=1.0 and stem_stride=2 for the "
                          "full ProxylessNAS chain (repeatable)")
    lat.add_argument("--latency-input-size", type=_positive, default=None, metavar="PX",
                     help="input resolution of the deployed network (default: the table's)")
    _hypergrad_args(s)
    s.add_argument("--compile-cache", default=None, metavar="DIR|off",
                   help="JAX's persistent compilation cache: a search of a configuration compiled before starts in "
                        "seconds (default: $DNAS_COMPILE_CACHE or ~/.cache/dnas/jax; 'off' disables it)")
    s.add_argument("--nb201-table", default=None, metavar="CSV",
                   help="nb201: NAS-Bench-201's accuracy table (NATS-Bench CSV, dnas/nb201_table.py); every epoch "
                        "record and genotype.json get the benchmark's test accuracies of the derived cell")
    s.add_argument("--no-augment", action="store_true", help="disable random crop / flip")
    s.add_argument("--loop", choices=["auto", "host", "device"], default="auto",
                   help="device: the dataset on the device, batches gathered and augmented there, --chunk-steps "
                        "search steps per compiled call (dnas/device_loop.py; same result as host); host: one call "
                        "per step, batches from the host; auto = device on GPU/TPU, host on CPU")
    s.add_argument("--chunk-steps", type=_positive, default=50, help="--loop device: search steps per compiled call")
    s.add_argument("--log-every", type=_positive, default=10, help="write a step record every N steps")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--tensorboard", action="store_true",
                   help="write TensorBoard event files to OUT/tensorboard/ (scalars per logged step, op "
                        "probabilities per choice point as images per epoch)")
    ac = s.add_argument_group("anti-collapse (docs/anticollapse.md)")
    ac.add_argument("--hessian-eigenvalue", action="store_true",
                    help="log the dominant (and smallest) eigenvalue of the α-Hessian of the validation loss every "
                         "epoch, matrix-free by Lanczos (RobustDARTS); plotted in collapse.png")
    ac.add_argument("--hessian-iters", type=_positive, default=10, help="Lanczos steps (Hessian-vector products)")
    ac.add_argument("--stop", action="append", default=None, metavar="RULE",
                    help="early stopping: skips:N (DARTS+: N skip connections in the normal cell), stable:K "
                         "(DARTS+: op ranking unchanged for K epochs), eigen:K (DARTS-ES: the eigenvalue rose, "
                         "needs --hessian-eigenvalue); repeatable")
    ac.add_argument("--remedy", action="append", default=None, metavar="NAME[:KEY=VALUE,...]",
                    help="a remedy that changes the search step (dnas/remedies.py): darts_minus[:beta0=1] (DARTS-: "
                         "a decaying auxiliary skip), beta_decay[:weight=50] (beta-DARTS), sdarts[:mode=rs|adv,"
                         "epsilon=0.3] (SDARTS); repeatable. FairDARTS is --relaxation fair_darts")
    _run_args(s, "search")

    dv = sub.add_parser("derive", help="write a search run's derived architecture, alphas and pictures from its "
                                       "latest checkpoint (a run that died or was stopped)")
    dv.add_argument("run", help="the search run's directory")
    dv.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the latest readable)")

    sl = sub.add_parser("select", help="select the architecture of a search run by perturbation (DARTS-PT): per "
                                       "choice point the op whose removal costs the supernet most accuracy",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sl.add_argument("run", help="the search run's directory (its latest checkpoint is used)")
    sl.add_argument("--method", choices=["pt"], default="pt", help="pt: DARTS-PT (Wang et al., ICLR 2021)")
    sl.add_argument("--eval-examples", type=_positive, default=1024,
                    help="validation examples (of the architecture half) per accuracy measurement")
    sl.add_argument("--tune-steps", type=int, default=20, help="weight steps fine-tuning the supernet after each decision")
    sl.add_argument("--order", choices=["random", "fixed"], default="random", help="order of the choice points")
    sl.add_argument("--seed", type=int, default=None, help="which search of a --seeds run")
    sl.add_argument("--out", default=None, help="output directory (default RUN/select-pt)")
    sl.add_argument("--overwrite", action="store_true", help="replace an earlier selection in --out")

    _train_parser(sub)
    _reproduce_parser(sub)

    b = sub.add_parser("bench", help="time one compiled search step; prints one JSON object",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _space_args(b)
    b.add_argument("--batch-size", type=_positive, default=64)
    b.add_argument("--image-size", type=_positive, default=32)
    b.add_argument("--in-channels", type=_positive, default=3)
    b.add_argument("--num-classes", type=_positive, default=10)
    b.add_argument("--steps", type=_positive, default=5, help="timed steps after warm-up")
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--compile-cache", default="off", metavar="DIR|off",
                   help="persistent compilation cache (off by default, so compile_s is a cold compile)")
    _hypergrad_args(b)

    from dnas.latency.cli import add_latency_parser
    add_latency_parser(sub)
    return parser


def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="retrain a derived architecture from scratch (genotype.json or a search run "
                                     "directory)", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Train the network of a derived architecture from scratch on the whole training "
                                   "split and evaluate it on the test split every epoch. Unset optimisation flags "
                                   "take the space's evaluation protocol (DARTS: SGD 0.025, batch 96, drop path 0.2, "
                                   "cutout, auxiliary head 0.4; NAS-Bench-201: SGD Nesterov 0.1, batch 256, wd 5e-4; "
                                   "dnas/train.py). The papers train 600 (DARTS) / 200 (NAS-Bench-201) epochs.")
    t.add_argument("genotype", nargs="?", default=None, help="a genotype JSON file, a `dnas search` output directory (its dataset and, for "
                                    "the chain space, its space options are then the defaults), a NAS-Bench-201 "
                                    "arch string '|op~0|+|op~0|op~1|+...' or darts-v2 (the DARTS paper's cell)")
    t.add_argument("--dataset", default=None, help="as for `dnas search` (default: the search run's, else digits)")
    t.add_argument("--data-dir", default=None, help="tensorflow-datasets data dir")
    t.add_argument("--limit-examples", type=_positive, default=None, help="train on at most N examples (stratified)")
    t.add_argument("--epochs", type=_positive, default=20)
    t.add_argument("--max-steps", type=_positive, default=None, help="stop after N steps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--devices", type=_positive, default=1, help="data-parallel devices (batch split, state replicated)")
    t.add_argument("--out", default=None, help="output directory (default: runs/train-<timestamp>)")
    t.add_argument("--channels", type=_positive, default=None,
                   help="initial channels C (default: 16 for nb201, 36 for darts, as in the papers)")
    t.add_argument("--cells", type=_positive, default=None,
                   help="nb201: cells per stage N (default 5); darts: layers L (default 20)")
    t.add_argument("--conv-impl", choices=["auto", "native", "dense"], default="auto",
                   help="separable convolution formulation (see `dnas search --help`)")
    t.add_argument("--network-option", action="append", metavar="KEY=VALUE",
                   help="other option of the derived network (e.g. stem_multiplier=3; chain: width_mult=0.5)")
    o = t.add_argument_group("optimisation (default: the space's protocol)")
    o.add_argument("--batch-size", type=_positive, default=None)
    o.add_argument("--lr", type=float, default=None, help="initial learning rate (cosine-annealed to --lr-min)")
    o.add_argument("--lr-min", type=float, default=0.0)
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    o.add_argument("--weight-decay", type=float, default=None)
    o.add_argument("--grad-clip", type=float, default=None, help="global-norm clip (0: none)")
    o.add_argument("--drop-path", type=float, default=None, help="final drop-path probability (darts)")
    o.add_argument("--cutout", type=int, default=None, help="cutout square side in pixels (0: none)")
    o.add_argument("--auxiliary-weight", type=float, default=None, help="darts: auxiliary head loss weight (0: no head)")
    o.add_argument("--label-smoothing", type=float, default=None)
    t.add_argument("--nb201-table", default=None, metavar="CSV",
                   help="nb201: NAS-Bench-201's accuracy table; summary.json gets the benchmark's 200-epoch test "
                        "accuracies of the cell, for comparison")
    t.add_argument("--compile-cache", default=None, metavar="DIR|off", help="as for `dnas search`")
    t.add_argument("--no-augment", action="store_true", help="disable random crop / flip / cutout")
    t.add_argument("--log-every", type=_positive, default=10, help="write a step record every N steps")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto",
                   help="kernel formulations, as for dnas search (xla_cpu, native; auto: the backend's)")
    t.add_argument("--precision", choices=PRECISION_CHOICES, default="float32",
                   help="bfloat16: convolutions read bfloat16 (as for `dnas search`)")
    t.add_argument("--export", action="store_true",
                   help="write the trained network for serving: OUT/model.stablehlo (jax.export, serialized "
                        "StableHLO with a symbolic batch) and OUT/model.json (its input signature)")
    _run_args(t, "train")


def _reproduce_parser(sub) -> None:
    r = sub.add_parser("reproduce", help="reproduce a benchmark's rows of the DNAS methods (NAS-Bench-201)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Search NAS-Bench-201 with each method and seed under the benchmark's search "
                                   "protocol (dnas/reproduce.py), look every epoch's derived cell up in the "
                                   "benchmark's table and write report.md/.json and plots beside the published rows.")
    r.add_argument("benchmark", choices=["nb201"])
    r.add_argument("--dataset", required=True,
                   help="CIFAR-10: an image folder PATH with PATH/train/<class>/*.jpg, or a tensorflow-datasets name")
    r.add_argument("--data-dir", default=None, help="tensorflow-datasets data dir")
    r.add_argument("--nb201-table", required=True, metavar="CSV", help="NAS-Bench-201's accuracy table (NATS-Bench CSV)")
    r.add_argument("--methods", default="darts,gdas,snas,pc_darts,drnas",
                   help="comma-separated methods: the relaxations darts, gdas, snas, pc_darts, drnas, fair_darts, "
                        "first-order DARTS with a remedy (darts_minus, beta_darts, sdarts_rs, sdarts_adv, darts_pt), "
                        "or 'remedies' for DARTS and every remedy")
    r.add_argument("--seeds", type=_seed_list, default=(777, 888, 999), metavar="S1,S2,...")
    r.add_argument("--budget", choices=["paper", "cpu", "smoke"], default="cpu",
                   help="paper: the protocol itself; cpu: a proxy for 2 CPU cores (about an hour for 5 x 3); smoke: tests")
    r.add_argument("--epochs", type=_positive, default=None, help="override the budget's epochs")
    r.add_argument("--epochs-gdas", type=_positive, default=None, help="override GDAS's epochs (paper: 250)")
    r.add_argument("--limit-examples", type=_positive, default=None, help="override the budget's training subset")
    r.add_argument("--out", required=True, help="output directory (must be new or empty)")
    r.add_argument("--compile-cache", default=None, metavar="DIR|off", help="as for `dnas search`")
    r.add_argument("--no-progress", action="store_true")


def _methods(text: str) -> tuple:
    from dnas.reproduce import REMEDY_METHODS
    names = [m.strip() for m in text.split(",") if m.strip()]
    return tuple(n for m in names for n in (REMEDY_METHODS if m == "remedies" else (m,)))


def _cmd_reproduce(args) -> int:
    from dnas.data import DatasetError
    from dnas.nb201_table import NB201TableError
    from dnas.reproduce import ReproduceConfig, run_reproduce
    from dnas.searcher import NonFiniteLossError

    cfg = ReproduceConfig(dataset=args.dataset, nb201_table=args.nb201_table, out=args.out,
                          methods=_methods(args.methods),
                          seeds=tuple(args.seeds), budget=args.budget, epochs=args.epochs,
                          epochs_gdas=args.epochs_gdas, limit_examples=args.limit_examples,
                          data_dir=args.data_dir, progress=not args.no_progress)
    try:
        report = run_reproduce(cfg)
    except (DatasetError, NB201TableError, NonFiniteLossError, ValueError, OSError) as e:
        print(f"dnas reproduce: error: {e}", file=sys.stderr)
        return 2
    print((Path(args.out) / "report.md").read_text(encoding="utf-8"))
    print(f"outputs in {args.out}/ ({report['wall_time_s'] / 60:.1f} min)")
    return 0


def _train_cfg(args):
    """The :class:`~dnas.train.TrainConfig` the flags describe."""
    from dnas.train import TrainConfig

    net = _key_values(args.network_option, "--network-option")
    if args.channels:
        net["channels"] = args.channels
    if args.conv_impl != "auto":
        net["impl"] = args.conv_impl
    return TrainConfig(
        genotype=args.genotype, dataset=args.dataset, data_dir=args.data_dir, limit_examples=args.limit_examples,
        epochs=args.epochs, max_steps=args.max_steps, seed=args.seed, devices=args.devices, out=args.out,
        network_options=net, cells=args.cells, batch_size=args.batch_size, lr=args.lr, lr_min=args.lr_min, momentum=args.momentum,
        nesterov=args.nesterov, weight_decay=args.weight_decay, grad_clip=args.grad_clip, drop_path=args.drop_path,
        cutout=args.cutout, auxiliary_weight=args.auxiliary_weight, label_smoothing=args.label_smoothing,
        augment=not args.no_augment, log_every=args.log_every, progress=not args.no_progress,
        nb201_table=args.nb201_table, precision=args.precision, kernels=args.kernels,
        checkpoint_every=args.checkpoint_every, checkpoint_steps=args.checkpoint_steps, export=args.export)


def _cmd_train(args, cfg) -> int:
    from dnas.run import Preempted
    from dnas.train import run_train

    if not cfg.genotype:
        print("dnas train: error: give the genotype to train (a genotype JSON file, a search run directory, an "
              "NB201 arch string or darts-v2), a --config FILE or --resume RUN_DIR", file=sys.stderr)
        return 2
    try:
        summary = run_train(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    except Preempted as e:
        print(f"dnas train: {e}", file=sys.stderr)
        return 128 + e.signum
    except _user_errors() as e:
        print(f"dnas train: error: {e}", file=sys.stderr)
        return 2
    final = summary.get("final") or {}
    print(f"trained {summary['space']} network ({summary['params']:,} parameters): {json.dumps(summary['genotype'])}")
    if summary.get("final_test_acc") is not None:
        print(f"test accuracy: final {summary['final_test_acc']:.4f}, best {summary['best_test_acc']:.4f} "
              f"(train loss {final.get('train_loss', float('nan')):.3f})")
    if "nb201" in summary:
        print(f"NAS-Bench-201 (C=16, N=5, 200 epochs) CIFAR-10 test accuracy of this cell: "
              f"{summary['nb201']['cifar10']:.2f} %")
    if summary.get("compile_s") is not None:
        print(f"{summary['steps']} steps in {summary['wall_time_s']:.1f} s "
              f"(first step incl. compile {summary['compile_s']:.1f} s)")
    if "export" in summary:
        print(f"exported for serving: {summary['out']}/model.stablehlo (signature in model.json)")
    print(f"outputs in {summary['out']}/")
    return 0


def _set_host_devices(n: int) -> None:
    """Ask XLA for ``n`` CPU devices (only matters where there is no accelerator)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={n}").strip()


def enable_compile_cache(where: str | None) -> str | None:
    """Turn on JAX's persistent compilation cache in ``where`` (None: ``$DNAS_COMPILE_CACHE`` or
    ``~/.cache/dnas/jax``; ``"off"``: leave it off). Compiled search steps are stored keyed by
    the program and the jax/XLA versions, so rerunning a configuration (another seed, more
    epochs, a resumed run) skips the XLA compile. Returns the directory used, or None."""
    if where is None:
        where = os.environ.get("DNAS_COMPILE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dnas", "jax")
    if where.lower() == "off":
        return None
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)  # keeps the small eager programs too
    if before and before != where:   # JAX opens its cache once per process: reopen it in the new place
        compilation_cache.reset_cache()
    return where


def _search_cfg(args):
    """The :class:`~dnas.run.SearchConfig` the flags describe."""
    from dnas.run import SearchConfig
    from dnas.searcher import Hyper

    return SearchConfig(
        space=args.space, relaxation=args.relaxation, dataset=args.dataset, epochs=args.epochs,
        batch_size=args.batch_size, seed=args.seed, seeds=args.seeds, out=args.out, devices=args.devices,
        limit_examples=args.limit_examples, max_steps=args.max_steps,
        space_options=_space_options(args),
        hyper=Hyper(w_lr=args.w_lr, w_lr_min=args.w_lr_min, a_lr=args.a_lr, w_weight_decay=args.w_wd,
                    hyper_lr=args.hyper_lr),
        relaxation_options=_key_values(args.relaxation_option, "--relaxation-option"),
        hypergrad=args.hypergrad, hypergrad_options=_hypergrad_options(args), tune=_tune(args),
        latency=None if args.latency_table is None else {
            "table_path": args.latency_table, "loss": args.latency_loss, "target": args.latency_target,
            "weight": args.latency_weight, "input_size": args.latency_input_size,
            "space_options": _key_values(args.latency_space_option, "--latency-space-option")},
        augment=not args.no_augment, log_every=args.log_every, data_dir=args.data_dir,
        progress=not args.no_progress, nb201_table=args.nb201_table, precision=args.precision,
        loop=args.loop, chunk_steps=args.chunk_steps, kernels=args.kernels, checkpoint_every=args.checkpoint_every,
        checkpoint_steps=args.checkpoint_steps, tensorboard=args.tensorboard,
        hessian_eigenvalue=args.hessian_eigenvalue, hessian_iters=args.hessian_iters, stop=tuple(args.stop or ()),
        remedies=_remedies(args.remedy))


def _remedies(items) -> dict:
    """``["darts_minus", "sdarts:mode=adv,epsilon=0.2"]`` → ``{name: {option: value}}``."""
    from dnas.options import OptionError, key_values
    out = {}
    try:
        for item in items or []:
            name, _, rest = item.partition(":")
            name = name.strip().replace("-", "_")
            if not name:
                raise OptionError(f"--remedy {item!r}: the name is empty")
            if name in out:
                raise OptionError(f"--remedy {name} given twice")
            out[name] = key_values([kv for kv in rest.split(",") if kv.strip()], f"--remedy {name}")
    except OptionError as e:
        raise SystemExit(f"dnas: {e}") from None
    return out


#: The errors of a run that are the user's to fix: reported in one line, exit status 2.
def _user_errors():
    from dnas.data import DatasetError
    from dnas.nb201_table import NB201TableError
    from dnas.options import OptionError
    from dnas.plugins import PluginError
    from dnas.rundir import CheckpointError, RunDirError
    from dnas.searcher import NonFiniteLossError
    from dnas.supernet.genotype import GenotypeError
    return (DatasetError, NB201TableError, OptionError, PluginError, CheckpointError, RunDirError,
            NonFiniteLossError, GenotypeError, ValueError, OSError)


def _cmd_search(args, cfg) -> int:
    from dnas.run import Preempted, run_search

    try:
        summary = run_search(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    except Preempted as e:
        print(f"dnas search: {e}", file=sys.stderr)
        return 128 + e.signum
    except _user_errors() as e:
        print(f"dnas search: error: {e}", file=sys.stderr)
        return 2
    _print_search(summary, cfg.seed)
    return 0


#: A search whose final mean α entropy is at least this share of the uniform one's is reported
#: as undecided (the share docs/reproduce.md measures the default search against).
UNDECIDED = 0.9


def _print_search(summary: dict, seed: int) -> None:
    if "seeds" in summary:
        runs = zip(summary["seeds"], summary["genotypes"], summary["finals"], summary["alpha_entropies"])
    else:
        runs = [(seed, summary["genotype"], summary.get("final", {}), summary["alpha_entropy"])]
    for seed, g, final, h in runs:
        tag = f"seed {seed}: " if "seeds" in summary else ""
        print(f"{tag}derived architecture: {json.dumps(g)}")
        print(f"{tag}final epoch: train_acc={final.get('train_acc', float('nan')):.3f} "
              f"val_acc={final.get('val_acc', float('nan')):.3f}")
        if h["final"] >= UNDECIDED * h["uniform"]:
            print(f"{tag}note: alpha is still close to uniform (mean entropy {h['final']:.3f}, uniform "
                  f"{h['uniform']:.3f}), so this architecture is barely a decision: search longer or harder "
                  "data, or raise --a-lr (docs/reproduce.md)")
    if summary.get("compile_s") is not None:
        print(f"{summary['steps']} steps in {summary['wall_time_s']:.1f} s "
              f"(first step incl. compile {summary['compile_s']:.1f} s)")
    if "table_latency_ms" in summary:
        print(f"table latency of the derived architecture: {summary['table_latency_ms']:.2f} ms")
    if "nb201" in summary:
        b = summary["nb201"]
        print(f"NAS-Bench-201 (200 epochs) test accuracy of the derived cell: CIFAR-10 {b['cifar10']:.2f} %, "
              f"CIFAR-100 {b['cifar100']:.2f} %, ImageNet16-120 {b['imagenet16_120']:.2f} %")
    print(f"outputs in {summary['out']}/")


def _cmd_derive(args) -> int:
    from dnas.run import derive_run

    try:
        summary = derive_run(args.run, step=args.step).summary
    except _user_errors() as e:
        print(f"dnas derive: error: {e}", file=sys.stderr)
        return 2
    print(f"from the checkpoint of step {summary['steps']}:")
    _print_search(summary, 0)
    return 0


def _cmd_select(args) -> int:
    from dnas.select import PTOptions, select_run

    try:
        record = select_run(args.run, args.method, PTOptions(eval_examples=args.eval_examples,
                                                             tune_steps=args.tune_steps, order=args.order),
                            out=args.out, overwrite=args.overwrite, seed=args.seed)
    except _user_errors() as e:
        print(f"dnas select: error: {e}", file=sys.stderr)
        return 2
    for d in record["decisions"]:
        drops = ", ".join(f"{op} {100 * acc:.1f}" for op, acc in d["accuracy_without"].items())
        print(f"{d['group']}/{d['choice_point']}: accuracy {100 * d['accuracy']:.1f} %; without {drops} "
              f"-> {d['chosen']}")
    g = record["genotype"]
    print("selected:", g.get("arch") or g)
    if "nb201" in record:
        print("NAS-Bench-201: " + ", ".join(f"{k} {v:.2f}" for k, v in record["nb201"].items() if k != "index"))
    return 0


def _cmd_bench(args) -> int:
    from dnas.bench import run_bench
    from dnas.searcher import Hyper

    result = run_bench(args.space, args.relaxation, batch_size=args.batch_size, image_size=args.image_size,
                       in_channels=args.in_channels, num_classes=args.num_classes,
                       space_options=_space_options(args, "bench_defaults"), steps=args.steps,
                       warmup=args.warmup, num_devices=args.devices, seed=args.seed,
                       relaxation_options=_key_values(args.relaxation_option, "--relaxation-option"),
                       hypergrad=args.hypergrad, hypergrad_options=_hypergrad_options(args), tune=_tune(args),
                       hyper=Hyper(hyper_lr=args.hyper_lr), precision=args.precision, kernels=args.kernels)
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:   # the `dnas` command (not an in-process call): huge pages for XLA's buffers,
        from dnas.hugepages import reexec_with_hugepages   # and the measured XLA:CPU flags
        from dnas.xla_flags import apply_cpu_defaults
        reexec_with_hugepages()
        apply_cpu_defaults()
    args = build_parser().parse_args(argv)
    if args.command == "latency":
        from dnas.latency.cli import run_latency
        return run_latency(args)
    if args.command == "reproduce":
        enable_compile_cache(args.compile_cache)
        return _cmd_reproduce(args)
    if args.command == "derive":
        return _cmd_derive(args)
    if args.command == "select":
        return _cmd_select(args)
    cfg = None
    if args.command in ("search", "train"):   # the configuration first: a resumed run's --devices come from it
        if args.command == "search":
            from dnas.run import config_from_dict, saved_config
            build, default = _search_cfg, ["search"]
        else:
            from dnas.train import config_from_dict, saved_config
            build, default = _train_cfg, ["train"]
        try:
            cfg = _merge_config(args, build, build_parser().parse_args(default), args.command,
                                config_from_dict, saved_config)
        except _user_errors() as e:
            print(f"dnas {args.command}: error: {e}", file=sys.stderr)
            return 2
    _set_host_devices(cfg.devices if cfg is not None else args.devices)
    if args.command == "train":
        enable_compile_cache(args.compile_cache)
        return _cmd_train(args, cfg)
    if args.distributed or args.coordinator or args.num_processes or args.process_id is not None:
        from dnas.distributed import initialize
        try:
            initialize(args.coordinator, args.num_processes, args.process_id)
        except ValueError as e:
            print(f"dnas: error: {e}", file=sys.stderr)
            return 2
    enable_compile_cache(args.compile_cache)
    if args.command == "search":
        return _cmd_search(args, cfg)
    return _cmd_bench(args)


if __name__ == "__main__":
    sys.exit(main())
