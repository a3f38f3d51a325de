"""What a forward costs the host, apart from its arithmetic: operators dispatched and host time.

Two device-free predictors of launch-bound behaviour (on a GPU every operator is at least
one kernel launch, and a forward whose host side takes longer than its kernels leaves the
device idle):

- :func:`operator_count`: the aten operators one inference forward dispatches, counted with
  a ``TorchDispatchMode`` at the aten level, **views included** (``view``, ``expand``,
  ``transpose``, ``select``, ... each count one).  Inference mode, as every timing runs;
  the second forward is counted (a first one may build caches).  timm's DeiT-S at batch 2
  dispatches 227.
- :func:`host_time_ms`: the wall time of one forward on an **empty batch** (0 images) on
  the CPU: every operator is dispatched and every Python line runs, but the kernels have
  no elements to compute, so what is left is the time to launch the forward.  (The ``meta``
  device would do the same without kernels, but its shape functions are Python reference
  implementations, about a millisecond per operator, which measures them instead.)  A GPU
  adds its launch latency per operator on top of this.  One operator runs another path on an
  empty batch: fused attention (``scaled_dot_product_attention``) fills and sums a zero-sized
  result instead of calling its kernel, about 3 us more per call than on real images (on a
  2-core EPYC), so models on the fused kernel read a little high.
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from .forward import eval_mode, example_input

COUNT_BATCH = 2   # images in the forward whose operators are counted


class _OperatorCounter(TorchDispatchMode):
    """Counts every aten operator that reaches the dispatcher's Python key."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        self.views += bool(func.is_view)
        return func(*args, **(kwargs or {}))


def _input(model: nn.Module, batch: int, img_size: Optional[int]) -> torch.Tensor:
    dev = next(model.parameters()).device
    return example_input(model, batch, img_size, device=dev)


def operator_count(model: nn.Module, img_size: Optional[int] = None, batch: int = COUNT_BATCH,
                   x: Optional[torch.Tensor] = None) -> dict[str, int]:
    """Aten operators of one inference forward of ``model`` (eval mode), views included:
    ``{"aten_ops": all of them, "aten_views": the views among them}``."""
    x = _input(model, batch, img_size) if x is None else x
    with eval_mode(model), torch.inference_mode():
        model(x)                       # caches a forward builds once (constant index tensors) are built here
        with _OperatorCounter() as c:
            model(x)
    return {"aten_ops": c.count, "aten_views": c.views}


def host_time_ms(model: nn.Module, img_size: Optional[int] = None, repeats: int = 30,
                 warmup: int = 3) -> dict[str, Any]:
    """Milliseconds to launch one forward of ``model`` with no compute waiting: the fastest (and
    the median) of ``repeats`` forwards on an empty batch, on the CPU, in inference mode.  The
    fastest, because other work on the machine only ever adds to a forward's host time.

    ``{"host_ms": fastest, "host_ms_median": median}``; a model that cannot run an empty batch
    gives ``{"host_ms": None, "host_note": why}``."""
    home = next(model.parameters()).device
    if home.type != "cpu":
        model.to("cpu")
    try:
        x = _input(model, 1, img_size)[:0]
        times = []
        with eval_mode(model), torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # statistics over zero images warn; they are never read
            try:
                for _ in range(warmup):
                    model(x)
            except Exception as e:  # any method's code may refuse zero images; the timing goes on without it
                why = (str(e).splitlines() or [type(e).__name__])[0][:120]
                return {"host_ms": None, "host_note": f"cannot run an empty batch: {why}"}
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
    finally:
        if home.type != "cpu":
            model.to(home)
    return {"host_ms": round(1e3 * min(times), 4), "host_ms_median": round(1e3 * statistics.median(times), 4)}


def overhead(model: nn.Module, img_size: Optional[int] = None) -> dict[str, Any]:
    """:func:`operator_count` and :func:`host_time_ms` together (the fields a throughput record
    and bench.py's tables carry)."""
    out: dict[str, Any] = dict(operator_count(model, img_size))
    out.update(host_time_ms(model, img_size))
    return out
