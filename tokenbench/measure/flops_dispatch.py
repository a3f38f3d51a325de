"""fvcore's FLOP counts without fvcore's trace: the same per-operator rules, read on the dispatcher.

fvcore traces the model with ``torch.jit.trace`` for every image it counts (seconds each), which
made FLOPs on a few hundred real images of a per-image method (ATS) take many minutes.  Here one
inference forward per image runs under a ``TorchDispatchMode`` that applies fvcore's rules to each
operator's shapes (multiply-add = 1): linear, matmul / mm / bmm / addmm, convolution, layer /
group / instance / batch norm (eval), and fused attention (:func:`tokenbench.measure.flop_count._sdpa_flop`'s
rule: both matmuls).  Operators fvcore does not count are not counted here either.

:func:`count` returns ``None`` when the forward dispatches an operator fvcore has a rule for and this
module has not (einsum, upsampling, ...): the caller falls back to fvcore.  The caller also checks
one image against fvcore itself before trusting the rest (:func:`tokenbench.measure.flop_count.flops`).
"""

from __future__ import annotations

from math import prod
from typing import Optional

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

# operators fvcore counts (by default or through tokenbench's extra handles) that have no rule here
_UNHANDLED = {"aten::einsum", "aten::upsample_nearest2d", "aten::upsample_bilinear2d",
              "aten::adaptive_avg_pool2d", "aten::grid_sampler"}


def _shape(t) -> Optional[list[int]]:
    return list(t.shape) if isinstance(t, torch.Tensor) else None


def _linear(args, kwargs, out):
    return "linear", prod(args[0].shape) * args[1].shape[0]


def _matmul(name):
    def rule(args, kwargs, out):
        a, b = args[0].shape, args[1].shape
        if len(a) < 2 or len(b) < 2:   # fvcore's rule assumes matrices; a vector product is not one
            return "unhandled", 0
        return name, prod(a) * b[-1]
    return rule


def _addmm(args, kwargs, out):
    n, k = args[1].shape
    return "addmm", n * k * args[2].shape[1]


def _bmm(args, kwargs, out):
    n, c, t = args[0].shape
    return "bmm", n * c * t * args[1].shape[-1]


def _norm(name, affine_index):
    def rule(args, kwargs, out):
        weight = args[affine_index] if len(args) > affine_index else kwargs.get("weight")
        return name, prod(args[0].shape) * (5 if weight is not None else 4)
    return rule


def _batch_norm(args, kwargs, out):
    training = args[5] if len(args) > 5 else kwargs.get("training", False)
    if training:
        return _norm("batch_norm", 1)(args, kwargs, out)
    return "batch_norm", prod(args[0].shape) * (2 if args[1] is not None else 1)


def _sdpa(args, kwargs, out):
    q, k, v = args[0].shape, args[1].shape, args[2].shape
    return "scaled_dot_product_attention", prod(q) * k[-2] + prod(q[:-1]) * k[-2] * v[-1]


RULES = {
    "aten::linear": _linear,
    "aten::matmul": _matmul("matmul"),
    "aten::mm": _matmul("mm"),
    "aten::addmm": _addmm,
    "aten::bmm": _bmm,
    "aten::layer_norm": _norm("layer_norm", 2),
    "aten::group_norm": _norm("group_norm", 2),
    "aten::instance_norm": _norm("instance_norm", 1),
    "aten::batch_norm": _batch_norm,
    "aten::scaled_dot_product_attention": _sdpa,
}


def _conv_rule(args, kwargs, out):
    """fvcore's convolution rule: batch x output positions x out channels x in channels / groups
    x kernel size (transposed: input positions instead of output positions)."""
    x, w = args[0].shape, args[1].shape
    transposed = bool(args[6]) if len(args) > 6 and isinstance(args[6], bool) else False
    batch = x[0]
    if transposed:
        return "conv", batch * prod(w) * prod(x[2:])
    return "conv", batch * prod(w) * prod(out.shape[2:])


for _name in ("aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::convolution", "aten::_convolution"):
    RULES[_name] = _conv_rule


class _FlopCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.by_op: dict[str, float] = {}
        self.unhandled: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        rule = RULES.get(name)
        if rule is not None:
            op, n = rule(args, kwargs, out)
            if op == "unhandled":
                self.unhandled.add(name)
            else:
                self.by_op[op] = self.by_op.get(op, 0.0) + float(n)
        elif name in _UNHANDLED:
            self.unhandled.add(name)
        return out


def count(model: nn.Module, x: torch.Tensor) -> Optional[tuple[float, dict[str, float]]]:
    """(total, by operator) of one forward of ``model`` on ``x`` by fvcore's rules, or None when
    it dispatches an operator counted by fvcore that has no rule here.  Inference mode, eval mode
    left as the caller set it."""
    with torch.inference_mode(), _FlopCounter() as c:
        model(x)
    if c.unhandled:
        return None
    return sum(c.by_op.values()), dict(c.by_op)
