"""Which settings a sweep times by default, and how long its timings will take.

Timings are keyed by the CPU, so on a CPU other than the reference's every throughput and
speedup would be measured again.  A sweep may name the settings it times by default
(``[throughput] time_by_default``, selectors ``LABEL`` or ``LABEL@TARGET``): a run outside them
whose timings are not recorded yet (here or in the reference) is left *untimed*
(:func:`.plan.mark_untimed`): no throughput, no speedup, the flag ``untimed`` in the tables.  ``tokenbench run --all-timings`` times every
run.  The timings that are made follow the full protocol: fewer settings, not shorter timings.

The estimate said before a sweep starts comes from measured durations: of timings already made
on this CPU (``wall_s`` of this store's records), else of the reference's (``wall_s``, or for
records written before it existed, the time since the record written before it), lengthened by
what a dense forward timed here takes beyond the reference's (:func:`estimate`).
"""

from __future__ import annotations

import statistics
import time
from datetime import datetime
from typing import Optional

from .format import DENSE_METHOD
from .plan import TIMED, kinds_for, recorded, reference_store, timing_reference

GAP_LIMIT_S = 120.0  # a longer gap between two records is a pause of the sweep, not one measurement


# --------------------------------------------------------------------------- selectors

# --------------------------------------------------------------------------- measured durations

def _time_of(rec: dict) -> Optional[float]:
    try:
        return datetime.strptime(rec["meta"]["time"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except (KeyError, TypeError, ValueError):
        return None


def durations(records: list[dict], kinds: tuple = TIMED) -> dict[str, list[float]]:
    """Seconds each record of ``kinds`` took, per kind: its ``wall_s``, else the time since the
    record written before it (when under :data:`GAP_LIMIT_S`)."""
    timed = sorted(((t, r) for r in records if (t := _time_of(r)) is not None), key=lambda x: x[0])
    out: dict[str, list[float]] = {}
    prev = None
    for t, r in timed:
        kind = r.get("kind")
        w = (r.get("metrics") or {}).get("wall_s")
        if kind in kinds:
            if isinstance(w, (int, float)):
                out.setdefault(kind, []).append(float(w))
            elif prev is not None and 0 < t - prev <= GAP_LIMIT_S:
                out.setdefault(kind, []).append(t - prev)
        prev = t
    return out


def dense_forward_s(net, batch_size: int, threads: Optional[int], img_size: Optional[int],
                    budget_s: float = 1.0) -> float:
    """Seconds of one dense forward at ``batch_size`` on this CPU now: the median of up to five
    calls after one, stopping after ``budget_s`` (a busy machine makes each call slow)."""
    import torch

    from ..measure import env, forward

    prev = torch.get_num_threads()
    torch.set_num_threads(threads or env.default_threads())
    try:
        x = forward.example_input(net, batch_size, img_size, device=torch.device("cpu"))
        ts: list[float] = []
        with torch.inference_mode():
            net(x)
            end = time.perf_counter() + budget_s
            while len(ts) < 5 and (not ts or time.perf_counter() < end):
                t0 = time.perf_counter()
                net(x)
                ts.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(prev)
    return statistics.median(ts)


def _dense_rate(records: list[dict], model: str, batch_size: int) -> Optional[float]:
    """The reference's dense img/s of ``model`` at ``batch_size`` (its throughput record)."""
    for r in records:
        kf = r.get("key_fields") or {}
        if r.get("kind") == "throughput" and kf.get("method") == DENSE_METHOD and kf.get("model") == model \
                and kf.get("batch_size") == batch_size and (r.get("spec") or {}).get("checkpoint") is None:
            return (r.get("metrics") or {}).get("img_per_s")
    return None


class Estimate:
    """Seconds per timing kind on this CPU, and where they come from (one line of text)."""

    def __init__(self, per_kind: dict[str, float], source: str):
        self.per_kind, self.source = per_kind, source

    def covers(self, counts: dict[str, int]) -> bool:
        return all(k in self.per_kind for k, n in counts.items() if n)

    def seconds(self, counts: dict[str, int]) -> float:
        return sum(n * self.per_kind[k] for k, n in counts.items() if n)


def min_forwards(kind: str, rounds: int) -> int:
    """The fewest batch forwards a timing of ``kind`` makes however slow each is (the protocol of
    :mod:`tokenbench.measure.timing`): a throughput's first call, one warm-up call and five timed blocks;
    a speedup's, per model, first call, warm-up, three calls to size its blocks and one calibration
    block, then one block of each model per round."""
    return 7 if kind == "throughput" else 8 + 2 * rounds


def estimate(sw, store, reference, dense_net=None) -> Optional[Estimate]:
    """Seconds per measurement kind here.  From the reference's durations, with a dense forward
    timed here (``dense_net``): a timing longer by its :func:`min_forwards` times what that forward
    takes beyond the reference's (a timing is bound by ``min_run_time`` on a fast CPU, by its
    forwards on a slow one); a FLOPs count or an evaluation as long as there (a loaded machine's
    two-thread forward says little of a one-thread trace or of an evaluation).  Timings already
    made on this CPU (``store``) come first.  None with neither."""
    from ..measure import env

    per_kind: dict[str, float] = {}
    source = ""
    if reference is not None and dense_net is not None and sw.device != "cuda":
        recs = reference.records()
        ref = durations(recs, kinds=("flops", "accuracy", *TIMED))
        rate = _dense_rate(recs, sw.models[0], sw.batch_size)  # dense_net is the first model's dense run
        if ref and rate:
            here, there = dense_forward_s(dense_net, sw.batch_size, sw.threads, sw.img_size), sw.batch_size / rate
            for k, v in ref.items():
                med = statistics.median(v)
                per_kind[k] = med + min_forwards(k, sw.rounds) * max(0.0, here - there) if k in TIMED else med
            names = sorted({(r.get("key_fields") or {}).get("device_name") for r in recs
                            if r.get("kind") in TIMED} - {None})
            source = (f"the reference's durations on {', '.join(names) or 'its CPU'} and a dense forward timed here: "
                      f"{1000 * here:.0f} ms against its {1000 * there:.0f} ms")
    cpu = env.cpu_model()
    own = durations([r for r in store.records() if (r.get("key_fields") or {}).get("device_name") == cpu])
    if own:
        per_kind.update({k: statistics.median(v) for k, v in own.items()})
        source = f"the timings made here on {cpu}" + (f"; the rest from {source}" if source else "")
    return Estimate(per_kind, source) if per_kind else None


# --------------------------------------------------------------------------- what a sweep says before it starts

def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _setting(run) -> str:
    return run.label + ("@" + "/".join(f"{t:g}" for t in run.targets) if run.targets else "") + \
        (f" ({', '.join(f'{k}={v}' for k, v in run.params.items())})" if not run.targets and run.params else "")


def start_lines(sw, runs: list, keys: list[dict], store, force: bool = False, dense_net=None) -> list[str]:
    """What the sweep will time on this CPU and about how long it takes, what it leaves untimed,
    what it reuses; empty when it times nothing and leaves nothing untimed.  ``dense_net()``
    builds the dense model for the estimate's probe (called only when needed)."""
    from ..measure import env
    from .format import packaged_sweeps

    reference = reference_store(sw)
    tref = timing_reference(sw, reference)
    todo: dict[str, int] = {}
    other: dict[str, int] = {}
    timed_runs, reused = [], 0
    for run, kd in zip(runs, keys):
        for kind, k in kd.items():
            if kind in TIMED:
                if force or not recorded(k, store, tref, sw.min_run_time):
                    todo[kind] = todo.get(kind, 0) + 1
                    if run not in timed_runs:
                        timed_runs.append(run)
            elif force or not recorded(k, store, reference):
                other[kind] = other.get(kind, 0) + 1
            elif not store.has(k):
                reused += 1
    untimed = [r for r in runs if r.untimed]
    if not todo and not untimed:
        return []
    cpu = env.cpu_model() if sw.device != "cuda" else sw.device
    probe = dense_net is not None and (other or (todo and not _own(store, cpu)))
    est = estimate(sw, store, reference, dense_net() if probe else None) if todo or other else None
    lines = []
    if todo:
        names = [_setting(r) for r in timed_runs]
        shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
        what = " and ".join(f"{n} {'paired speedup' if k == 'speedup' else k}" + ("s" if n > 1 else "")
                            for k, n in sorted(todo.items(), reverse=True))
        how_long = f"about {_minutes(est.seconds(todo))} at this machine's present speed (from {est.source})" \
            if est and est.covers(todo) else \
            "no measured durations to estimate from yet (the time left shows once the first has ended)"
        lines.append(f"timing on this CPU ({cpu}): {what} of {len(timed_runs)} setting(s), {how_long}: {shown}")
    if untimed:
        cpus = sorted({(r.get("key_fields") or {}).get("device_name") for r in reference.records()
                       if r.get("kind") in TIMED} - {None}) if reference is not None else []
        ref_note = (f"; {sw.reference} holds the reference's timings, on {', '.join(cpus)}"
                    + ("" if sw.reference_timings else ", set aside by --no-reference-timings")) if cpus else ""
        rest = {k: sum(1 for r in untimed for kk in _timed_kinds(sw, r) if kk == k) for k in TIMED}
        rest = {k: n for k, n in rest.items() if n}
        cost = f" (about {_minutes(est.seconds(rest))} more)" if est and rest and est.covers(rest) else ""
        cmd = f"tokenbench run {sw.name} --all-timings" if sw.name in packaged_sweeps() else "--all-timings"
        lines.append(f"not timed here: {len(untimed)} other setting(s), shown without a speed (flag `untimed`, "
                     f"left off the speed plot){ref_note}; `{cmd}` times them too{cost}")
    if reused or other:
        n = sum(other.values())
        cost = f" (about {_minutes(est.seconds(other))} by the reference machine's durations)" \
            if est and est.covers(other) else " (no measured durations to estimate them from)"
        lines.append(f"FLOPs and accuracy: {reused} record(s) reused" + (f" from {sw.reference}" if reference else "")
                     + (f", {n} to measure{cost}" if n else ""))
    return lines


def _own(store, cpu: str) -> bool:
    return any((r.get("key_fields") or {}).get("device_name") == cpu and r.get("kind") in TIMED
               for r in store.records())


def _timed_kinds(sw, run) -> list[str]:
    """The timing kinds ``run`` would have if it were timed."""
    from dataclasses import replace

    return [k for k in kinds_for(replace(run, untimed=False), sw) if k in TIMED]
