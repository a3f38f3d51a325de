"""A sweep's progress from ``execute``'s callbacks: one line per measurement made (for logs) and
the time left, estimated from the durations measured so far of each kind alone."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable, Optional


class StepTimer:
    """Times each measurement (from its ``on_step`` call to the next) and estimates the time left:
    for each kind (flops, throughput, speedup, accuracy) the measurements still to make times the
    mean duration measured for that kind (the mean over every kind where none is measured yet)."""

    def __init__(self, left_by_kind: dict[str, int], clock: Callable[[], float] = time.monotonic):
        self.left = dict(left_by_kind)
        self.spent: dict[str, list[float]] = defaultdict(list)
        self.current: Optional[tuple[str, str, float]] = None
        self.clock = clock

    @property
    def done(self) -> int:
        return sum(len(v) for v in self.spent.values())

    @property
    def total(self) -> int:
        return self.done + sum(max(0, n) for n in self.left.values())

    def start(self, label: str, kind: str, measuring: bool) -> Optional[tuple[str, str, float]]:
        """A step begins (``measuring``: it is to be measured, not copied); returns the one that ended."""
        ended = self.finish()
        if measuring:
            self.current = (label, kind, self.clock())
        return ended

    def finish(self) -> Optional[tuple[str, str, float]]:
        """The measurement under way ends: (label, kind, seconds), or None when there was none."""
        if self.current is None:
            return None
        label, kind, t0 = self.current
        self.current = None
        dt = self.clock() - t0
        self.spent[kind].append(dt)
        self.left[kind] = self.left.get(kind, 1) - 1
        return label, kind, dt

    def seconds_left(self) -> Optional[float]:
        """None until a measurement has ended; then the estimate (0 when nothing is left)."""
        every = [t for ts in self.spent.values() for t in ts]
        if not every:
            return None
        overall = sum(every) / len(every)
        return sum(n * (sum(self.spent[k]) / len(self.spent[k]) if self.spent.get(k) else overall)
                   for k, n in self.left.items() if n > 0)


def duration_text(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def step_line(timer: StepTimer, ended: tuple[str, str, float]) -> str:
    """``[done/total] RUN [KIND]: 12 s; about 5 min left``."""
    label, kind, dt = ended
    width = len(str(timer.total))
    return (f"[{timer.done:>{width}}/{timer.total}] {label} [{kind}]: {dt:.1f} s; "
            f"about {duration_text(timer.seconds_left())} left")
