"""Whether other processes take the machine: during a timing (:func:`load_watch` flags it
busy) and before one (:func:`other_cores` over a short window: whether a retry of a busy
timing can succeed, and whether a sweep starts on a busy machine).

Both read the same quantity: the CPU time all processes used (``/proc/stat``) minus this
process's own and its descendants' (``/proc/self/stat`` and its children's), per second of
wall time: the cores others kept busy.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Optional

BUSY_CORES = 0.25   # other processes' cores above which a timing is busy


def _cpu_jiffies() -> Optional[tuple[int, int]]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()[1:]
        vals = [int(v) for v in parts[:8]]
        idle = vals[3] + vals[4]  # idle + iowait
        return sum(vals) - idle, sum(vals)
    except (OSError, ValueError, IndexError):
        return None


def _self_jiffies() -> Optional[int]:
    """CPU time of this process (all its threads) and of its descendants, in jiffies.

    Descendants count as this measurement's own work, not as another process's: torch.compile's
    worker processes compile C++ kernels while a compiled measurement starts.  Each process's
    utime + stime, plus the time of the children it has reaped (cutime + cstime)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        own = sum(int(x) for x in fields[11:15])
    except (OSError, ValueError, IndexError):
        return None
    children: dict[int, list[int]] = {}
    times: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(d))
            times[int(d)] = sum(int(x) for x in fields[11:15])
        except (OSError, ValueError, IndexError):  # a process that ended while we read
            continue
    todo, seen = list(children.get(os.getpid(), [])), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        own += times.get(pid, 0)
        todo += children.get(pid, [])
    return own


def _others_cores(sys0, sys1, self0, self1, wall: float) -> Optional[float]:
    """Cores other processes kept busy between two readings ``wall`` seconds apart (None where
    /proc could not be read)."""
    if None in (sys0, sys1, self0, self1) or wall <= 0:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return max(0.0, ((sys1[0] - sys0[0]) - (self1 - self0)) / hz / wall)


@contextlib.contextmanager
def load_watch(info: dict, threads: int):
    """Measure what *other* processes ran during a measurement and flag a busy machine.

    The 1-minute load average lags by a minute and counts this process too, so it cannot
    tell a contended measurement from the one before it.  Instead the CPU time all
    processes used during the measurement (``/proc/stat``) minus this process's own
    (``/proc/self/stat``) gives the cores others took: ``other_cores``.  The machine is
    ``busy`` when others took more than a quarter of a core, or, where /proc is missing,
    when the load average exceeds the threads asked for.
    """
    sys0, self0 = _cpu_jiffies(), _self_jiffies()
    t0 = time.perf_counter()
    yield
    wall = time.perf_counter() - t0
    sys1, self1 = _cpu_jiffies(), _self_jiffies()
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    info["load_avg"] = load
    other = _others_cores(sys0, sys1, self0, self1, wall)
    if other is not None:
        info["other_cores"] = round(other, 2)
        info["busy"] = bool(other > BUSY_CORES)
    elif load is not None:
        info["busy"] = bool(load > threads + 0.5)


def other_cores(window: float = 0.5) -> Optional[float]:
    """Cores other processes kept busy over the next ``window`` seconds (None where /proc is missing)."""
    sys0, self0 = _cpu_jiffies(), _self_jiffies()
    t0 = time.perf_counter()
    time.sleep(window)
    wall = time.perf_counter() - t0
    sys1, self1 = _cpu_jiffies(), _self_jiffies()
    other = _others_cores(sys0, sys1, self0, self1, wall)
    return None if other is None else round(other, 2)


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
