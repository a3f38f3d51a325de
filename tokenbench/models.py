"""Models: timm models by name, checkpoints, and the embedded models.

``create_model("default")`` is the project's own ViT trained on Fashion-MNIST and
``create_model("default-convnext")`` its hierarchical sibling, a small timm ConvNeXt (see
``tokenbench train-base --model NAME``); anything else is a timm model name.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from .errors import UserError, did_you_mean
from .store import sha256_file

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_DIR = Path(os.environ.get("TOKENBENCH_EMBEDDED_DIR", REPO_ROOT / "results" / "embedded"))
EMBEDDED_CONVNEXT_DIR = Path(os.environ.get("TOKENBENCH_EMBEDDED_CONVNEXT_DIR",
                                            REPO_ROOT / "results" / "embedded-convnext"))
EMBEDDED_SMALL_DIR = Path(os.environ.get("TOKENBENCH_EMBEDDED_SMALL_DIR", REPO_ROOT / "results" / "default-small"))
EMBEDDED_NAME = "default"
EMBEDDED_CONVNEXT = "default-convnext"
EMBEDDED_SMALL = "default-small"
EMBEDDED_MODELS = (EMBEDDED_NAME, EMBEDDED_CONVNEXT, EMBEDDED_SMALL)
# The embedded dense models (built by :mod:`tokenbench.models_seg`; measured by `tokenbench eval`).
DENSE_MODELS = ("default-seg", "default-convnext-seg")

# The embedded model's architecture.  A timm VisionTransformer with a class token and
# 12 blocks, so every ViT adapter applies to it unchanged; a small convolutional stem
# makes the 7x7 = 49 patch tokens (patch 4 on 28x28), which converges far faster on
# small data than a linear patch projection.
EMBEDDED_ARCH: dict[str, Any] = {
    "img_size": 28,
    "patch_size": 4,
    "in_chans": 1,
    "num_classes": 10,
    "embed_dim": 96,
    "depth": 12,
    "num_heads": 3,
    "mlp_ratio": 2.0,
    "stem_channels": [32, 64],
}

# The smaller dense sibling of the embedded ViT (``default-small``): the same stem, grid and
# recipe at half the width and half the depth (about a sixth of the FLOPs), so a sweep can
# draw "use a smaller model" as a line beside the token-reduction methods.
EMBEDDED_SMALL_ARCH: dict[str, Any] = {**EMBEDDED_ARCH, "embed_dim": 48, "depth": 6, "num_heads": 3}

# The hierarchical embedded model: a timm ConvNeXt whose stem keeps the resolution (stride 1)
# so that the 28 x 28 image keeps four stages of 28, 14, 7 and 3 positions a side: stage 3,
# where DynamicViT's journal version acts, is 7 x 7 = 49 positions with six blocks
# (predictors before its blocks 1, 2, 3, as for ConvNeXt-T).  Widths are multiples of 16,
# which the CPU's depthwise convolutions run much faster than nearby widths.  Two changes from
# timm's defaults make it learn in a short schedule: a 3x3 stem (a 1x1 stem on one grey channel
# gives every position a rank-one embedding) and layer scales starting at 1, not 1e-6 (blocks
# that start as the identity need more epochs than the embedded budget has).  A checkpoint
# whose config lacks these keys was trained with timm's defaults (stem 1, 1e-6).
EMBEDDED_CONVNEXT_ARCH: dict[str, Any] = {
    "family": "convnext",
    "img_size": 28,
    "patch_size": 1,
    "in_chans": 1,
    "num_classes": 10,
    "depths": [1, 1, 6, 1],
    "dims": [16, 32, 64, 128],
    "stem_kernel": 3,
    "ls_init_value": 1.0,
}


# What a default-convnext architecture key meant before it existed: a stored config without it
# was trained so (timm's defaults).
ARCH_KEYS_BEFORE: dict[str, Any] = {"stem_kernel": 1, "ls_init_value": 1e-6}


def is_embedded(name: str) -> bool:
    """Whether ``name`` is one of the project's embedded models (``default``, ``default-convnext``,
    ``default-small``)."""
    return name in EMBEDDED_MODELS


def embedded_arch(name: str) -> dict[str, Any]:
    """The architecture of embedded model ``name``."""
    return dict({EMBEDDED_CONVNEXT: EMBEDDED_CONVNEXT_ARCH, EMBEDDED_SMALL: EMBEDDED_SMALL_ARCH}.get(name, EMBEDDED_ARCH))


def embedded_dir(name: str) -> Path:
    """The committed folder of embedded model ``name``."""
    return {EMBEDDED_CONVNEXT: EMBEDDED_CONVNEXT_DIR, EMBEDDED_SMALL: EMBEDDED_SMALL_DIR}.get(name, EMBEDDED_DIR)


# --------------------------------------------------------------------------- conv stem

def _conv_stem_class():
    from timm.layers import PatchEmbed

    class ConvStemPatchEmbed(PatchEmbed):
        """timm's PatchEmbed with the linear projection replaced by a small conv stem.

        Strided 3x3 convolutions (BatchNorm, GELU) down to the patch grid, then a 1x1
        projection to the embedding width.  Everything else (grid, num_patches,
        flatten, output format) is timm's, so the ViT around it is a plain timm ViT.
        """

        def __init__(self, img_size=28, patch_size=4, in_chans=1, embed_dim=128, stem_channels=(32, 64),
                     **kwargs):
            super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                             **kwargs)
            stride_total = self.patch_size[0]
            n_down = max(1, int(round(torch.log2(torch.tensor(float(stride_total))).item())))
            if 2 ** n_down != stride_total or len(stem_channels) != n_down:
                raise ValueError(f"conv stem needs len(stem_channels) == log2(patch_size) ({n_down})")
            layers: list[nn.Module] = []
            c_in = in_chans
            for c in stem_channels:
                layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.GELU()]
                c_in = c
            layers.append(nn.Conv2d(c_in, embed_dim, 1))
            self.proj = nn.Sequential(*layers)

    return ConvStemPatchEmbed


def _pretrained_cfg(a: dict, architecture: str) -> dict:
    return {"architecture": architecture, "input_size": (a["in_chans"], a["img_size"], a["img_size"]),
            "mean": (0.2860,), "std": (0.3530,), "num_classes": a["num_classes"],
            "interpolation": "bilinear", "crop_pct": 1.0}


def build_embedded_convnext(arch: Optional[dict] = None) -> nn.Module:
    """The hierarchical embedded model (a plain timm ``ConvNeXt``) with fresh weights."""
    from timm.models.convnext import ConvNeXt

    a = dict(EMBEDDED_CONVNEXT_ARCH)
    a.update(arch or {})
    model = ConvNeXt(in_chans=a["in_chans"], num_classes=a["num_classes"], depths=tuple(a["depths"]),
                     dims=tuple(a["dims"]), patch_size=a["patch_size"],
                     ls_init_value=a["ls_init_value"])
    k = a["stem_kernel"]
    if k != 1:  # a k x k stem with the patch stride, padded to keep img_size / patch_size positions
        from timm.layers import LayerNorm2d

        model.stem = nn.Sequential(nn.Conv2d(a["in_chans"], a["dims"][0], k, stride=a["patch_size"], padding=k // 2),
                                   LayerNorm2d(a["dims"][0]))
    model.pretrained_cfg = _pretrained_cfg(a, "tokenbench_default_convnext")
    model.tokenbench_arch = a
    return model


def build_embedded(arch: Optional[dict] = None) -> nn.Module:
    """An embedded model's architecture with fresh weights: the ViT ``default``, or the
    ConvNeXt ``default-convnext`` where ``arch["family"]`` says ``convnext``."""
    from timm.models.vision_transformer import VisionTransformer

    if (arch or {}).get("family") == "convnext":
        return build_embedded_convnext(arch)
    a = dict(EMBEDDED_ARCH)
    a.update(arch or {})
    stem = _conv_stem_class()
    model = VisionTransformer(
        img_size=a["img_size"], patch_size=a["patch_size"], in_chans=a["in_chans"], num_classes=a["num_classes"],
        embed_dim=a["embed_dim"], depth=a["depth"], num_heads=a["num_heads"], mlp_ratio=a["mlp_ratio"],
        class_token=True, global_pool="token",
        embed_layer=functools.partial(stem, stem_channels=tuple(a["stem_channels"])),
    )
    model.pretrained_cfg = _pretrained_cfg(a, "tokenbench_default")
    model.tokenbench_arch = a
    return model


def embedded_paths(root: Optional[Path] = None, name: str = EMBEDDED_NAME) -> dict[str, Path]:
    """Where embedded model ``name`` lives: checkpoint, checksum, training config and log."""
    root = Path(root or embedded_dir(name))
    return {"dir": root, "ckpt": root / "model.pt", "sha": root / "model.pt.sha256", "config": root / "config.json",
            "log": root / "train_log.csv"}


def verify_checksum(ckpt: Path, sha_file: Path, name: str = EMBEDDED_NAME) -> str:
    """The checkpoint's SHA-256, after checking it against ``sha_file``."""
    model = "" if name == EMBEDDED_NAME else f" --model {name}"
    command = f"train {name} --data fashion-mnist-scenes" if name in DENSE_MODELS else f"train-base{model}"
    retrain = (f"restore it with `git checkout -- {ckpt.parent}`, or retrain it with "
               f"`tokenbench {command} --out {ckpt.parent} --force`")
    if not ckpt.is_file():
        raise UserError(f"embedded model checkpoint {ckpt} is missing: {retrain}")
    if not sha_file.is_file():
        raise UserError(f"checksum file {sha_file} is missing: {retrain}")
    expected = sha_file.read_text().split()[0].strip().lower()
    actual = sha256_file(ckpt)
    if actual != expected:
        raise UserError(f"embedded model checkpoint {ckpt} is corrupt (SHA-256 {actual[:12]}..., expected "
                        f"{expected[:12]}...): {retrain}")
    return actual


def load_embedded(root: Optional[Path] = None, name: str = EMBEDDED_NAME) -> tuple[nn.Module, dict]:
    """The trained embedded model ``name`` (checksum verified) and its provenance."""
    p = embedded_paths(root, name)
    sha = verify_checksum(p["ckpt"], p["sha"], name)
    arch = json.loads(p["config"].read_text()).get("arch", {}) if p["config"].is_file() else {}
    before = ARCH_KEYS_BEFORE if embedded_arch(name).get("family") == "convnext" else {}
    model = build_embedded({**embedded_arch(name), **before, **arch})
    state = torch.load(p["ckpt"], map_location="cpu", weights_only=True)
    state = state.get("model", state)
    model.load_state_dict(state)
    model.eval()
    from .outputs import repository_relative

    return model, {"weights": f"sha256:{sha}", "checkpoint": repository_relative(p["ckpt"]), "pretrained": True}


# --------------------------------------------------------------------------- timm models

def _pretrained_cached(name: str) -> bool:
    """Whether timm's weights for ``name`` are already on disk (Hugging Face or torch hub cache)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return False
    if cfg.file and Path(cfg.file).is_file():
        return True
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            repo = cfg.hf_hub_id.split("@")[0]
            for fname in filter(None, (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin",
                                       "open_clip_pytorch_model.bin")):
                if isinstance(try_to_load_from_cache(repo, fname), str):
                    return True
        except Exception:
            pass
    if cfg.url:
        try:
            return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url.split("?")[0])).is_file()
        except Exception:
            return False
    return False


def _network_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_pretrained_available(name: str) -> None:
    """Fail in seconds, in one line, where ``--pretrained`` cannot work: weights not cached and no
    network (``HF_HUB_OFFLINE`` set, or a 3-second connection probe failing), instead of the
    hub client's retries (about a minute)."""
    if _pretrained_cached(name):
        return
    why = None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        why = "HF_HUB_OFFLINE is set"
    elif not _network_reachable():
        why = "huggingface.co cannot be reached (no network?)"
    if why:
        raise UserError(f"--pretrained: timm's weights for {name} are not in the local cache and {why}; "
                        "download them once on a connected machine, or pass --checkpoint FILE")


def check_model_name(name: str) -> None:
    """Refuse, in one line, a name that is neither an embedded model, a dense model nor a timm model."""
    import timm

    if is_embedded(name) or name in DENSE_MODELS or timm.is_model(name):
        return
    embedded = [n for n in EMBEDDED_MODELS if n not in DENSE_MODELS]
    candidates = timm.list_models() + embedded + list(DENSE_MODELS)
    raise UserError(f"unknown model {name!r}{did_you_mean(name, candidates)} (a timm model name; the embedded "
                    f"models: {' / '.join(embedded)}; the dense (segmentation) ones: {' / '.join(DENSE_MODELS)})")


def create_model(name: str, pretrained: bool = False, **kwargs) -> tuple[nn.Module, dict]:
    """Model ``name`` in eval mode and a provenance dict (``weights`` identifies them).

    ``name`` is ``default`` (the embedded model) or a timm model name, with random
    weights unless ``pretrained`` (timm's hub weights: needs a network).  A checkpoint file
    loads after a method is applied (:func:`tokenbench.api.load`).
    """
    import timm

    if name in DENSE_MODELS:
        raise UserError(f"{name} is a dense (segmentation) model: measure it with `tokenbench eval {name} --data "
                        "fashion-mnist-scenes` (mIoU, and the GFLOPs of backbone and decoder)")
    if is_embedded(name):
        model, prov = load_embedded(name=name)
    else:
        check_model_name(name)
        img_size = kwargs.get("img_size")
        if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0):
            raise UserError(f"--img-size must be a positive integer, got {img_size!r}")
        if pretrained:
            check_pretrained_available(name)
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            if pretrained:
                raise UserError(f"could not load pretrained weights for {name}: {e.__class__.__name__}: "
                                f"{first} (no network? use --checkpoint)") from e
            if isinstance(e, TypeError) and "img_size" in first:
                raise UserError(f"{name} takes no --img-size (tokenbench measures timm VisionTransformer "
                                "models)") from e
            raise UserError(f"could not build {name}: {first}") from e
        from .backbones import backbone_of

        try:
            bb = backbone_of(model)
        except UserError:
            bb = None  # refused with its reason where a measurement needs the backbone
        if bb is not None and min(bb.grid) < 1:
            raise UserError(f"--img-size {img_size} is smaller than {name}'s patch size "
                            f"{bb.input_config()['patch_size']}: no patch tokens")
        tag = getattr(model, "pretrained_cfg", {}).get("tag") if pretrained else None
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", name)
        prov = {"pretrained": bool(pretrained),
                "weights": (f"timm:{arch}.{tag}" if tag else f"timm:{arch}") if pretrained else "random-init"}
    model.eval()
    if "weights" not in prov:
        prov["weights"] = "random-init"
    return model, prov
