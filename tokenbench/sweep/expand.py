"""Expansion: a sweep's entries as concrete runs.

The cross product of every entry's parameter grids, for every model.  A method that
declares a budget knob (``knob``) and whose entry does not fix it gets one run per FLOPs
target, at the value the matched-FLOPs search finds (:class:`.search.FlopsSearch`); an
entry that lists values of its knob runs those values (and, with an explicit
``flops_targets`` of its own, the targets too).  Non-deterministic methods run once per
seed (over the parameter they declare as ``seed_param``; throughput is timed for the first
seed only: the seed changes which tokens are kept, not how many).  A method entry with
``checkpoints`` runs each checkpointed value with its checkpoint; a FLOPs target picks a
checkpointed value when one lands within the tolerance.  Runs without a checkpoint for a
learned method measure its untrained parts (the table says so).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..errors import UserError
from .format import DENSE_METHOD, MethodEntry, Sweep, entry_targets
from .search import FlopsSearch
from ..report.render import fmt_value

if TYPE_CHECKING:
    from ..registry import Method


@dataclass
class Run:
    """One model x method x parameters: measured for each of the sweep's kinds."""

    label: str
    model: str
    method: str
    params: dict
    img_size: Optional[int] = None
    pretrained: bool = False
    checkpoint: Optional[str] = None
    targets: list[float] = field(default_factory=list)
    search: Optional[dict] = None        # the matched-FLOPs search's answer for this run
    seed_param: Optional[str] = None     # the parameter varied over seeds (non-deterministic methods)
    seed_index: int = 0
    per_image: bool = False              # its token count depends on the image: FLOPs and timings on real images
    line_of: Optional[str] = None        # a dense_family model's dense run: the model whose plot it joins
    untimed: bool = False                # not timed here: outside the sweep's time_by_default, timings unrecorded

    def spec(self) -> dict:
        from ..runner import spec_dict

        return spec_dict(self.model, self.method, self.params, self.pretrained, self.checkpoint, self.img_size)

    def identity(self) -> str:
        from ..store import canonical

        return canonical(self.spec())

    @property
    def name(self) -> str:
        shown = ", ".join(f"{k}={fmt_value(v)}" for k, v in self.params.items())
        s = self.label + (f" ({shown})" if shown else "")
        if self.targets:
            s += " @" + "/".join(f"{t:g}" for t in self.targets)
        return s


def count_searches(sw: Sweep) -> int:
    """How many matched-FLOPs searches :func:`expand` makes (each answered from the cache when it can)."""
    from ..registry import get_method
    from .dense import is_skipped

    n = 0
    for model in sw.models:
        for e in sw.methods:
            if is_skipped(sw, e, model):
                continue
            cls = get_method(e.method)
            combos = math.prod(len(v) for k, v in e.grid.items() if k != cls.knob)
            n += combos * len(entry_targets(sw, e, cls))
    return n


class _Progress:
    """Reports the searches to ``on_search(done, total, what, counts)``: before each search, after
    each FLOPs count the searcher makes, and once at the end."""

    def __init__(self, searcher: FlopsSearch, on_search: Optional[Callable[[int, int, str, int], None]],
                 total: int) -> None:
        self.searcher, self.on_search, self.total = searcher, on_search, total
        self.done, self.what = 0, ""
        self.outer_on_count = searcher.on_count
        if on_search:
            searcher.on_count = self.tell

    def tell(self, counts: Optional[int] = None) -> None:
        if self.on_search:
            self.on_search(self.done, self.total, self.what, self.searcher.counts if counts is None else counts)

    def finish(self) -> None:
        self.what = ""
        self.tell()
        self.searcher.on_count = self.outer_on_count


class _Collected:
    """The runs so far, one per identity: asking again for a run adds its targets (and search)."""

    def __init__(self) -> None:
        self.runs: list[Run] = []
        self.seen: dict[str, Run] = {}

    def add(self, run: Run) -> None:
        ident = run.identity()
        if ident in self.seen:
            old = self.seen[ident]
            old.targets = sorted(set(old.targets) | set(run.targets))
            if run.search and not old.search:
                old.search = run.search
            return
        self.seen[ident] = run
        self.runs.append(run)


def _dense_runs(sw: Sweep, model: str) -> list[Run]:
    """The dense model, and the other dense sizes drawn as a line on this model's plot."""
    runs = [Run(label="dense", model=model, method=DENSE_METHOD, params={}, img_size=sw.img_size,
                pretrained=sw.pretrained)] if sw.dense else []
    return runs + [Run(label=other, model=other, method=DENSE_METHOD, params={}, img_size=sw.img_size,
                       pretrained=sw.pretrained, line_of=model) for other in sw.dense_family]


def _entry_seeds(sw: Sweep, e: MethodEntry, cls: type[Method]) -> tuple[Optional[str], list]:
    """(the seed parameter the sweep expands, its seeds): a seeded method runs once per seed, unless
    its entry fixes the seed itself; a seed that only breaks ties runs at its first seed."""
    seed_p = cls.seed_param if (cls.seed_param and cls.seed_param not in e.grid) else None
    seeds = (e.seeds or sw.seeds) if seed_p else [None]
    if seed_p and cls.seed_breaks_ties and not e.seeds:
        seeds = seeds[:1]  # more seeds would measure one result again (an entry's own seeds are honoured)
    return seed_p, seeds


def _knob_values(sw: Sweep, e: MethodEntry, cls: type[Method], model: str, fixed: dict,
                 searcher: FlopsSearch, progress: _Progress) -> list[tuple[Any, list, Optional[dict]]]:
    """(knob value or None for the default, FLOPs targets it meets, search info) for one setting of
    the other parameters (``fixed``, the first seed included): the grid's values, one search per
    target, the checkpoints' values."""
    knob = cls.knob
    values: list[tuple[Any, list, Optional[dict]]] = []
    if knob and knob in e.grid:
        values += [(v, [], None) for v in e.grid[knob]]
    ck_vals = [json.loads(k) for k in e.checkpoints]
    for t in entry_targets(sw, e, cls):
        progress.what = f"{e.label}: {knob} for {t:g} x dense" + (f" on {model}" if len(sw.models) > 1 else "")
        progress.tell()
        res = searcher.search(model, sw.img_size, cls, fixed, knob, t, sw.flops_tolerance,
                              preferred=ck_vals, weights=(sw.pretrained, e.checkpoint))
        values.append((res.value, [t], res.as_dict()))
        progress.done += 1
    if not values:
        values.append((None, [], None))
    chosen = {json.dumps(v) for v, _, _ in values}
    return values + [(v, [], None) for v in ck_vals if json.dumps(v) not in chosen]


def _entry_runs(sw: Sweep, e: MethodEntry, cls: type[Method], model: str, fixed: dict,
                values: list[tuple[Any, list, Optional[dict]]], seed_p: Optional[str], seeds: list,
                searcher: FlopsSearch) -> list[Run]:
    """One run per knob value and seed, with its checkpoint (which must exist)."""
    knob, runs = cls.knob, []
    for v, tg, info in values:
        for i, seed in enumerate(seeds):
            params = dict(fixed)
            if v is not None:
                params[knob] = v
            if seed_p:
                params[seed_p] = seed
            params = cls.validate(params)
            ck = e.checkpoint
            if knob and e.checkpoints:
                ck = e.checkpoints.get(json.dumps(params[knob]), None)
            if ck is not None and not Path(ck).is_file():
                raise UserError(f"{sw.source}: [methods.{e.label}]: checkpoint {ck} does not exist")
            runs.append(Run(label=e.label, model=model, method=e.method, params=params, img_size=sw.img_size,
                            pretrained=sw.pretrained, checkpoint=ck, targets=list(tg),
                            search=dict(info) if info else None, seed_param=seed_p, seed_index=i,
                            per_image=searcher.per_image(model, sw.img_size, e.method, params)))
    return runs


def expand(sw: Sweep, searcher: Optional[FlopsSearch] = None,
           on_search: Optional[Callable[[int, int, str, int], None]] = None) -> list[Run]:
    """Every run of the sweep (dense first), matched-FLOPs values found by ``searcher``.

    ``on_search(done, total, what, counts)`` is called before each search (``what``: method, knob,
    target and model), after each fvcore count it makes (``counts``: made so far) and once at the
    end (``done == total``)."""
    from ..registry import get_method
    from .dense import is_skipped

    searcher = searcher or FlopsSearch()
    progress = _Progress(searcher, on_search, count_searches(sw) if on_search else 0)
    found = _Collected()
    for model in sw.models:
        for run in _dense_runs(sw, model):
            found.add(run)
        for e in sw.methods:
            if is_skipped(sw, e, model):  # a dense sweep's method that cannot restore the grid
                continue
            cls = get_method(e.method)
            seed_p, seeds = _entry_seeds(sw, e, cls)
            others = {k: v for k, v in e.grid.items() if k != cls.knob}
            for combo in itertools.product(*others.values()):
                fixed = dict(zip(others, combo))
                first_seed = {seed_p: seeds[0]} if seed_p else {}
                values = _knob_values(sw, e, cls, model, {**fixed, **first_seed}, searcher, progress)
                for run in _entry_runs(sw, e, cls, model, fixed, values, seed_p, seeds, searcher):
                    found.add(run)
    progress.finish()
    return found.runs
