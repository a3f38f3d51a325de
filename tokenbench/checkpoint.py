"""Loading checkpoint files into (method-applied) models, with clear errors."""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import torch
import torch.nn as nn

from .backbones import added_modules
from .errors import UserError
from .store import sha256_file

def read_state_dict(path: str | os.PathLike) -> dict:
    """The tensor state dict inside a checkpoint file (``model`` / ``state_dict`` / bare)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint {p} does not exist")
    if not p.is_file() or not os.access(p, os.R_OK):
        raise UserError(f"checkpoint {p} is not a readable file")
    try:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # Release files often carry their training args (argparse.Namespace).
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(p, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as e:
        import zipfile

        size = p.stat().st_size
        if size == 0:
            why = "the file is empty"
        elif zipfile.is_zipfile(p):
            why = f"{e.__class__.__name__}: {(str(e).splitlines() or [''])[0].split('. ')[0][:120]}"
        else:
            why = f"not a complete PyTorch archive ({size} bytes): truncated, or not a PyTorch checkpoint"
        raise UserError(f"cannot read checkpoint {p}: {why}") from None
    if isinstance(obj, dict):
        for k in ("model", "state_dict", "model_state", "module"):
            if k in obj and isinstance(obj[k], dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {p} holds no state dict of tensors")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "model.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _summarise(keys: list[str], n: int = 4) -> str:
    s = ", ".join(keys[:n])
    return s + (f" and {len(keys) - n} more" if len(keys) > n else "")


def official_layout(model: nn.Module, sd: dict) -> dict:
    """``sd`` in our layout: the applied method's :meth:`~tokenbench.registry.Method.convert_checkpoint`
    (official release files of learned methods), else the backbone's ``from_official``."""
    from .backbones import applied_method, backbone_of
    from .registry import get_method

    name = applied_method(model).get("name")
    converted = get_method(name)().convert_checkpoint(model, sd) if name else None
    if converted is not None:
        return converted
    try:
        return backbone_of(model).from_official(sd)
    except UserError:  # a family without a backbone: as it is
        return sd


def load_state_dict_checked(model: nn.Module, sd: dict, source: str = "checkpoint") -> dict:
    """Load ``sd`` into ``model`` strictly; a clear error names the mismatched keys."""
    sd = official_layout(model, sd)
    try:  # timm's own conversions for older ViT checkpoints (pos-embed resize etc.)
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

        if isinstance(model, VisionTransformer):
            own = model.state_dict()
            added = tuple(f"{m}." for m in added_modules(model))
            extra = {k: v for k, v in sd.items() if k not in own or (added and k.startswith(added))}
            base = {k: v for k, v in sd.items() if k not in extra}
            base = checkpoint_filter_fn(base, model)
            sd = {**base, **extra}
    except Exception:
        pass
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch: " + _summarise(wrong, 3))
        if missing:
            parts.append("missing: " + _summarise(missing))
        if unexpected:
            parts.append("unexpected: " + _summarise(unexpected))
        raise UserError(f"{source} does not fit {model.__class__.__name__.replace('Reducing', '')} ("
                        + "; ".join(parts) + ")")
    model.load_state_dict(sd, strict=True)
    return {"keys": len(sd)}


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> dict:
    """Load a checkpoint file into ``model``; provenance for the record."""
    sd = official_layout(model, read_state_dict(path))
    load_state_dict_checked(model, sd, source=f"checkpoint {path}")
    added = tuple(f"{m}." for m in added_modules(model))
    learned_keys = [k for k in sd if added and k.startswith(added)]
    from .outputs import repository_relative

    return {"checkpoint": repository_relative(path), "weights": f"sha256:{sha256_file(path)}", "pretrained": True,
            "learned_parts_in_checkpoint": bool(learned_keys) or (not added and _trained_with_method(model, path))}


def _trained_with_method(model: nn.Module, path) -> bool:
    """Whether ``tokenbench train`` made ``path`` with the method applied to ``model`` (its run's
    ``config.json`` names it): for a method that adds no modules, the whole model is what it learns."""
    from .backbones import applied_method
    from .checks import run_config

    name = applied_method(model).get("name")
    return bool(name) and (run_config(str(path)) or {}).get("method") == name
