"""The Python API the CLI wraps: load a model with a method, measure it, record it."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .measure import accuracy, flop_count, timing
from .registry import apply, get_method


def load(model: str, method: str = "none", params: Optional[dict] = None, pretrained: bool = False,
         checkpoint: Optional[str] = None, img_size: Optional[int] = None, seed: int = 0
         ) -> tuple[nn.Module, dict]:
    """Build ``model`` (timm name or ``default``), apply ``method``, then load ``checkpoint``.

    The checkpoint loads after the method is applied, so it can carry the method's learned
    parts.  Returns the model in eval mode and its provenance: weights identity, validated
    parameters, and the status of the method's learned parts (``none`` / ``untrained`` /
    ``trained``).
    """
    from .models import create_model

    cls = get_method(method)
    p = cls.validate(params or {})
    kwargs = {}
    if img_size is not None and model != "default":
        kwargs["img_size"] = img_size
    torch.manual_seed(seed)  # random-init weights are reproducible
    net, prov = create_model(model, pretrained=pretrained, **kwargs)
    apply(net, method, **p)
    if checkpoint is not None:
        from .checkpoint import load_checkpoint

        info = load_checkpoint(net, checkpoint)
        prov.update(info)
    if not cls.learned:
        learned = "none"
    elif prov.get("learned_parts_in_checkpoint"):
        learned = "trained"
    else:
        learned = "untrained"
    prov.update({"model": model, "method": method, "params": p, "learned_parts": learned})
    net.eval()
    return net, prov


def token_counts(net: nn.Module, img_size: Optional[int] = None):
    return flop_count.token_counts(net, img_size)


def flops(net: nn.Module, img_size: Optional[int] = None, inputs: Optional[torch.Tensor] = None) -> dict:
    """GFLOPs (fvcore, MACs), params and tokens per block of a loaded model."""
    return flop_count.flops(net, img_size=img_size, inputs=inputs)


def throughput(net: nn.Module, **kwargs) -> dict:
    """Images/s (median, quartiles), batch-1 latency, peak memory; see :func:`tokenbench.measure.timing.throughput`."""
    from .quiet import cuda_runtime_notice

    with cuda_runtime_notice():  # torch.utils.benchmark's import, on machines without CUDA
        return timing.throughput(net, **kwargs)


def evaluate(net: nn.Module, data: str = "fashion-mnist", split: str = "test", data_dir=None,
             limit: Optional[int] = None, seed: int = 0, batch_size: int = 256, device="cpu",
             precision: str = "fp32", progress: bool = False) -> dict:
    """Top-1/top-5 with a Wilson 95% interval on ``data`` (see :mod:`tokenbench.data`)."""
    from . import checks
    from .backbones import input_config
    from .data import build_dataset

    ds, dspec = build_dataset(data, split, data_dir, model=net, limit=limit, seed=seed)
    what = dspec.source or f"{data} {split}"
    checks.limit_within(limit, dspec.available, what)
    checks.head_fits(input_config(net)["num_classes"], dspec.classes, what)
    res = accuracy.evaluate(net, ds, batch_size=batch_size, device=device, precision=precision, progress=progress)
    res["data"] = dspec.key() | {"data_dir": dspec.data_dir, "source": dspec.source, "layout": dspec.layout}
    if dspec.carved:
        res["data"]["carved"] = dspec.carved
    return res
