"""A busy machine: retries that cannot be calmer stop early, a sweep says at its start that the
machine is busy, and two runners of one directory never time at the same moment."""

import socket
import threading
import time

from tokenbench.measure import busy
from tokenbench.runner import timed_with_retries
from tokenbench.store import Claim, Store


def _attempt(busy_: bool, spread_flag: bool = False) -> dict:
    return {"env": {"busy": busy_, "other_cores": 1.5 if busy_ else 0.0}, "spread_flag": spread_flag,
            "spread": 0.01}


def test_a_busy_timing_is_not_retried_while_the_load_stays():
    calls = []

    def once():
        calls.append(1)
        return _attempt(True)

    got = timed_with_retries(once, retries=2, still_busy=lambda: 1.7)
    assert len(calls) == 1 and got["attempts"] == 1
    assert "retries stopped after 1 attempt" in got["retries_stopped"] and "1.7 cores" in got["retries_stopped"]


def test_a_busy_timing_is_retried_once_the_load_has_dropped():
    results = iter([_attempt(True), _attempt(False)])
    got = timed_with_retries(lambda: next(results), retries=2, still_busy=lambda: None)
    assert got["attempts"] == 2 and not got["env"]["busy"] and "retries_stopped" not in got


def test_a_noisy_but_quiet_timing_is_retried_as_before():
    results = iter([_attempt(False, True), _attempt(False, True), _attempt(False)])
    asked = []
    got = timed_with_retries(lambda: next(results), retries=2, still_busy=lambda: asked.append(1) or 2.0)
    assert got["attempts"] == 3 and asked == [] and "retries_stopped" not in got


def _sweep(measure):
    from tokenbench.sweep import Run, Sweep

    return Sweep(name="t", methods=[], measure=measure), [Run("a", "m", "none", {})]


def _fake_measure(monkeypatch, log):
    from tokenbench import runner

    def measure_run(kind, spec, settings, store, **kw):
        log.append((kind, time.monotonic()))
        return {"key": f"{kind}-key"}, False

    monkeypatch.setattr(runner, "measure_run", measure_run)


def test_a_sweep_says_at_its_start_that_the_machine_is_busy(tmp_path, monkeypatch):
    from tokenbench.sweep import execute

    monkeypatch.setattr(busy, "other_cores", lambda window=0.5: 3.2)
    _fake_measure(monkeypatch, [])
    notes = []
    sw, runs = _sweep(["flops", "throughput"])
    execute(sw, runs, Store(tmp_path), on_note=notes.append)
    assert len(notes) == 1 and "the machine is busy" in notes[0] and "3.2" in notes[0], notes
    assert "1 timing(s)" in notes[0] and "x slower" in notes[0] and "--retime-flagged" in notes[0]
    # a quiet machine, or a sweep that times nothing: not a word
    notes.clear()
    monkeypatch.setattr(busy, "other_cores", lambda window=0.5: 0.05)
    execute(sw, runs, Store(tmp_path / "q"), on_note=notes.append)
    monkeypatch.setattr(busy, "other_cores", lambda window=0.5: 3.2)
    sw, runs = _sweep(["flops"])
    execute(sw, runs, Store(tmp_path / "f"), on_note=notes.append)
    assert notes == []


def test_two_runners_of_a_directory_never_time_at_once(tmp_path, monkeypatch):
    from tokenbench.sweep import execute

    monkeypatch.setattr(busy, "other_cores", lambda window=0.5: 0.0)
    log, notes = [], []
    _fake_measure(monkeypatch, log)
    store = Store(tmp_path)
    other = Claim(tmp_path / "claims", f"timing-{socket.gethostname()}")  # another runner, timing now
    assert other.acquire()
    sw, runs = _sweep(["flops", "throughput"])
    t = threading.Thread(target=execute, args=(sw, runs, store), kwargs={"on_note": notes.append})
    t.start()
    time.sleep(1.5)
    assert log == []                                          # nothing measured while the other times
    assert len(notes) == 1 and "another runner of this directory is timing" in notes[0], notes
    released = time.monotonic()
    other.release()
    t.join(timeout=30)
    assert [k for k, _ in log] == ["flops", "throughput"] and all(at >= released for _, at in log)
    assert not list((tmp_path / "claims").glob("timing-*"))   # its own turn given back
