"""Checks that keep a number from being silently wrong.

Each function is pure (apart from :func:`run_config`, which reads one file): it either
raises :class:`UserError` (a one-line refusal, before anything is measured) or returns
warnings, strings that the caller stores in the record (``metrics["warnings"]``) and the
CLI prints as ``warning: ...`` lines.  No method or parameter is known here by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import UserError


# --------------------------------------------------------------------------- refusals

def unique_set_keys(items: Optional[Sequence[str]]) -> None:
    """Refuse ``--set k=a --set k=b`` (the last one would silently win)."""
    seen: set[str] = set()
    for item in items or ():
        key = item.split("=", 1)[0].strip()
        if "=" in item and key in seen:
            raise UserError(f"--set {key} is given twice; give each parameter once")
        seen.add(key)


def eval_options(split: str, precision: str, limit: Optional[int], batch_size: int,
                 hint: str = "") -> None:
    """Refuse an evaluation's split, precision, --limit or --batch-size in one line."""
    if split not in ("train", "val", "test"):
        raise UserError(f"unknown split {split!r}{hint} (use train, val or test)")
    if precision not in ("fp32", "fp16", "bf16"):
        raise UserError(f"unknown precision {precision!r} (use fp32, fp16 or bf16)")
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be positive, got {limit}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {batch_size}")


def min_run_time(seconds: float) -> None:
    if not seconds > 0:
        raise UserError(f"--min-run-time must be positive, got {seconds:g}")


def input_size(requested: Optional[int], built: int, patch: Optional[int], model: str) -> None:
    """Refuse an ``--img-size`` the model would not compute at exactly (it would record one size
    and measure another, or fail inside the model)."""
    if requested is None:
        return
    if requested != built:
        raise UserError(f"{model} takes {built} px input only; --img-size {requested} cannot be honoured")
    if patch and requested % patch:
        lo, hi = requested // patch * patch, (requested // patch + 1) * patch
        raise UserError(f"--img-size {requested} is not a multiple of {model}'s patch size {patch}: the model would "
                        f"see only {lo} px of it (use {lo} or {hi})")


def limit_within(limit: Optional[int], available: int, what: str) -> None:
    """Refuse a ``--limit`` above the set's size (the record would claim images it never saw)."""
    if limit is not None and limit > available:
        raise UserError(f"--limit {limit} is more than the {available} images of {what}")


def head_fits(head: Optional[int], classes: Optional[int], what: str) -> None:
    """Refuse scoring a head whose outputs are not the data's classes one to one.

    Always a refusal, trained weights or not: with more outputs than classes, top-1 counts
    predictions of classes the data does not have (a random-init 1000-way head on
    Fashion-MNIST scores about 0%, which reads as "the method destroys accuracy"); with
    fewer, some labels can never be predicted.
    """
    if head and classes and head != classes:
        raise UserError(f"the model's head has {head} outputs but {what} has {classes} classes: its accuracy would "
                        "be meaningless (use a model with a matching head, e.g. one fine-tuned with `tokenbench train`)")


# --------------------------------------------------------------------------- warnings

def weights_warnings(method: str, learned_parts: Optional[str], weights: Optional[str]) -> list[str]:
    """Accuracy of weights that are not what the method's name promises."""
    out = []
    if learned_parts == "untrained":
        out.append(f"{method}'s learned parts are untrained (randomly initialised, not in the weights): this is "
                   f"not {method}'s accuracy; train them with `tokenbench train MODEL --method {method}` and pass "
                   "--checkpoint RUN/model.pt")
    if weights is not None and str(weights).startswith("random-init"):
        out.append("random-init weights (no --pretrained or --checkpoint): accuracy is chance level, "
                   "not a measurement of the method")
    return out


def _schedule_text(tokens: Sequence[float]) -> str:
    return "[" + ",".join(f"{t:g}" for t in tokens) + "]"


def schedule_disagreement(declared: Optional[tuple], tokens: Optional[Sequence[float]],
                          tokens_mlp: Optional[Sequence[float]]) -> Optional[str]:
    """Why a method's declared token schedule (``expected_tokens``: tokens per block, tokens per
    MLP) is not what its forward keeps (the traced ``tokens``, ``tokens_mlp``), or None when they
    agree or there is nothing to compare.  The matched-FLOPs search ranks values by the declared
    schedule, so a disagreement sends it to the wrong value."""
    if declared is None or not tokens:
        return None
    want = [[float(t) for t in seq] for seq in declared]
    got = [[float(t) for t in tokens], [float(t) for t in (tokens_mlp or tokens)]]
    if want == got:
        return None
    return (f"the method's declared token schedule (expected_tokens) disagrees with what its forward keeps: "
            f"declared {_schedule_text(want[0])}, traced {_schedule_text(got[0])} tokens per block; the "
            "matched-FLOPs search ranks values by the declared schedule, so it misses its target")


def run_config(checkpoint: Optional[str]) -> Optional[dict]:
    """The ``config.json`` that ``tokenbench train`` wrote next to ``checkpoint``, if any."""
    if not checkpoint:
        return None
    path = Path(checkpoint).parent / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def held_out_warnings(spec: dict, data: Optional[str], split: Optional[str]) -> list[str]:
    """A Fashion-MNIST ``val`` or ``train`` figure of weights trained on all 60,000 train images (the
    embedded checkpoints, trained before ``val`` was held out, and what was fine-tuned from them):
    not held out.  Read from the run's config.json (steps per epoch x batch above the 55,000)."""
    if data != "fashion-mnist" or split not in ("val", "train"):
        return []
    cfg = run_config(spec.get("checkpoint"))
    if cfg is None and not spec.get("checkpoint"):
        from .models import EMBEDDED_MODELS, embedded_paths

        if spec["model"] in EMBEDDED_MODELS:
            try:
                cfg = json.loads(embedded_paths(name=spec["model"])["config"].read_text())
            except (OSError, ValueError):
                cfg = None
    train = (cfg or {}).get("train") or {}
    seen = (cfg or {}).get("steps_per_epoch", 0) * train.get("batch_size", 0)
    if (cfg or {}).get("data", "fashion-mnist") != "fashion-mnist" or seen <= 55000:
        return []
    return [f"these weights were trained on all 60,000 Fashion-MNIST train images ({seen:,} an epoch), "
            f"the {split} images among them: this {split} figure is not held out (use --split test)"]


def trained_params_warnings(method: str, params: dict, trained: Optional[dict]) -> list[str]:
    """Parameters that differ from the ones the checkpoint was trained with (same method).

    ``trained`` is the run's ``config.json``; every parameter both sides have is compared.
    """
    if not trained or trained.get("method") != method or not isinstance(trained.get("params"), dict):
        return []
    tp: dict[str, Any] = trained["params"]
    diff = [k for k in sorted(set(tp) & set(params)) if tp[k] != params[k]]
    if not diff:
        return []
    was = ", ".join(f"{k}={json.dumps(tp[k])}" for k in diff)
    now = ", ".join(f"{k}={json.dumps(params[k])}" for k in diff)
    return [f"the checkpoint was trained with {method} at {was}, measured here at {now}"]


# --------------------------------------------------------------------------- one run

def for_run(kind: str, spec: dict, net, prov: dict) -> list[str]:
    """The refusals and warnings of one measurement of ``spec`` on the loaded ``net``
    (``prov``: its provenance from :func:`tokenbench.api.load`); reads the checkpoint's
    run config when there is one."""
    from .backbones import input_config

    mi = input_config(net)
    if mi["patch_size"]:  # a patch-embedding model (others take any size)
        input_size(spec.get("img_size"), mi["img_size"], mi["patch_size"], spec["model"])
    # a checkpoint measured at other parameters than it was trained with: FLOPs, speed and accuracy alike
    trained = trained_params_warnings(spec["method"], spec["params"], run_config(spec.get("checkpoint")))
    if kind != "accuracy":
        return trained
    return weights_warnings(spec["method"], prov.get("learned_parts"), prov.get("weights")) + trained
