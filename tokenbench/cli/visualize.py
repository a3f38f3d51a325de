"""``tokenbench visualize``: which patches each token stands for, stage by stage (hierarchical
models: which positions of the stage-3 map take the slow path, predictor by predictor), or a
comparison sheet."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UserError


def _split_sets(sets: Optional[List[str]], methods: list[str]) -> dict[str, dict]:
    """``KEY=VALUE`` for every compared method declaring KEY; ``METHOD.KEY=VALUE`` for one."""
    from ..registry import get_method, parse_set

    out: dict[str, dict] = {m: {} for m in methods}
    for k, v in parse_set(sets or []).items():
        if "." in k and k.split(".", 1)[0] in out:
            m, key = k.split(".", 1)
            out[m][key] = v
            continue
        takers = [m for m in methods if k in {p.name for p in get_method(m).params}]
        if not takers:
            raise UserError(f"--set {k}: none of the compared methods ({', '.join(methods)}) has a parameter {k!r}")
        for m in takers:
            out[m][k] = v
    for m, p in out.items():
        out[m] = get_method(m).validate(p)
    return out


def _split_checkpoints(items: Optional[List[str]], methods: list[str]) -> dict:
    """``PATH`` (every method) or ``METHOD=PATH`` (one method)."""
    out: dict = {}
    for item in items or []:
        m, sep, path = item.partition("=")
        if sep and m in methods:
            out[m] = path
        elif sep and not Path(item).exists() and m.isidentifier():
            raise UserError(f"--checkpoint {item}: {m!r} is not one of the methods shown ({', '.join(methods)})")
        else:
            out[None] = item
    for path in out.values():
        if not Path(path).is_file():
            raise UserError(f"checkpoint {path} does not exist")
    return out


def _index(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UserError(f"--index takes comma-separated integers, got {text!r}") from None


VISUALS = Path("runs") / "visuals"  # git-ignored; `make visuals` passes --out results/figures/...


def _warn_untrained(method: str, checkpoint) -> None:
    """A learned method drawn without a checkpoint shows its untrained (random) predictors: say so."""
    from ..registry import get_method

    if get_method(method).learned and not checkpoint:
        typer.echo(f"warning: {method} is learned and no --checkpoint was given: its predictors are untrained, "
                   "so the picture shows random choices (pass the trained model.pt, as `make visuals` does)",
                   err=True)


def _dense_picture(model, data, method, compare, flops, sets, out, images, n, data_dir, split, index, checkpoint,
                   dpi, json_) -> bool:
    """A dense model's picture (image, label and predicted masks, the positions kept, merged or on
    the fast path); False when ``model`` and ``data`` are a classification task's."""
    from ..data_scenes import SCENES, is_dense_data
    from ..models_seg import is_dense_model
    from ..registry import parse_set
    from ..visual.dense import visualize_dense

    if not (is_dense_model(model) or is_dense_data(data)):
        return False
    data = SCENES if data == "fashion-mnist" and is_dense_model(model) else data
    for what, given in (("--compare", compare), ("--flops", flops), ("--images", images)):
        if given:
            raise UserError(f"{what} is not available for a dense model's picture: give --method and its budget "
                            "with --set")
    if checkpoint and len(checkpoint) > 1:
        raise UserError("--checkpoint is given more than once")
    summary = visualize_dense(model, method, parse_set(sets or []), out or VISUALS / f"dense_{method}.png", data, n,
                              data_dir, split if split != "test" or data == SCENES else "val", _index(index),
                              checkpoint[0] if checkpoint else None, dpi)
    if json_:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(f"wrote {summary['out']}: {summary['n_images']} images x 4 panels (image, label, prediction, "
                   f"tokens); {summary['gflops']:.3g} GFLOPs = {summary['flops_ratio']:.2f}x dense")
    return True


def register(app: typer.Typer) -> None:
    from ..visual import budget as vb

    @app.command("visualize")
    def visualize_cmd(
        model: str = typer.Argument(..., help="A timm model name, or `default` for the embedded Fashion-MNIST ViT."),
        method: Optional[str] = typer.Option(None, "--method", "-m", help="The method to show, one panel per "
                                                                        "reduction stage."),
        set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Method parameter KEY=VALUE; with "
                                                 "--compare it applies to every method declaring KEY "
                                                 "(METHOD.KEY=VALUE for one); repeatable."),
        compare: Optional[str] = typer.Option(None, "--compare", help="A comparison sheet of these methods "
                                              "(comma-separated, or `all`): rows images, columns methods "
                                              "(final stage)."),
        flops: Optional[float] = typer.Option(None, "--flops", help="Match the method (with --compare: every "
                                              "method) to this fraction of the dense model's FLOPs (e.g. 0.6); "
                                              f"one method without its budget set: {vb.DEFAULT_FLOPS}."),
        images: Optional[List[Path]] = typer.Option(None, "--images", "-i", help="Image files (PNG, JPEG, ...) or "
                                                    "folders of them; repeatable.  Default: --data."),
        data: str = typer.Option("fashion-mnist", "--data", help="Dataset to take images from (fashion-mnist, "
                                                                 "synthetic, folder, imagenet)."),
        data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where the dataset lives."),
        split: str = typer.Option("test", "--split", help="Dataset split."),
        n: int = typer.Option(4, "--n", "-n", help="Number of images (one per class first)."),
        index: Optional[str] = typer.Option(None, "--index", help="Exact image indices in the split: 0,5,12."),
        stages: str = typer.Option("all", "--stages", help="Stages to draw: all, final, or block indices "
                                   "(3,6,9); a --compare sheet shows the final one."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output figure: .png, .pdf or .svg "
                                           "(default runs/visuals/tokens_<method>.png or "
                                           "runs/visuals/compare.png)."),
        dpi: int = typer.Option(200, "--dpi", help="Resolution of a PNG."),
        checkpoint: Optional[List[str]] = typer.Option(None, "--checkpoint", "-c", help="Weights to load after "
                                                       "the method is applied; with --compare, METHOD=PATH for "
                                                       "one method (repeatable)."),
        pretrained: bool = typer.Option(False, "--pretrained", help="timm's pretrained weights (needs a network)."),
        flops_cache: Optional[Path] = typer.Option(None, "--flops-cache", help="JSON cache of FLOPs counts "
                                                   "(the sweep's matched-FLOPs cache works)."),
        json_: bool = typer.Option(False, "--json", help="Print exactly one JSON object on stdout."),
    ):
        """Draw which original patches each token stands for, after every reduction stage.

        Pruning: dropped patches greyed out, a fused token (the dropped ones kept as one) hatched.  Merging: each merged token one region in its own colour with white borders.

        Hierarchical models (ConvNeXt, Swin): one panel per stage-3 predictor on the stage-3 grid, the positions on the fast path dimmed.

        With --compare: one sheet, the same images across several methods (their final stage), at matched FLOPs with --flops.
        """
        from ..visual import sheets
        from ..visual.draw import check_out
        from ..visual.inputs import expand_image_paths
        from ..checks import unique_set_keys
        from ..registry import get_method, list_methods, parse_set

        if compare is None and method is None:
            raise UserError("give --method NAME (one method, every stage) or --compare M1,M2,... (a sheet)")
        if _dense_picture(model, data, method, compare, flops, set_, out, images, n, data_dir, split, index,
                          checkpoint, dpi, json_):
            return
        if compare is not None and method is not None:
            raise UserError("give either --method or --compare, not both")
        if flops is not None and not 0 < flops <= 1:
            raise UserError(f"--flops is a fraction of the dense model's FLOPs in (0, 1], got {flops}")
        idx = _index(index)
        unique_set_keys(set_)
        if compare is not None:
            if compare.strip().lower() == "all":
                methods = [m["name"] for m in list_methods()]
            else:
                methods = [m for m in compare.replace(" ", "").split(",") if m]
            if not methods:
                raise UserError("--compare needs at least one method")
            for m in methods:
                get_method(m)
            if len(set(methods)) != len(methods):
                raise UserError("--compare lists a method twice")
            ckpts = _split_checkpoints(checkpoint, methods)
            for m in methods:
                _warn_untrained(m, ckpts.get(m) or ckpts.get(None))
            summary = sheets.compare(model, methods, flops=flops, params=_split_sets(set_, methods),
                                 out=out or VISUALS / "compare.png", images=images, data=data, n=n,
                                 data_dir=data_dir, split=split, index=idx,
                                 checkpoints=ckpts, pretrained=pretrained,
                                 dpi=dpi, flops_cache=flops_cache)
            if json_:
                typer.echo(json.dumps(summary))
                return
            cols = ", ".join(f"{s['method']} {s['flops_ratio']:.2f}x" for s in summary["methods"])
            typer.echo(f"wrote {summary['out']}: {summary['n_images']} images x {len(methods)} methods ({cols})")
            return
        cls = get_method(method)
        params = parse_set(set_ or [])
        if checkpoint and len(checkpoint) > 1:
            raise UserError("--checkpoint is given more than once (METHOD=PATH is for --compare)")
        ckpt = checkpoint[0] if checkpoint else None
        if ckpt is not None and not Path(ckpt).is_file():
            raise UserError(f"checkpoint {ckpt} does not exist")
        _warn_untrained(method, ckpt)
        out = out or VISUALS / f"tokens_{method}.png"
        check_out(out)  # the cheap checks before the FLOPs search
        if images:
            expand_image_paths(images)
        params, note = vb.picture_params(cls, model, params, flops, ckpt, flops_cache)
        summary = sheets.visualize(model, method, params, out=out, images=images,
                               data=data, n=n, data_dir=data_dir, split=split, index=idx, checkpoint=ckpt,
                               pretrained=pretrained, stages=stages, dpi=dpi, flops_cache=flops_cache)
        if json_:
            typer.echo(json.dumps(summary))
            return
        if note:
            typer.echo(note, err=True)
        typer.echo(f"wrote {summary['out']}: {summary['n_images']} images x {summary['panels_per_image']} panels; "
                   f"{summary['gflops']:.3g} GFLOPs = {summary['flops_ratio']:.2f}x dense")
