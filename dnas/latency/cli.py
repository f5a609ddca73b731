"""``dnas latency {profile, fit, validate, show, tables}``: the latency-table commands.

Wired into the ``dnas`` command by ``dnas/cli.py``::

    from dnas.latency.cli import add_latency_parser, run_latency
    add_latency_parser(sub)                                   # in build_parser()
    if args.command == "latency": return run_latency(args)    # in main()

JAX is imported only when a command runs (``--devices`` handling in ``dnas/cli.py`` must
come first).
"""
from __future__ import annotations

import argparse
import json
import sys


def _space_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", required=True,
                   help="search space: nb201, darts, chain, or a user's space by import spec 'my_pkg.module:factory' "
                        "(profile: a table keyed by choice point, docs/own_model.md)")
    p.add_argument("--space-option", action="append", metavar="KEY=VALUE",
                   help="option of a space given by spec or registered name (repeatable)")
    p.add_argument("--in-channels", type=int, default=None,
                   help="input channels (a user's space: default 3; built-in spaces: the space's)")
    p.add_argument("--channels", type=int, default=None, help="nb201/darts: initial channels C (default: the space's)")
    p.add_argument("--cells", type=int, default=None,
                   help="nb201: cells per stage; darts: number of cells; chain: max blocks per stage")
    p.add_argument("--width-mult", type=float, default=None, help="chain: width multiplier (1.0 = ProxylessNAS mobile)")
    p.add_argument("--stem-stride", type=int, default=None, help="chain: stride of the first conv (2 at 224 px, 1 at 32 px)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the space's; a user's space: 10)")
    p.add_argument("--conv-impl", choices=["auto", "native", "dense"], default="auto",
                   help="separable convolution formulation: native (depthwise then pointwise; on CPU as shifted "
                        "views and a matrix product), dense (one convolution with the fused kernel); auto = native, "
                        "except dense on CPU inside sampled ops' conditionals, in scanned cells with unrolled edges and "
                        "for --seeds")
    p.add_argument("--input-size", type=int, default=None,
                   help="input resolution H=W (default: the table's, else 32 for nb201/darts, 224 for chain)")


def space_options(args) -> dict:
    """Space options from the flags: the same rules as ``dnas search`` (``dnas.cli._space_options``)
    but with the space's own defaults (the full ProxylessNAS chain, NB201 C=16 N=5, DARTS C=16
    8 cells) unless a flag says otherwise."""
    from dnas.cli import _space_options
    from dnas.supernet.spaces import SPACES

    ns = argparse.Namespace(space=args.space, channels=args.channels, cells=args.cells, width_mult=args.width_mult,
                            conv_impl=args.conv_impl, stem_stride=args.stem_stride,
                            space_option=getattr(args, "space_option", None))
    opts = _space_options(ns, None)
    if args.space not in SPACES:   # a user's space
        opts.update(in_channels=args.in_channels or 3, num_classes=args.num_classes or 10)
        return opts
    if args.in_channels is not None:
        opts["in_channels"] = args.in_channels
    if args.num_classes is not None:
        opts["num_classes"] = args.num_classes
    return opts


def add_latency_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``latency`` with its sub-commands to a ``dnas`` sub-parser collection."""
    lat = subparsers.add_parser("latency", help="latency lookup tables: profile, fit, validate, show, tables",
                                description="Latency lookup tables for latency-aware search (docs/latency.md).")
    sub = lat.add_subparsers(dest="latency_command", required=True)

    p = sub.add_parser("profile", help="measure every candidate op of a space on the current JAX backend",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _space_arguments(p)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20, help="timed repeats per op (median taken)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls after compilation")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--method", choices=["context", "isolated"], default="context",
                   help="context: each op's marginal cost in a dependent chain of --chain copies (the launch cost of "
                        "an executable cancels); isolated: each op alone, minus an empty call's dispatch overhead")
    p.add_argument("--chain", type=int, default=8, help="copies in the chain of the context method")
    p.add_argument("--statistic", choices=["median", "min"], default="median",
                   help="statistic of the per-call times over the repeats")
    p.add_argument("--rounds", type=int, default=1,
                   help="take the repeats in this many round-robin passes over all ops (spreads bursts of load)")
    p.add_argument("--keep-overhead", action="store_true",
                   help="do not subtract the dispatch overhead of an empty jitted call (isolated method: from every "
                        "op; both: from the networks validate times)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="table JSON to write")

    f = sub.add_parser("fit", help="learn an additive per-op table from per-architecture latencies (NAS-Bench-201)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    f.add_argument("--csv", default=None, help="per-architecture latencies, one column per device "
                                               "(default: ../shared/data/nb201/latency_per_arch_ms.csv)")
    f.add_argument("--archs", default=None, help="architecture strings in the same row order "
                                                 "(default: ../shared/data/nb201/nats_bench_200ep.csv)")
    f.add_argument("--train-frac", type=float, default=0.2)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--devices", default=None, help="comma list of device columns (default: all)")
    f.add_argument("--model", choices=["choice_point", "op", "both"], default="both",
                   help="per (edge, op) costs, per op costs, or both (compared in the report)")
    f.add_argument("--tables", default=None, metavar="DIR",
                   help="also write one fitted table per device, DIR/<device>.json (choice_point model unless "
                        "--model op)")
    f.add_argument("--out", default=None, help="write the JSON report here too (it is always printed)")

    v = sub.add_parser("validate", help="predicted vs measured latency of random architectures (JSON)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _space_arguments(v)
    v.add_argument("--table", required=True, help="latency table (dnas JSON, ProxylessNAS/OFA YAML, FBNet list) "
                                                  "or the name of a shipped table (dnas latency tables)")
    v.add_argument("--archs", type=int, default=20, help="number of random architectures")
    v.add_argument("--batch-size", type=int, default=None, help="default: the table's")
    v.add_argument("--repeats", type=int, default=10)
    v.add_argument("--warmup", type=int, default=2)
    v.add_argument("--rounds", type=int, default=1,
                   help="take the repeats in this many round-robin passes over all networks")
    v.add_argument("--statistic", choices=["median", "min"], default=None, help="default: the table's")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--no-progress", action="store_true")
    v.add_argument("--full", action="store_true", help="include every architecture's record in the JSON")
    v.add_argument("--out", default=None, help="write the JSON here too")

    s = sub.add_parser("show", help="check a table against a space: coverage, fixed and per-choice-point latencies")
    _space_arguments(s)
    s.add_argument("--table", required=True)

    sub.add_parser("tables", help="list the latency tables shipped with dnas (usable by name: --table NAME)")
    return lat


def _build(args):
    from dnas.supernet.spaces import build_space

    return build_space(args.space, **space_options(args))


def _dump(obj, out: str | None) -> None:
    text = json.dumps(obj, indent=1, default=_default)
    print(text)
    if out:
        from pathlib import Path
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n", encoding="utf-8")


def _default(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, (tuple, set)):
        return list(x)
    return str(x)


def run_latency(args) -> int:
    """Run a parsed ``dnas latency ...`` command; returns the exit status."""
    from dnas.latency.table import LatencyTableError

    try:
        return _COMMANDS[args.latency_command](args)
    except (LatencyTableError, ValueError) as e:
        print(f"dnas latency {args.latency_command}: error: {e}", file=sys.stderr)
        return 2


def _profile(args) -> int:
    from dnas.latency.profile import profile_space

    space = _build(args)
    if not hasattr(space, "latency_walk"):   # a user's Flax model: a table keyed by choice point
        from dnas.latency.nnx_profile import profile_choice_points
        table = profile_choice_points(space, (args.input_size or 32, args.input_size or 32, args.in_channels or 3),
                                      batch_size=args.batch_size, repeats=args.repeats, warmup=args.warmup,
                                      seed=args.seed, statistic=args.statistic, subtract_overhead=not args.keep_overhead,
                                      progress=not args.no_progress)
        table.save(args.out)
        total = sum(e["mean_ms"] for e in table.entries.values())
        print(f"wrote {args.out}: {len(table)} entries keyed by choice point ({table.meta['backend']}, batch "
              f"{args.batch_size}, input {table.meta['input_size']}; sum of entries {total:.3f} ms)")
        return 0
    table = profile_space(space, batch_size=args.batch_size, input_size=args.input_size, repeats=args.repeats,
                          warmup=args.warmup, dtype=args.dtype, subtract_overhead=not args.keep_overhead,
                          progress=not args.no_progress, seed=args.seed, method=args.method, chain=args.chain,
                          rounds=args.rounds, statistic=args.statistic)
    table.save(args.out)
    total = sum(e["mean_ms"] for e in table.entries.values())
    print(f"wrote {args.out}: {len(table)} entries ({table.meta['backend']}, {table.meta['device_kind']}, "
          f"batch {args.batch_size}, input {table.meta['input_size']}; sum of entries {total:.3f} ms, "
          f"dispatch overhead {table.meta['overhead_ms']:.4f} ms; load {table.meta['load']})")
    return 0


def _fit(args) -> int:
    from pathlib import Path

    from dnas.latency import fit as F

    models = F.MODELS if args.model == "both" else (args.model,)
    table_model = None if not args.tables else ("op" if args.model == "op" else "choice_point")
    report, tables = F.fit_nb201(args.csv or F.DEFAULT_CSV, args.archs or F.DEFAULT_ARCHS, args.train_frac, args.seed,
                                 args.devices.split(",") if args.devices else None, models, table_model)
    for device, table in tables.items():
        table.save(Path(args.tables) / f"{device}.json")
    _dump(report, args.out)
    return 0


def _validate(args) -> int:
    from dnas.latency.profile import validate
    from dnas.latency.published import load_table

    table = load_table(args.table)
    result = validate(table, _build(args), n_archs=args.archs, batch_size=args.batch_size,
                      input_size=args.input_size, seed=args.seed, repeats=args.repeats, warmup=args.warmup,
                      progress=not args.no_progress, rounds=args.rounds, statistic=args.statistic)
    if not args.full:
        result = {k: v for k, v in result.items() if k not in ("archs", "table_meta")}
    _dump(result, args.out)
    return 0


def _show(args) -> int:
    from dnas.latency.published import load_table
    from dnas.latency.space_latency import latency_matrix

    table = load_table(args.table)
    mats, fixed = latency_matrix(_build(args), table, args.input_size)
    _dump({"table": table.name, "meta": {k: v for k, v in table.meta.items() if k != "layers"},
           "fixed_ms": fixed, "min_ms": fixed + sum(float(m.min(axis=1).sum()) for m in mats.values()),
           "max_ms": fixed + sum(float(m.max(axis=1).sum()) for m in mats.values()),
           "matrix_ms": {g: m.round(4).tolist() for g, m in mats.items()}}, None)
    return 0


def _tables(args) -> int:
    from dnas.latency.published import load_table, shipped_tables

    out = {}
    for name, path in shipped_tables().items():
        m = load_table(path).meta
        v = m.get("validation") or {}
        out[name] = {"space": m.get("space"), "device_kind": m.get("device_kind"), "batch_size": m.get("batch_size"),
                     "input_size": m.get("input_size"), "profile_method": m.get("profile_method"),
                     "statistic": m.get("statistic"), "date": m.get("date"),
                     "validation": {k: v.get(k) for k in ("n_archs", "spearman", "mape")} if v else None,
                     "file": str(path)}
    _dump(out, None)
    return 0


_COMMANDS = {"profile": _profile, "fit": _fit, "validate": _validate, "show": _show, "tables": _tables}


def main(argv=None) -> int:
    """Stand-alone entry point (``python -m dnas.latency.cli profile ...``)."""
    parser = argparse.ArgumentParser(prog="dnas")
    add_latency_parser(parser.add_subparsers(dest="command", required=True))
    return run_latency(parser.parse_args(["latency", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
