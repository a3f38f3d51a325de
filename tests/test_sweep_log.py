"""A sweep whose stdout is a log prints one line per measurement; the time left comes from the
measured durations of each kind alone."""

import re

from tokenbench.sweep.progress import StepTimer

from conftest import register_tiny_timm, write_sweep

TINY = register_tiny_timm("tiny_vit_sweep_log")


def test_time_left_from_measured_durations_per_kind():
    now = [0.0]
    timer = StepTimer({"flops": 3, "accuracy": 4}, clock=lambda: now[0])
    assert timer.seconds_left() is None                                  # nothing measured: no guess
    timer.start("a", "flops", True)
    now[0] += 1.0
    timer.start("a", "accuracy", True)                                   # flops took 1 s
    now[0] += 10.0
    assert timer.finish() == ("a", "accuracy", 10.0)
    assert timer.seconds_left() == 2 * 1.0 + 3 * 10.0
    timer.start("b", "flops", False)                                     # copied: not timed
    now[0] += 500.0
    assert timer.finish() is None and timer.seconds_left() == 32.0


def test_one_line_per_measurement_when_stdout_is_not_a_terminal(cli, tmp_path):
    p = write_sweep(tmp_path / "s.toml", TINY, "[methods.topk]\nkeep_rate = [0.5, 0.7]\n", out=tmp_path / "out")
    code, out, err = cli("run", str(p), "--no-plots")
    assert code == 0, err
    steps = [ln for ln in out.splitlines() if re.match(r"\[\s*\d+/6\] ", ln)]
    assert len(steps) == 6, out                                          # dense + 2 runs, flops and accuracy
    assert steps[-1].startswith("[6/6]") and "[accuracy]" in steps[-1] and "left" in steps[-1]
    code, out, err = cli("run", str(p), "--no-plots")                   # all recorded: no step lines
    assert code == 0 and not [ln for ln in out.splitlines() if re.match(r"\[\s*\d+/\d+\] ", ln)]
