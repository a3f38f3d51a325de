"""The conditions of a measured forward: eval mode, the input the model expects (a seeded
synthetic batch), the precision it runs at, and its device made current."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn

from ..errors import UserError
from .env import cpu_flags

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def device_context(dev: torch.device):
    """Make ``dev`` the current CUDA device, so that the timer synchronises the device the model is on."""
    if dev.type == "cuda":
        return torch.cuda.device(dev)
    return contextlib.nullcontext()


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside, the previous mode restored after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def model_input(model: nn.Module) -> tuple[int, int]:
    """(in_chans, img_size) the model expects."""
    from ..backbones import input_config

    cfg = input_config(model)
    return cfg["in_chans"], cfg["img_size"]


def example_input(model: nn.Module, batch: int = 1, img_size: Optional[int] = None, device="cpu",
                  seed: int = 0) -> torch.Tensor:
    """A seeded synthetic batch of ``batch`` images of the size ``model`` expects (or ``img_size``)."""
    c, s = model_input(model)
    s = img_size or s
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, c, s, s, generator=g).to(device)


def precision_context(device: torch.device, precision: str):
    """(the autocast context of ``precision`` on ``device``, a note where this CPU emulates it)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r} (use fp32, fp16 or bf16)")
    if precision == "fp32":
        return contextlib.nullcontext(), None
    note = None
    if device.type == "cpu":
        flags = cpu_flags()
        if precision == "bf16" and not ({"avx512_bf16", "amx_bf16"} & flags):
            note = "bf16 emulated on this CPU (no avx512_bf16/amx_bf16)"
        if precision == "fp16" and not ({"avx512_fp16", "amx_fp16"} & flags):
            note = "fp16 emulated on this CPU (no avx512_fp16/amx_fp16)"
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision]), note
