"""Memory and batch size: the peak memory of one measurement, an estimate of what a batch
needs, the refusal of a batch that would not fit, and the largest batch that does."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from ..errors import UserError
from .env import resolve_device
from .forward import eval_mode, example_input, model_input, precision_context

MAX_BATCH = 1024  # --batch-size max never goes past this


class PeakMemory:
    """Peak memory of one measurement, not of the process's lifetime.

    CUDA: ``max_memory_allocated`` after a reset.  CPU (Linux): the resident high-water mark
    (VmHWM) after resetting it through ``/proc/self/clear_refs``; where that is refused, the
    peak is sampled every 5 ms on a thread.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = ""
        self._sampler = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kind = "peak RSS during the measurement"
        except OSError:
            import threading

            self.kind = "sampled RSS during the measurement"
            self._peak = _rss_bytes() or 0
            self._stop = threading.Event()

            def sample():
                while not self._stop.wait(0.005):
                    self._peak = max(self._peak, _rss_bytes() or 0)

            self._sampler = threading.Thread(target=sample, daemon=True)
            self._sampler.start()
        return self

    def __exit__(self, *exc):
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
        return False

    def mb(self) -> Optional[float]:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._sampler is not None:
            return self._peak / 2**20
        hwm = _status_kb("VmHWM")
        return hwm / 1024 if hwm is not None else None


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _rss_bytes() -> Optional[int]:
    kb = _status_kb("VmRSS")
    return kb * 1024 if kb is not None else None

def available_memory_bytes(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimate_memory_bytes(model: nn.Module, batch_size: int, img_size: Optional[int] = None,
                          precision: str = "fp32") -> int:
    """A generous estimate of inference peak memory: weights plus the largest live activations.

    Per block a pre-norm ViT holds the residual stream, the normalised input, q/k/v and
    the MLP's hidden layer; unfused attention would add one N x N matrix per head.
    """
    from ..backbones import backbone_of

    bytes_per = 2 if precision in ("fp16", "bf16") else 4
    params = sum(p.numel() for p in model.parameters()) * 4
    c, s = model_input(model)
    s = img_size or s
    try:
        act = backbone_of(model).activation_bytes(s, bytes_per)
    except UserError:  # an unknown family: ViT-B's figures at this size
        n = (s // 16) ** 2 + 1
        act = n * (6 * 768 + 2 * 3072) * bytes_per + 12 * n * n * 4
    per_image = act + c * s * s * 4
    return int(params + 2 * batch_size * per_image)


def check_batch_fits(model: nn.Module, batch_size: int, device: torch.device, precision: str = "fp32",
                     img_size: Optional[int] = None) -> None:
    """Refuse a batch that would not fit (on a machine without swap an OOM is an uncatchable kill)."""
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    avail = available_memory_bytes(device)
    if avail is None:
        return
    need = estimate_memory_bytes(model, batch_size, img_size, precision)
    budget = int(avail * 0.8)
    if need > budget:
        per = max(1, (need - sum(p.numel() for p in model.parameters()) * 4) // batch_size)
        fit = max(1, (budget - sum(p.numel() for p in model.parameters()) * 4) // per)
        fit = 2 ** int(math.log2(fit)) if fit >= 1 else 1
        raise UserError(f"batch size {batch_size} needs about {_bytes(need)} but only "
                        f"{_bytes(avail)} is free on {device.type}; try --batch-size {fit}")


def _bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def max_batch_size(model: nn.Module, device: str | torch.device = "auto", precision: str = "fp32",
                   img_size: Optional[int] = None, cap: int = MAX_BATCH) -> int:
    """The largest power-of-two batch (at most ``cap``) that fits, as EViT's speed test and
    ToMe's benchmark pick it: on CUDA by running the model (eager, inference mode) at
    doubling batches until one runs out of memory; elsewhere by :func:`check_batch_fits`'s
    estimate (an out-of-memory on a machine without swap is an uncatchable kill)."""
    dev = resolve_device(device) if isinstance(device, str) else device
    ctx, _ = precision_context(dev, precision)

    def fits(b: int) -> bool:
        try:
            check_batch_fits(model, b, dev, precision, img_size)
        except UserError:
            return False
        if dev.type != "cuda":
            return True
        home = next(model.parameters()).device
        model.to(dev)
        try:
            with eval_mode(model), torch.inference_mode(), ctx:
                model(example_input(model, b, img_size, device=dev))
            torch.cuda.synchronize(dev)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.to(home)
            torch.cuda.empty_cache()

    if not fits(1):
        raise UserError(f"not even batch 1 fits on {dev.type}")
    b = 1
    while b * 2 <= cap and fits(b * 2):
        b *= 2
    return b
