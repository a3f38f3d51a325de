"""``tokenbench visualize`` on a dense task: per image, the image, its label mask, the predicted
mask and which positions the method kept, merged or sent down the fast path (the encoder's last
reduction stage, read from the same bookkeeping as the classification pictures)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import UserError
from .draw import _decorate, _grid, _legend_handles, _line_h, check_out, draw_panel, save_figure
from .inputs import Images, _check_index, _to_display
from .trace import dense_stage, trace


def dense_images(net, data: str, n: int, data_dir, split: str, index: Optional[Sequence[int]]):
    """(images ready for ``net``, their label masks [B, H, W], the class names): the first ``n``
    images of the dense split, or those at ``index``."""
    from ..data_scenes import build_dense_dataset

    if n < 1:
        raise UserError(f"--n must be positive, got {n}")
    ds, _ = build_dense_dataset(data, split, data_dir, model=net)
    idx = _check_index(index, len(ds)) if index else list(range(min(n, len(ds))))
    items = [ds[i] for i in idx]
    x = torch.stack([it[0] for it in items])
    masks = torch.stack([torch.as_tensor(it[1]) for it in items])
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    shown = _to_display((x - lo) / (hi - lo).clamp(min=1e-6))  # what the model sees, scaled per image
    names = list(getattr(ds, "classes", None) or [f"class {k}" for k in range(int(masks.max()) + 1)])
    imgs = Images(x=x, display=shown, labels=[f"{data} {split} #{i}" for i in idx], targets=[None] * len(idx),
                  class_names=names, source=f"{data} {split} #{','.join(map(str, idx))}")
    return imgs, masks, names


def _mask_panel(ax, mask: np.ndarray, classes: int, grid: tuple[int, int], title: str) -> None:
    from ..data_scenes import IGNORE

    shown = np.ma.masked_equal(mask, IGNORE)
    ax.imshow(shown, cmap="tab20", vmin=0, vmax=max(19, classes - 1), interpolation="nearest",
              extent=(0, grid[1], grid[0], 0))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7)


def dense_figure(imgs: Images, masks: torch.Tensor, pred: torch.Tensor, tr, classes: int, title: str):
    """Rows: images; columns: the input, the label mask, the predicted mask, the last reduction stage."""
    stage = tr.stages[-1] if tr.stages else dense_stage(len(imgs.labels), tr.grid[0] * tr.grid[1], tr.n_prefix, -1)
    nrows, ncols, panel = len(imgs.labels), 4, 1.3
    handles = _legend_handles([stage])
    fig, axes = _grid(nrows, ncols, [_line_h(7, 2)] * nrows, _line_h(7, 1), panel=panel, gap=0.1,
                      top=_line_h(9, 2), bottom=_line_h(6.5, 2 if handles else 0))
    for b in range(nrows):
        draw_panel(axes[b, 0], imgs.display[b], None, b, tr.grid)
        axes[b, 0].set_title(f"{imgs.labels[b]}\ninput", fontsize=7)
        _mask_panel(axes[b, 1], masks[b].numpy(), classes, tr.grid, "label\nper pixel")
        agree = (pred[b] == masks[b])[masks[b] != 255].float().mean().item() if (masks[b] != 255).any() else 0.0
        _mask_panel(axes[b, 2], pred[b].numpy(), classes, tr.grid, f"predicted\n{100 * agree:.0f}% pixels right")
        draw_panel(axes[b, 3], imgs.display[b], stage, b, tr.grid)
        head = stage.title() if tr.stages else f"no reduction: {stage.n_tokens} tokens"
        axes[b, 3].set_title(f"{head}\n{stage.caption(b)}", fontsize=7)
    _decorate(fig, title, handles)
    return fig


def visualize_dense(model: str, method: str, params: dict, out: str | Path, data: str, n: int = 4,
                    data_dir=None, split: str = "test", index: Optional[Sequence[int]] = None,
                    checkpoint: Optional[str] = None, dpi: int = 200) -> dict:
    """One figure of a dense model with ``method`` on its encoder; returns a summary."""
    from ..measure.dense import dense_flops
    from ..models_seg import encoder_of
    from ..registry import get_method
    from ..runner_dense import load_dense, per_image, task_of

    check_out(out)
    task_of(model, data, checkpoint=checkpoint)
    params = get_method(method).validate(params or {})
    net, _ = load_dense(model, method, params, checkpoint)
    imgs, masks, names = dense_images(net, data, n, data_dir, split, index)
    with torch.inference_mode():
        pred = net(imgs.x).argmax(1)
    tr = trace(encoder_of(net), imgs.x)  # the stages of the encoder, where the method acts
    varies = per_image({"model": model, "method": method, "params": params})
    g = dense_flops(net, inputs=imgs.x if varies else None)["gflops"]  # a per-image method: these scenes' mean
    dense = dense_flops(load_dense(model, "none", {}, checkpoint)[0])["gflops"]
    shown = ", ".join(f"{k}={v}" for k, v in params.items())
    title = (f"{model} + {method}{f' ({shown})' if shown else ''}: {g:.3g} GFLOPs (backbone + decoder"
             f"{', mean over these scenes' if varies else ''}) = {g / dense:.2f}x dense")
    path = save_figure(dense_figure(imgs, masks, pred, tr, len(names), title), out, dpi)
    return {"out": str(path), "model": model, "method": method, "params": params, "task": "segmentation",
            "gflops": g, "dense_gflops": dense, "flops_ratio": g / dense, "images": imgs.source,
            "n_images": len(imgs.labels), "panels_per_image": 4,
            "stages": [{"block": s.block, "kind": s.kind, "tokens": s.n_tokens} for s in tr.stages]}
