"""The Python entry point: search a model (yours or a built-in space), get its architecture.

>>> result = dnas.search(Net(nnx.Rngs(0)), data="digits", relaxation="gdas", epochs=30, out="runs/mine")
>>> result.genotype                       # ChoiceGenotype: {"block": "conv5", ...}
>>> fixed = dnas.fix(model, result.genotype)

:func:`search` is ``dnas search`` from Python: the same run (:func:`dnas.run.search_run`), the
same output files, every option of :class:`dnas.run.SearchConfig` as a keyword.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class SearchResult:
    """What a search gives back: the derived architecture (one per seed with ``seeds``), the
    output directory, the summary (as in ``summary.json``), and the searcher and final state
    for further work (:meth:`supernet`)."""

    genotype: Any
    genotypes: list
    out: Path
    summary: dict
    searcher: Any
    state: Any

    def supernet(self, member: int = 0):
        """A user model's supernet (``nnx.Module``) holding the search's final weights and
        BatchNorm statistics (of seed ``member`` with several seeds)."""
        space = self.searcher.space
        if not hasattr(space, "module"):
            raise TypeError(f"the {space.name!r} space is not a Flax NNX model")
        state = self.searcher.member(self.state, member) if self.searcher.num_seeds > 1 else self.state
        from dnas.distributed import to_host
        return space.module(to_host(state.params), to_host(state.batch_stats))


def search(model, data: str | None = None, *, relaxation: str = "darts", hypergrad: str = "first",
           epochs: int = 30, out: str | None = None, resume: bool = False, overwrite: bool = False,
           **config) -> SearchResult:
    """Search ``model`` on ``data`` and write the run to ``out``.

    ``model``: a Flax NNX model with choice points (:mod:`dnas.nnx`), a factory ``rngs ->
    model`` (each seed then initialises its own weights), a built-in space name (``"nb201"``),
    or an import spec. ``data``: ``None``/``"digits"`` (embedded), an image-folder path or a
    prepared tensorflow-datasets name. ``config``: any other field of
    :class:`~dnas.run.SearchConfig` (``seeds``, ``devices``, ``batch_size``, ``tune``,
    ``latency``, ``hyper=dnas.searcher.Hyper(...)``, ...); an unknown one is an error.
    ``resume``: continue the run in ``out`` from its latest checkpoint (same configuration,
    only ``epochs``/``max_steps`` may differ); ``overwrite``: replace the run in ``out`` (an
    ``out`` holding a run is refused otherwise).
    """
    from dnas.run import SearchConfig, search_run

    fields = {f.name for f in dataclasses.fields(SearchConfig)}
    bad = sorted(set(config) - fields)
    if bad:
        raise TypeError(f"dnas.search() got unknown option(s) {bad}; options: {sorted(fields - {'space', 'dataset'})}")
    cfg = SearchConfig(space=model, dataset=data, relaxation=relaxation, hypergrad=hypergrad, epochs=epochs,
                       out=out, **config)
    run = search_run(cfg, resume=resume, overwrite=overwrite)
    return SearchResult(genotype=run.genotypes[0], genotypes=run.genotypes, out=Path(run.summary["out"]),
                        summary=run.summary, searcher=run.searcher, state=run.state)
