"""A run's directory: claimed once, written atomically, checkpointed only when finite.

What a long search or training run needs from its output directory, kept in one place so that
``dnas search``, ``dnas train`` and ``dnas derive`` behave alike:

* :func:`claim_out` — an ``--out`` that already holds a run is refused (rerunning into it would
  mix two runs' metrics and checkpoints) unless the caller resumes it or asked to overwrite it;
  nothing is created before the inputs were validated (the caller claims the directory last).
* :func:`write_text_atomic` / :func:`atomic_path` — every output file is written to a temporary
  name in the same directory and renamed over the target, so a kill leaves the old file or the
  new one, never half of one.
* :func:`save_checkpoint` / :func:`restore_latest` — orbax checkpoints of the whole state plus
  the run's progress (what is needed to continue exactly: the step, the epoch, the epoch's
  running sums, the length of every log). Every array is checked finite before it is written
  (:func:`check_state_finite`), so the latest checkpoint is always a good one; a checkpoint
  that cannot be read is named and the previous one is used.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from dnas.searcher import NonFiniteLossError

#: Files whose presence marks a directory as holding a dnas run.
RUN_MARKERS = ("config.json", "metrics.jsonl", "checkpoints", "summary.json")


class RunDirError(ValueError):
    """An output directory that cannot be used as asked (a used ``--out``, a missing run)."""


class CheckpointError(ValueError):
    """No checkpoint of a run could be read."""


class LayoutError(CheckpointError):
    """A checkpoint whose stacked weights are in another order than this run's, or whose order
    was not recorded: restoring it would load permuted weights."""


class DivergedError(NonFiniteLossError):
    """A quantity of the state or a logged metric is NaN or infinite; nothing was saved."""


# ------------------------------------------------------------------------------ the directory

def holds_run(out: Path) -> bool:
    return out.is_dir() and any((out / m).exists() for m in RUN_MARKERS)


def claim_out(out: Path, *, resume: bool = False, overwrite: bool = False, command: str = "search") -> None:
    """Make ``out`` the run's directory.

    A new run needs a missing or empty directory, or ``overwrite`` (which deletes a previous
    run's files; a non-empty directory that holds no run is never deleted). ``resume`` needs
    a directory holding a run. Call this after every input was validated, so that an input
    error leaves nothing behind."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other")
    if resume:
        if not holds_run(out):
            raise RunDirError(f"--resume {out}: no run there (no config.json or checkpoints)")
        return
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not holds_run(out):
            raise RunDirError(f"--out {out} is not empty and holds no dnas run; choose another --out "
                              "(dnas deletes only its own runs, with --overwrite)")
        if not overwrite:
            raise RunDirError(f"--out {out} already holds a run; continue it with `dnas {command} --resume "
                              f"{out}`, choose another --out, or replace it with --overwrite")
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def refuse_changes(saved, cfg, allowed, out) -> None:
    """Refuse to resume the run in ``out`` (its configuration ``saved``) under ``cfg`` when the
    two dataclass configurations differ in a field outside ``allowed``, naming each difference
    (dotted for nested fields) with both values."""
    from dnas.options import differences

    def value(c, name):
        for part in name.split("."):
            c = getattr(c, part)
        return c
    diff = [d for d in differences(saved, cfg) if d.split(".")[0] not in allowed]
    if diff:
        listed = "; ".join(f"{d}: run {value(saved, d)!r}, now {value(cfg, d)!r}" for d in diff)
        raise RunDirError(f"cannot resume {out}: the configuration differs ({listed}); only "
                          f"{', '.join(allowed[:2])} may change (or start a new run)")


# ------------------------------------------------------------------------------ atomic files

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path`` (same suffix, for writers that look at it) and
    rename it over ``path`` once the block succeeded; on an error the temporary is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def truncate_lines(path: Path, n: int) -> None:
    """Keep the first ``n`` lines of ``path`` (a log cut back to a checkpoint's step)."""
    if not path.is_file():
        if n:
            raise CheckpointError(f"{path} is missing but the checkpoint counts {n} line(s) of it")
        return
    lines = path.read_bytes().splitlines(keepends=True)
    if len(lines) < n:
        raise CheckpointError(f"{path} has {len(lines)} line(s), fewer than the {n} its checkpoint counts")
    write_text_atomic(path, b"".join(lines[:n]).decode("utf-8"))


# ------------------------------------------------------------------------------ finiteness

def _leaf_name(path) -> str:
    import jax
    return jax.tree_util.keystr(path, simple=True, separator="/")


def first_nonfinite(tree) -> str | None:
    """The path (``params/cell0/edge2/conv/w``) of the first floating-point leaf of ``tree``
    holding a NaN or an infinity, or None when every leaf is finite. Runs on the host copy.
    A leaf of stacked same-shaped arrays (``params/float32[3,3,16,16]``,
    :mod:`dnas.supernet.stacked_leaves`) is named with its first bad entry (``entry 7``)."""
    import jax

    from dnas.distributed import to_host
    from dnas.supernet.stacked_leaves import is_group_name
    for path, leaf in jax.tree_util.tree_flatten_with_path(to_host(tree))[0]:
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.floating) or a.dtype.kind == "V":   # "V": bfloat16 from ml_dtypes
            finite = np.isfinite(a.astype(np.float32))
            if not np.all(finite):
                name = _leaf_name(path)
                if a.ndim and is_group_name(name.rsplit("/", 1)[-1]):   # stacked layers: which one
                    name += f" entry {int(np.argmin(finite.reshape(len(a), -1).all(axis=1)))}"
                return name
    return None


def check_state_finite(state, step: int, what: str = "search") -> None:
    """Raise :class:`DivergedError` naming ``step`` and the first non-finite array of ``state``
    (a NamedTuple of pytrees: weights, BatchNorm statistics, α, optimizer states)."""
    tree = state._asdict() if hasattr(state, "_asdict") else state
    bad = first_nonfinite(tree)
    if bad is not None:
        raise DivergedError(f"the {what} diverged by step {step}: {bad} holds NaN or inf (try a lower learning "
                            "rate or check the data); no checkpoint was written for this step, the latest one "
                            "is the last good state")


# ------------------------------------------------------------------------------ checkpoints

def _manager(ckpt_dir: Path, max_to_keep: int | None = None):
    import jax
    import orbax.checkpoint as ocp

    solo = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                              active_processes={jax.process_index()})
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=False, multiprocessing_options=solo)
    return ocp.CheckpointManager(ckpt_dir.resolve(), options=opts)


def save_checkpoint(ckpt_dir: str | os.PathLike, state, step: int, progress: dict | None = None,
                    max_to_keep: int = 2, what: str = "search", layout: str | None = None) -> Path:
    """Save ``state`` (a NamedTuple: the search's, or ``dnas train``'s), copied to the host, and
    the run's ``progress`` (JSON) as one orbax checkpoint ``ckpt_dir/<step>``, after checking
    every array finite. orbax writes to a temporary directory and renames it when complete, so
    a kill during the save leaves the previous checkpoints as they were. ``layout``: the
    fingerprint of the order of the state's stacked weights
    (:meth:`~dnas.supernet.stacked_leaves.WeightLayout.fingerprint`), recorded in the progress
    for :func:`restore_latest` to compare.

    Under ``jax.distributed`` only process 0 calls this (the state is replicated); orbax is
    told so, so it waits for no other process."""
    import orbax.checkpoint as ocp

    from dnas.distributed import to_host
    check_state_finite(state, step, what)
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    mgr = _manager(ckpt_dir, max_to_keep)
    mgr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(to_host(state._asdict())),
                                                progress=ocp.args.JsonSave(dict(
                                                    progress or {}, step=int(step),
                                                    **({} if layout is None else {"layout": layout})))),
             force=True)
    mgr.wait_until_finished()
    mgr.close()
    return ckpt_dir / str(int(step))


def checkpoint_steps(ckpt_dir: str | os.PathLike) -> list[int]:
    """The steps of the complete checkpoints in ``ckpt_dir``, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _leaf_names(tree, parts=("params", "batch_stats")) -> list[str]:
    import jax
    return sorted(_leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path({k: tree.get(k) for k in parts})[0])


def _check_layout(ckpt_dir: Path, template: dict, step: int) -> None:
    """Refuse a checkpoint whose weights or BatchNorm statistics are other arrays than this
    run's (another model, an NNX model's weights written per layer by a dnas before
    :mod:`dnas.supernet.stacked_leaves`, or the chain's or NAS-Bench-201's weights from before
    those spaces were NNX models), naming the first difference; orbax's own error for it does not say what is
    wrong."""
    import orbax.checkpoint as ocp
    try:
        with ocp.StandardCheckpointer() as reader:
            meta = reader.metadata(ckpt_dir / str(step) / "state")
    except Exception:  # noqa: BLE001 — unreadable metadata: the restore itself reports it
        return
    saved = getattr(meta, "item_metadata", meta)
    saved = getattr(saved, "tree", saved)
    if not isinstance(saved, dict):
        return
    have, want = _leaf_names(saved), _leaf_names(template)
    if have != want:
        extra, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
        first = "; ".join(([f"it has {extra[0]!r}"] if extra else []) + ([f"this run {missing[0]!r}"] if missing else []))
        raise CheckpointError(f"other weights than this run's ({len(have)} arrays against {len(want)}; {first}): "
                              "another model's, or an older dnas's layout of it (an NNX model's per-layer arrays, "
                              "the chain or nb201 space's SearchSpace module); start a new run")


def _check_order(where: Path, progress: dict, layout: str | None) -> None:
    """Refuse a checkpoint whose stacked weights are in another order than ``layout`` says this
    run's are, or whose order was not recorded (a dnas before checkpoints recorded it): names and
    shapes, which :func:`_check_layout` compares, are the same for any order."""
    if layout is None:
        return
    saved = progress.get("layout")
    if saved is None:
        raise LayoutError(f"checkpoint {where} does not record the order of its stacked weights (written by a dnas "
                          "before checkpoints recorded it), so it may hold them permuted; start a new run")
    if saved != layout:
        raise LayoutError(f"checkpoint {where} stacks its weights in another order than this run (layout {saved}, "
                          f"this run's {layout}): another model's, or another dnas's layout of it; start a new run")


def _restore(ckpt_dir: Path, template, step: int, layout: str | None = None):
    import orbax.checkpoint as ocp

    from dnas.distributed import to_host
    _check_layout(ckpt_dir, template._asdict(), step)
    mgr = _manager(ckpt_dir)
    try:
        restored = mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(to_host(template._asdict())), progress=ocp.args.JsonRestore()))
    finally:
        mgr.close()
    progress = dict(restored["progress"] or {})
    _check_order(ckpt_dir / str(step), progress, layout)
    return type(template)(**restored["state"]), progress


def restore_checkpoint(ckpt_dir: str | os.PathLike, template, step: int | None = None, layout: str | None = None):
    """The state saved at ``step`` (default: the latest) into the type of ``template``; a
    checkpoint that cannot be read raises :class:`CheckpointError` naming the run and step."""
    return restore_latest(ckpt_dir, template, step=step, layout=layout)[0]


def restore_latest(ckpt_dir: str | os.PathLike, template, step: int | None = None, fallback: bool = True,
                   layout: str | None = None):
    """``(state, progress, step)`` of the latest readable checkpoint (or of ``step``).

    A checkpoint that cannot be read (a truncated file, a structure that is not ``template``'s,
    non-finite arrays) is reported with a warning naming it and, with ``fallback``, the
    previous one is tried; :class:`CheckpointError` when none can be read. ``layout``: this
    run's order of stacked weights (:func:`save_checkpoint`); a checkpoint that records
    another, or none, raises :class:`LayoutError` at once (the run's other checkpoints share it)."""
    ckpt_dir = Path(ckpt_dir)
    steps = checkpoint_steps(ckpt_dir)
    if step is not None:
        steps, fallback = [s for s in steps if s == int(step)], False
    if not steps:
        raise CheckpointError(f"no checkpoint{'' if step is None else f' of step {step}'} in {ckpt_dir}")
    errors = []
    for s in reversed(steps):
        try:
            state, progress = _restore(ckpt_dir, template, s, layout)
            check_state_finite(state, s)
            return state, progress, s
        except LayoutError:
            raise
        except Exception as e:  # noqa: BLE001 — orbax raises many kinds; all mean "unreadable"
            msg = f"checkpoint {ckpt_dir / str(s)} cannot be restored: {type(e).__name__}: {str(e)[:300]}"
            errors.append(msg)
            if not fallback:
                raise CheckpointError(msg) from e
            warnings.warn(msg + "; trying the previous one", stacklevel=2)
    raise CheckpointError("no readable checkpoint: " + "; ".join(errors))


def discard_after(ckpt_dir: str | os.PathLike, step: int) -> list[int]:
    """Delete the checkpoints after ``step`` (unreadable ones a resume fell back past, which
    the continued run will write again); returns their steps."""
    gone = [s for s in checkpoint_steps(ckpt_dir) if s > int(step)]
    for s in gone:
        shutil.rmtree(Path(ckpt_dir) / str(s))
    return gone


__all__ = ["discard_after", "RunDirError", "CheckpointError", "LayoutError", "DivergedError", "claim_out", "atomic_path", "write_text_atomic",
           "write_json_atomic", "refuse_changes", "save_checkpoint", "restore_checkpoint", "restore_latest", "checkpoint_steps",
           "check_state_finite", "first_nonfinite", "count_lines", "truncate_lines", "holds_run"]
