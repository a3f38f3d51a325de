"""FLOPs, parameters and tokens per block.

FLOPs are fvcore's (one multiply-add = one FLOP, as the papers count), with handles for fused
attention and pairwise distances, which fvcore would otherwise count as zero.  For a method
whose token count depends on the image, FLOPs and token counts are the mean over real images,
with how they spread.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import UserError
from .forward import eval_mode, example_input, model_input
from .stats import percentile


def _sdpa_flop(inputs, outputs):
    """fvcore handle for aten::scaled_dot_product_attention: Q@K^T plus A@V (MACs)."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(inputs[i]) for i in range(3))
    *batch, n, d = q
    m = k[-2]
    dv = v[-1]
    b = 1
    for s in batch:
        b *= s
    return b * n * m * d + b * n * m * dv


def _cdist_flop(inputs, outputs) -> int:
    """fvcore handle for aten::cdist, [B, P, M] x [B, R, M]: B * P * R * M multiply-adds (as a
    Gram matrix costs; fvcore would otherwise count the pairwise distances as free)."""
    from fvcore.nn.jit_handles import get_shape

    *batch, p, m = get_shape(inputs[0])
    r = get_shape(inputs[1])[-2]
    b = 1
    for s in batch:
        b *= s
    return b * p * r * m


_EXTRA_HANDLES = {"aten::scaled_dot_product_attention": _sdpa_flop, "aten::cdist": _cdist_flop}


def register_flop_handle(op: str, fn) -> None:
    """Count ``op`` with ``fn(inputs, outputs) -> MACs`` (fvcore's handle signature)."""
    _EXTRA_HANDLES[op] = fn


def fvcore_count(model: nn.Module, x: torch.Tensor) -> tuple[float, dict]:
    import logging

    from ..quiet import torch_jit_deprecations

    with torch_jit_deprecations():  # fvcore's import and trace, not the user's model
        from fvcore.nn import FlopCountAnalysis

        logging.getLogger("fvcore").setLevel(logging.ERROR)
        fa = FlopCountAnalysis(model, x)
        fa.set_op_handle(**_EXTRA_HANDLES)
        fa.unsupported_ops_warnings(False)
        fa.uncalled_modules_warnings(False)
        fa.tracer_warnings("none")
        total = fa.total()
        return float(total), dict(fa.by_operator())


def _last_counts(model: nn.Module) -> tuple[list[float], list[float]]:
    from ..backbones import last_state

    st = last_state(model)
    return [float(t) for t in st.tokens], [float(t) for t in st.tokens_mlp]


def _count_fast(model: nn.Module, x: torch.Tensor) -> Optional[tuple[float, dict]]:
    """:func:`fvcore_count`'s numbers from one forward on the dispatcher
    (:mod:`tokenbench.measure.flops_dispatch`);
    None where an operator has no rule there."""
    from .flops_dispatch import count

    got = count(model, x)
    return None if got is None else (got[0], {k: v for k, v in got[1].items() if v})


def token_counts(model: nn.Module, img_size: Optional[int] = None, x: Optional[torch.Tensor] = None
                 ) -> tuple[list[float], list[float]]:
    """Sequence length entering each block and each block's MLP (prefix tokens included)."""
    from ..backbones import last_state

    with _surgery_for_counting(model):
        dev = next(model.parameters()).device
        if x is None:
            x = example_input(model, 1, img_size, device=dev)
        with eval_mode(model), torch.inference_mode():
            model(x)
        st = last_state(model)
        return [float(t) for t in st.tokens], [float(t) for t in st.tokens_mlp]


@contextlib.contextmanager
def _surgery_for_counting(model: nn.Module):
    """A plain timm ViT gets the shared surgery (with no method) for its token bookkeeping
    while it is counted, and is restored to its own classes after, as it was found."""
    from .. import backbones

    added = False
    if not backbones.is_prepared(model):
        try:
            backbones.prepare(model, "none")
            added = True
        except UserError:
            pass
    try:
        yield
    finally:
        if added:
            backbones.restore(model)


def flops(model: nn.Module, img_size: Optional[int] = None, inputs: Optional[torch.Tensor] = None,
          max_images: int = 8, on_image: Optional[Callable[[int, int], None]] = None) -> dict[str, Any]:
    """GFLOPs per image (fvcore, multiply-add = 1), parameters, tokens per block.

    For methods whose token counts depend on the image, pass ``inputs`` (real images):
    FLOPs and token counts are then the mean over the first ``max_images`` of them: fvcore's
    trace on the first, then fvcore's rules read on the dispatcher in one forward each where they
    agree with fvcore there (:mod:`tokenbench.measure.flops_dispatch`), else fvcore's trace on each;
    ``on_image(done, total)`` is told after each (a progress bar).
    Counting runs in eval mode under no_grad and restores the model's mode.
    """
    with _surgery_for_counting(model):
        return _flops(model, img_size, inputs, max_images, on_image)


def _flops(model: nn.Module, img_size: Optional[int], inputs: Optional[torch.Tensor], max_images: int,
           on_image: Optional[Callable[[int, int], None]] = None) -> dict:
    from ..backbones import is_prepared

    dev = next(model.parameters()).device
    if inputs is None:
        xs = [example_input(model, 1, img_size, device=dev)]
    else:
        xs = [inputs[i:i + 1].to(dev) for i in range(min(max_images, len(inputs)))]
    totals, by_op = [], {}
    toks, toks_mlp = [], []
    fast = len(xs) > 1  # many images: fvcore's rules on the dispatcher, once fvcore agrees on the first
    with eval_mode(model), torch.no_grad():
        for i, x in enumerate(xs):
            got = _count_fast(model, x) if fast and i > 0 else None
            counted_here = got is not None   # that forward left this image's token counts in the state
            if got is None:
                got = fvcore_count(model, x)
                if fast and i == 0:
                    fast = _count_fast(model, x) == got  # the same number, operator by operator
            t, ops = got
            totals.append(t)
            for k, v in ops.items():
                by_op[k] = by_op.get(k, 0.0) + v / len(xs)
            if is_prepared(model):
                tk, tm = _last_counts(model) if counted_here else token_counts(model, x=x)
                toks.append(tk)
                toks_mlp.append(tm)
            if on_image is not None:
                on_image(i + 1, len(xs))
    n_params = sum(p.numel() for p in model.parameters())
    c, s = model_input(model)
    out = {
        "gflops": sum(totals) / len(totals) / 1e9,
        "params_m": n_params / 1e6,
        "img_size": img_size or s,
        "flops_by_operator": {k: v / 1e9 for k, v in sorted(by_op.items())},
        "flops_images": len(xs),
    }
    if len(totals) > 1:  # per-image counts (methods whose token count depends on the image)
        g = torch.tensor(totals, dtype=torch.float64) / 1e9
        out["gflops_per_image"] = {"mean": float(g.mean()), "std": float(g.std()) if len(g) > 1 else 0.0,
                                   "min": float(g.min()), "max": float(g.max())}
    if toks and len(xs) > 1:  # counted image by image: how the counts spread over the images
        out["tokens_per_image"] = token_distribution(toks, toks_mlp)
    if toks:
        out["tokens"] = [round(sum(col) / len(col), 3) for col in zip(*toks)]
        out["tokens_mlp"] = [round(sum(col) / len(col), 3) for col in zip(*toks_mlp)]
        out["tokens"] = [int(t) if float(t).is_integer() else t for t in out["tokens"]]
        out["tokens_mlp"] = [int(t) if float(t).is_integer() else t for t in out["tokens_mlp"]]
    return out


TOKEN_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def token_distribution(toks: Sequence[Sequence[float]], toks_mlp: Sequence[Sequence[float]]) -> dict[str, Any]:
    """How per-image token counts spread (``toks[i][b]``: tokens image ``i`` has entering block ``b``):
    per block, mean, min, max and the :data:`TOKEN_QUANTILES`; and a histogram of the final count
    (tokens entering the last block's MLP: ``{count: images}``)."""
    def stats(col: Sequence[float]) -> dict[str, float]:
        out = {"mean": round(sum(col) / len(col), 3), "min": min(col), "max": max(col)}
        out.update({f"q{round(q * 100)}": percentile(col, q) for q in TOKEN_QUANTILES})
        return {k: int(v) if float(v).is_integer() else v for k, v in out.items()}

    final = [int(t[-1]) for t in toks_mlp]
    return {"images": len(toks), "blocks": [stats(col) for col in zip(*toks)],
            "blocks_mlp": [stats(col) for col in zip(*toks_mlp)],
            "final_histogram": {str(n): final.count(n) for n in sorted(set(final))}}
