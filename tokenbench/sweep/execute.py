"""Execution: measure a plan's runs against a store (claims shared with other runners, reuse of
reference records, ``--retime-flagged``, progress callbacks)."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from .. import distributed
from .dense import DENSE_KIND, is_dense
from .expand import Run
from .format import Sweep
from .plan import baseline_spec, kinds_for, recorded, reference_store, run_keys, run_settings, timing_reference


@dataclass
class Step:
    run: Run
    kind: str
    key: str
    reused: bool


def execute(sw: Sweep, runs: list[Run], store, force: bool = False,
            on_step: Optional[Callable[[int, int, Run, str], None]] = None,
            on_note: Optional[Callable[[str], None]] = None,
            retime: Optional[set[str]] = None) -> list[Step]:
    """Measure every run and kind not already in ``store`` (all of them with ``force``).

    Records found in the sweep's ``reference`` directory are copied, not measured.
    ``retime``: keys of timing records to measure again although recorded (``--retime-flagged``).
    Each measurement is claimed first (:meth:`Store.claim`): one that another runner of the
    same directory is measuring is left to it, and waited for at the end."""
    from ..runner import TIMED, Loaded, measure_run

    reference = reference_store(sw)
    total = sum(len(kinds_for(r, sw)) for r in runs)
    note = on_note or (lambda m: print(m, file=sys.stderr, flush=True))
    _say_if_busy(sw, runs, store, force, retime, reference, note)
    turn = _TimingTurn(store, note)
    steps: list[Step] = []
    dense_loaded: dict[str, Loaded] = {}
    claimed: list[tuple[Run, str, Any]] = []  # (run, kind, claim) another runner holds
    i = 0
    for run in runs:
        loaded = Loaded(run.spec(), dense=is_dense(sw))
        keys = run_keys(run, sw)
        settings = run_settings(run, sw)
        for kind in kinds_for(run, sw):
            if on_step:
                on_step(i, total, run, kind)
            again = force or (retime is not None and keys.get(kind) in retime)
            extra: dict[str, Any] = {}
            if kind == "speedup":
                base = baseline_spec(run)
                ident = canonical_spec(base)
                dense_loaded.setdefault(ident, Loaded(base, dense=is_dense(sw)))
                extra = {"baseline": base, "baseline_loaded": dense_loaded[ident]}
            with distributed.claim(store, keys[kind]) as claim:
                if not claim.held:
                    claimed.append((run, kind, claim))
                    continue
                with turn(kind in TIMED):
                    if kind == DENSE_KIND:  # mIoU, pixel accuracy and FLOPs of a dense run, one record
                        from ..runner_dense import measure_dense_run

                        rec, reused = measure_dense_run(run.spec(), settings, store, force=again, reference=reference)
                    elif kind == "flops":
                        import torch

                        threads = torch.get_num_threads()
                        torch.set_num_threads(1)  # tracing is Python-bound; more threads only contend
                        try:
                            rec, reused = measure_run(kind, run.spec(), settings, store, force=again, loaded=loaded,
                                                      reference=reference)
                        finally:
                            torch.set_num_threads(threads)
                    else:
                        ref_kind = timing_reference(sw, reference) if kind in TIMED else reference
                        rec, reused = measure_run(kind, run.spec(), settings, store, force=again, loaded=loaded,
                                                  reference=ref_kind, **extra)
            steps.append(Step(run, kind, rec["key"], reused))
            i += 1
        del loaded
    steps += _await_claimed(sw, claimed, store, force, on_step, on_note, done=i, total=total)
    if on_step:
        on_step(total, total, None, "")
    return steps


def _say_if_busy(sw: Sweep, runs: list[Run], store, force: bool, retime, reference, note) -> None:
    """Before the first timing: on a busy machine, say so and what it will cost."""
    from ..measure.busy import BUSY_CORES, busy_start_note, other_cores
    from ..runner import TIMED

    if not any(k in TIMED for k in sw.measure) or not distributed.is_main():
        return
    todo = 0
    for run in runs:
        for kind, key in run_keys(run, sw).items():
            again = force or (retime is not None and key in retime)
            if kind in TIMED and (again or not recorded(key, store, timing_reference(sw, reference), sw.min_run_time)):
                todo += 1
    if not todo:
        return
    other = other_cores(1.0)
    if other is not None and other > BUSY_CORES:
        note(busy_start_note(todo, other, sw.settings().threads))


class _TimingTurn:
    """One timing at a time among the runners of this directory on this host: a timing holds the
    claim ``timing-<host>``; every measurement waits while another runner holds it (its load
    would make the timing busy), and says so once.  Not used where another engine shares the
    work out (torchrun: rank 0 alone times; a submitit array: its jobs on their own hosts)."""

    def __init__(self, store, note):
        import socket

        self.store, self.note = store, note
        self.key = f"timing-{socket.gethostname()}"
        self.said = False

    @contextlib.contextmanager
    def __call__(self, timing: bool):
        import time

        if distributed.claims_bypassed():
            yield
            return
        if not timing:
            probe = self.store.claim(self.key)
            while not probe.is_free():
                self._say(probe)
                time.sleep(1.0)
            yield
            return
        claim = self.store.claim(self.key)
        while not claim.acquire():
            self._say(claim)
            time.sleep(1.0)
        try:
            yield
        finally:
            claim.release()

    def _say(self, claim) -> None:
        if self.said:
            return
        self.said = True
        h = claim.holder or {}
        self.note(f"another runner of this directory is timing on this machine (pid {h.get('pid', '?')}): "
                  "waiting for each of its timings to end before measuring, so that no two timings overlap")


def canonical_spec(spec: dict) -> str:
    from ..store import canonical

    return canonical(spec)


def flagged_timing_keys(store, keys: list[dict]) -> set[str]:
    """Keys of the plan's timing records that are flagged busy or noisy (``--retime-flagged``)."""
    out = set()
    for kd in keys:
        for kind in ("throughput", "speedup"):
            k = kd.get(kind)
            rec = store.get(k) if k else None
            if rec is not None and (rec["metrics"].get("spread_flag") or rec.get("env", {}).get("busy")):
                out.add(k)
    return out


def _await_claimed(sw: Sweep, claimed: list, store, force: bool, on_step, on_note, done: int,
                   total: int) -> list[Step]:
    """The measurements other runners held: wait for their records; measure those given up."""
    import sys
    import time

    missing = [c for _, _, c in claimed if not store.has(c.key)]
    if missing:
        h = missing[0].holder or {}
        (on_note or (lambda m: print(m, file=sys.stderr, flush=True)))(
            f"waiting for {len(missing)} measurement(s) another runner is making (pid {h.get('pid', '?')} on "
            f"{h.get('host', '?')} since {h.get('since', '?')}; claims in {missing[0].path.parent})")
    steps: list[Step] = []
    for run, kind, claim in claimed:
        if on_step:
            on_step(done + len(steps), total, run, f"{kind}: waiting for another runner")
        while (rec := store.get(claim.key)) is None and not claim.is_free():
            time.sleep(1.0)
        if rec is not None:
            steps.append(Step(run, kind, rec["key"], True))
        else:  # the other runner gave up without a record: measure it here (a speedup comes with its
            # throughput, which is reused where it is recorded: a dense sweep's kinds know no `speedup` alone)
            again = ["throughput"] if kind == "speedup" else [kind]
            steps += [s for s in execute(replace(sw, measure=again), [run], store, on_note=on_note,
                                         force=force and again == [kind])  # the throughput beside it is reused
                      if s.kind == kind]
    return steps
