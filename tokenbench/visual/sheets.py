"""``tokenbench visualize``'s two pictures, from model name to figure file: load the model,
pick the images, trace, draw.

Entry points: :func:`visualize` (one method, every stage) and :func:`compare` (several
methods, final stage, one sheet).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ..errors import UserError
from .budget import Flops, column_params, fmt_params
from .draw import Column, check_out, compare_figure, method_figure, save_figure, select_stages
from .inputs import Images, images_from_dataset, images_from_files
from .trace import SLOW_PATH, Stage, trace


def _load(model: str, method: str, params: dict, checkpoint: Optional[str], pretrained: bool):
    from ..api import load

    return load(model, method, params, pretrained=pretrained, checkpoint=checkpoint)


def _images(net, images: Optional[Sequence[str | Path]], data: str, n: int, data_dir, split: str,
            index: Optional[Sequence[int]]) -> Images:
    if images:
        return images_from_files(net, images)
    return images_from_dataset(net, data, n, data_dir=data_dir, split=split, index=index)


def visualize(model: str = "default", method: str = "none", params: Optional[dict] = None,
              out: str | Path = "tokens.png", images: Optional[Sequence[str | Path]] = None,
              data: str = "fashion-mnist", n: int = 4, data_dir=None, split: str = "test",
              index: Optional[Sequence[int]] = None, checkpoint: Optional[str] = None, pretrained: bool = False,
              stages: str = "all", dpi: int = 200, flops_cache: Optional[Path] = None) -> dict:
    """One figure for ``method``: each image, then one panel per reduction stage.  Returns a summary."""
    check_out(out)
    net, prov = _load(model, method, params or {}, checkpoint, pretrained)
    imgs = _images(net, images, data, n, data_dir, split, index)
    tr = trace(net, imgs.x)
    fl = Flops(flops_cache)
    p = prov["params"]
    g, dense = fl.count(model, method, p), fl.dense(model)
    untrained = " (untrained parts)" if prov.get("learned_parts") == "untrained" else ""
    ptxt = f" ({fmt_params(p)})" if p else ""
    title = f"{model} + {method}{ptxt}{untrained}: {g:.3g} GFLOPs = {g / dense:.2f}x dense"
    fig = method_figure(imgs, tr, title=title, stages=stages)
    path = save_figure(fig, out, dpi)
    shown = select_stages(tr.stages, stages)
    return {"out": str(path), "model": model, "method": method, "params": p, "gflops": g, "dense_gflops": dense,
            "flops_ratio": g / dense, "learned_parts": prov.get("learned_parts"), "images": imgs.source,
            "n_images": len(imgs.labels),
            "stages": [_stage_summary(s) for s in tr.stages],
            "panels_per_image": 1 + max(1, len(shown))}


def _stage_summary(s: Stage) -> dict:
    out = {"block": s.block, "kind": s.kind, "tokens": s.n_tokens}
    if s.kind == SLOW_PATH:  # a hierarchical model keeps its map: the positions on the slow path, per image
        out["slow"] = [s.counts(b)["kept"] for b in range(s.role.shape[0])]
    return out


def compare(model: str = "default", methods: Optional[Sequence[str]] = None,
            flops: Optional[float] = None, params: Optional[dict[str, dict]] = None,
            out: str | Path = "compare.png", images: Optional[Sequence[str | Path]] = None,
            data: str = "fashion-mnist", n: int = 4, data_dir=None, split: str = "test",
            index: Optional[Sequence[int]] = None, checkpoints: Optional[dict[str, Optional[str]]] = None,
            pretrained: bool = False, dpi: int = 200, flops_cache: Optional[Path] = None) -> dict:
    """The same images across ``methods`` (final stage) in one grid, at ``flops`` x dense FLOPs when given.

    ``methods``: default every registered method with a budget knob;
    ``params``: per method, parameters to use (the searched one is then overridden);
    ``checkpoints``: per method, a checkpoint to load (``None`` key: for every method).
    """
    from ..registry import get_method, list_methods

    check_out(out)
    if methods is None:
        methods = [m["name"] for m in list_methods() if m["knob"]]
    if not methods:
        raise UserError("--compare needs at least one method")
    if flops is not None and not 0 < flops <= 1:
        raise UserError(f"--flops is a fraction of the dense model's FLOPs in (0, 1], got {flops}")
    for m in methods:
        get_method(m)
    params = params or {}
    checkpoints = checkpoints or {}
    fl = Flops(flops_cache)
    dense = fl.dense(model)
    imgs: Optional[Images] = None
    columns, summary = [], []
    for m in methods:
        cls = get_method(m)
        p = cls.validate(params.get(m, {}))
        ckpt = checkpoints.get(m, checkpoints.get(None))
        p, res = column_params(cls, fl, model, p, flops, ckpt)
        net, prov = _load(model, m, p, ckpt, pretrained)
        if imgs is None:
            imgs = _images(net, images, data, n, data_dir, split, index)
        tr = trace(net, imgs.x)
        g = fl.count(model, m, prov["params"])
        shown_p = fmt_params(prov["params"], cls.knob)
        miss = " (miss)" if res is not None and res.miss else ""
        untrained = "\nuntrained predictor" if prov.get("learned_parts") == "untrained" else ""
        label = f"{m}\n{shown_p or 'dense'}\n{g / dense:.2f}x FLOPs{miss}{untrained}"
        columns.append(Column(method=m, params=prov["params"], label=label, trace=tr))
        summary.append({"method": m, "params": prov["params"], "gflops": g, "flops_ratio": g / dense,
                        "miss": bool(res.miss) if res is not None else None,
                        "learned_parts": prov.get("learned_parts"), "checkpoint": ckpt,
                        "final_tokens": tr.stages[-1].n_tokens if tr.stages else None})
    target = f" at {flops:.2f}x dense FLOPs" if flops is not None else ""
    title = f"{model}: token reduction{target} (dense: {dense:.3g} GFLOPs)"
    fig = compare_figure(imgs, columns, title=title)
    path = save_figure(fig, out, dpi)
    return {"out": str(path), "model": model, "target": flops, "dense_gflops": dense, "images": imgs.source,
            "n_images": len(imgs.labels), "methods": summary}

