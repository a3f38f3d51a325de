"""How much of the machine other processes take, sampled between measurements.

``measure.load_watch`` flags each timing busy from what others ran *during* it; this module
samples the same quantity (cores other processes keep busy, from ``/proc/stat`` minus this
process's own CPU time) over a short window *before* a timing: whether a retry of a busy
timing can succeed, and whether a sweep starts on a busy machine.
"""

from __future__ import annotations

import os
import time
from typing import Optional

BUSY_CORES = 0.25   # other processes' cores above which a timing is busy (as measure.load_watch flags it)


def other_cores(window: float = 0.5) -> Optional[float]:
    """Cores other processes kept busy over the next ``window`` seconds (None where /proc is missing)."""
    from .measure import _cpu_jiffies, _self_jiffies

    sys0, self0 = _cpu_jiffies(), _self_jiffies()
    t0 = time.perf_counter()
    time.sleep(window)
    wall = time.perf_counter() - t0
    sys1, self1 = _cpu_jiffies(), _self_jiffies()
    if None in (sys0, sys1, self0, self1) or wall <= 0:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return round(max(0.0, ((sys1[0] - sys0[0]) - (self1 - self0)) / hz / wall), 2)


def still_busy() -> Optional[float]:
    """Other processes' cores now when they are above :data:`BUSY_CORES` (a retry would be busy
    too), else None."""
    other = other_cores()
    return other if other is not None and other > BUSY_CORES else None


def busy_start_note(n_timings: int, other: float, threads: Optional[int] = None) -> str:
    """What a sweep starting on a busy machine should expect: every timing flagged busy, about
    how much slower, and retries skipped while the load stays."""
    cores = os.cpu_count() or 1
    mine = min(threads or cores, cores)
    slower = max(1.0, (mine + other) / cores)
    return (f"the machine is busy: other processes keep {other:.1f} of its {cores} cores busy. The {n_timings} "
            f"timing(s) to make will be flagged busy (not comparable with a quiet machine's) and run about "
            f"{slower:.1f}x slower; a busy timing is retried only when the load has dropped. Time them again "
            "on a quiet machine with --retime-flagged.")
