"""What the commands share: printing (one JSON object, one error line), the options every
measuring command takes, and a run's spec, store and printed record from them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer

from ..errors import UserError


def out_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, default=_json_default))


def _json_default(o):
    import math

    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def err(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)


# --------------------------------------------------------------------------- shared options

MODEL_ARG = typer.Argument(..., help="A timm model name, or `default` for the embedded Fashion-MNIST ViT.")
METHOD_OPT = typer.Option("none", "--method", "-m", help="Token-reduction method (see `tokenbench list`).")
SET_OPT = typer.Option(None, "--set", "-s", help="Method parameter KEY=VALUE (JSON values: r=[8,8,4]); repeatable.")
PRETRAINED_OPT = typer.Option(False, "--pretrained", help="timm's pretrained weights (needs a network).")
CKPT_OPT = typer.Option(None, "--checkpoint", "-c", help="Load weights from this file (after the method is applied).")
JSON_OPT = typer.Option(False, "--json", help="Print exactly one JSON object on stdout.")
RESULTS_OPT = typer.Option(None, "--results", help="Record the measurement in this results directory (reused if there).")


def run_spec(model: str, method: str, sets: Optional[List[str]], pretrained: bool, checkpoint: Optional[Path],
          img_size: Optional[int]) -> dict:
    from ..checks import unique_set_keys
    from ..registry import get_method, parse_set
    from ..runner import spec_dict

    unique_set_keys(sets)
    params = parse_set(sets or [])
    cls = get_method(method)
    params = cls.validate(params)
    if img_size is not None and img_size <= 0:
        raise UserError(f"--img-size must be positive, got {img_size}")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise UserError(f"checkpoint {checkpoint} does not exist")
    from ..models_seg_timm import checkpoint_arch

    if checkpoint is not None and checkpoint_arch(checkpoint) is not None:
        raise UserError(f"{checkpoint} holds a dense (segmentation) model: measure it with `tokenbench eval {model} "
                        f"--checkpoint {checkpoint} --data DATA` on a dense dataset")
    return spec_dict(model, method, params, pretrained, str(checkpoint) if checkpoint else None, img_size)


def check_data_dir(data: str, data_dir: Optional[Path]) -> None:
    """A missing or unreadable --data-dir, in one line, before anything slow runs."""
    from ..data import require_dir

    if data_dir is not None:
        require_dir(data_dir)
    elif data in ("imagenet", "folder"):
        raise UserError(f"--data-dir is required for --data {data}")


def open_store(results: Optional[Path]):
    if results is None:
        return None
    from ..store import Store

    s = Store(results)
    s.ensure_writable()
    return s


def public_record(rec: dict, reused: bool = False, results: Optional[Path] = None) -> dict:
    """A record as the commands print it; ``recorded_in``: the results directory that keeps it
    (None: not kept, pass ``--results``), ``reused``: it was read from there, not measured."""
    m = {k: v for k, v in rec["metrics"].items() if k not in ("correct", "predictions")}
    spec = rec["spec"]
    return {"model": spec["model"], "method": spec["method"], "params": spec["params"], **m,
            "weights": rec.get("weights"), "learned_parts": spec.get("learned_parts"), "env": rec["env"],
            "key": rec["key"], "reused": bool(reused), "recorded_in": None if results is None else str(results)}



def print_record(rec: dict, reused: bool, results: Optional[Path], json_: bool) -> Optional[dict]:
    """Print a measurement's warnings (stderr), and with ``json_`` the record as one JSON object;
    returns the public record for the command's own text output, or None once printed as JSON."""
    pub = public_record(rec, reused, results)
    for w in pub.get("warnings", []):
        typer.echo(f"warning: {w}", err=True)
    if json_:
        out_json(pub)
        return None
    return pub

def reused_text(pub: dict) -> str:
    """`` (reused from DIR)`` for a record read from the store, else nothing."""
    return f" (reused from {pub['recorded_in']})" if pub.get("reused") else ""

