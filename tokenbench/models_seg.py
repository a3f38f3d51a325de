"""The embedded dense models: an encoder (a timm model) and a light decoder, built by name.

``default-seg``: the embedded ViT's architecture at 56 x 56 input (patch 4: 14 x 14 = 196
tokens, DeiT's count at 224 px) with a linear head on its last feature map (BatchNorm and a
1 x 1 convolution to the classes), logits bilinearly upsampled to pixels and sharpened along the
items' edges by a small convolution over them and the input image (:class:`ImageRefine`; the
patch grid alone cannot draw an edge finer than 4 pixels).
``default-convnext-seg``: the embedded ConvNeXt at 56 x 56 (stages of 56, 28, 14 and 7
positions a side) with a small FPN head: a 1 x 1 lateral per stage to a common width,
summed top-down at the finest stage, then BatchNorm, GELU and a 1 x 1 classifier.

The encoder's feature maps come from timm's own ``forward_intermediates``, so a reduced
encoder hands back whatever that entry point gives (the full grid, or a refusal).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .models import DENSE_MODELS
SCENE_CLASS_COUNT = 11
DECODER_WIDTH = 32

SEG_ARCH: dict[str, dict[str, Any]] = {
    "default-seg": {"family": "vit", "img_size": 56, "patch_size": 4, "in_chans": 1, "num_classes": 0,
                    "embed_dim": 96, "depth": 12, "num_heads": 3, "mlp_ratio": 2.0, "stem_channels": [32, 64],
                    "classes": SCENE_CLASS_COUNT, "decoder": "linear", "refine": 16},
    "default-convnext-seg": {"family": "convnext", "img_size": 56, "patch_size": 1, "in_chans": 1,
                             "num_classes": 0, "depths": [1, 1, 6, 1], "dims": [16, 32, 64, 128],
                             "stem_kernel": 3, "ls_init_value": 1.0, "classes": SCENE_CLASS_COUNT,
                             "decoder": "fpn", "decoder_width": DECODER_WIDTH},
}


def is_dense_model(name: str) -> bool:
    return name in DENSE_MODELS


def is_segmentation_model(model: nn.Module) -> bool:
    """Whether ``model`` predicts a class per pixel (a :class:`SegModel`)."""
    return isinstance(model, SegModel)


def encoder_of(model: nn.Module) -> nn.Module:
    """The network a method acts on: a dense model's encoder, any other model itself."""
    return model.encoder if isinstance(model, SegModel) else model


class LinearHead(nn.Module):
    """BatchNorm and a 1 x 1 convolution on the feature maps, concatenated at the first map's
    resolution (one map: the last block; several: DINOv2's linear probe over the last four)."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.cls = nn.Conv2d(channels, classes, 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        size = maps[0].shape[-2:]
        x = torch.cat([m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear",
                                                                    align_corners=False) for m in maps], 1)
        return self.cls(self.norm(x))


class ImageRefine(nn.Module):
    """Upsampled logits and the input image -> a 3 x 3 convolution, GELU and a 1 x 1 convolution,
    added to the logits: where an item's edge runs inside a patch, the image says which pixels
    are the item's.  The classes still come from the feature map alone."""

    def __init__(self, classes: int, in_chans: int, width: int):
        super().__init__()
        self.mix = nn.Conv2d(classes + in_chans, width, 3, padding=1)
        self.out = nn.Conv2d(width, classes, 1)

    def forward(self, logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return logits + self.out(F.gelu(self.mix(torch.cat([logits, image], 1))))


class FPNHead(nn.Module):
    """Laterals to a common width, summed top-down at the finest map's resolution, then a classifier."""

    def __init__(self, channels: list[int], classes: int, width: int = DECODER_WIDTH):
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.norm = nn.BatchNorm2d(width)
        self.cls = nn.Conv2d(width, classes, 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        size = maps[0].shape[-2:]
        fused = self.laterals[0](maps[0])
        for lat, m in zip(self.laterals[1:], maps[1:]):
            fused = fused + F.interpolate(lat(m), size=size, mode="bilinear", align_corners=False)
        return self.cls(F.gelu(self.norm(fused)))


class SegModel(nn.Module):
    """``encoder`` (a timm model) -> its feature maps at ``indices`` -> ``decoder`` -> logits [B, K, H, W].

    With ``arch["frozen"]`` the encoder is a fixed feature extractor (a linear probe): its
    parameters take no gradient and it stays in eval mode while the decoder trains."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, indices: int, arch: dict):
        super().__init__()
        self.encoder, self.decoder, self.indices = encoder, decoder, indices
        self.tokenbench_arch = dict(arch)
        c = arch["in_chans"]
        # part of the decoder (its FLOPs are the decoder's): built only where the arch asks
        self.refine = ImageRefine(arch["classes"], c, arch["refine"]) if arch.get("refine") else None
        self.pretrained_cfg = {"architecture": "tokenbench_seg", "num_classes": arch["classes"],
                               "input_size": (c, arch["img_size"], arch["img_size"]),
                               "mean": tuple(arch.get("mean", (0.15,) * c)), "std": tuple(arch.get("std", (0.30,) * c))}
        self.frozen = bool(arch.get("frozen", False))
        if self.frozen:
            self.encoder.requires_grad_(False)

    def decoder_modules(self) -> nn.ModuleList:
        """Everything that is not the encoder: the decoder and, where built, the image refinement."""
        return nn.ModuleList([self.decoder] + ([self.refine] if self.refine is not None else []))

    @property
    def num_classes(self) -> int:
        return int(self.tokenbench_arch["classes"])

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's feature maps (NCHW), from timm's ``forward_intermediates``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return list(self.encoder.forward_intermediates(x, indices=self.indices, intermediates_only=True))

    def logits_and_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The per-pixel logits [B, K, H, W] and the feature maps the decoder read."""
        maps = self.features(x)
        logits = F.interpolate(self.decoder(maps), size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.refine is not None:
            logits = self.refine(logits, x)
        return logits, maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_and_maps(x)[0]


def build_seg_model(name: str, arch: Optional[dict] = None) -> SegModel:
    """The dense model ``name`` with fresh weights (``arch`` overrides its architecture)."""
    from .models import build_embedded

    if name not in SEG_ARCH:
        raise UserError(f"unknown dense model {name!r}; choose from {', '.join(DENSE_MODELS)}")
    a = {**SEG_ARCH[name], **(arch or {})}
    enc_arch = {k: v for k, v in a.items() if k not in ("classes", "decoder", "decoder_width", "family", "refine")}
    if a["family"] == "convnext":
        enc = build_embedded({**enc_arch, "family": "convnext"})
        decoder: nn.Module = FPNHead(list(a["dims"]), a["classes"], a.get("decoder_width", DECODER_WIDTH))
        indices = len(a["dims"])
    else:
        enc = build_embedded(enc_arch)
        decoder = LinearHead(a["embed_dim"], a["classes"])
        indices = 1
    return SegModel(enc, decoder, indices, a)


# The classification model whose committed weights start each dense model's encoder.
ENCODER_INIT = {"default-seg": "default", "default-convnext-seg": "default-convnext"}


def init_encoder(model: SegModel, state: dict) -> list[str]:
    """Load a classification checkpoint's ``state`` into ``model``'s encoder, in place.

    The state goes through timm's own checkpoint filter for the family (for a ViT it resamples
    the position embeddings to the encoder's grid, bicubic, as timm does for a new input
    size); the classifier's weights, which the encoder has no place for, are left out and
    returned.  Every encoder weight must be covered, else a one-line error.
    """
    from timm.models import convnext, vision_transformer

    filt = convnext.checkpoint_filter_fn if model.tokenbench_arch["family"] == "convnext" \
        else vision_transformer.checkpoint_filter_fn
    state = filt(state.get("model", state), model.encoder)
    own = model.encoder.state_dict()
    unused = sorted(k for k in state if k not in own)
    wrong = sorted(k for k in own if k in state and state[k].shape != own[k].shape)
    missing = sorted(k for k in own if k not in state)
    if wrong or missing:
        raise UserError(f"the initial weights do not fit the encoder: "
                        f"{', '.join((wrong + missing)[:3])} {'differ in shape' if wrong else 'are missing'}")
    model.encoder.load_state_dict({k: v for k, v in state.items() if k in own})
    return unused


def seg_paths(name: str) -> dict[str, Path]:
    """Where the trained weights of dense model ``name`` live (``results/embedded-<name>``)."""
    from .models import REPO_ROOT

    root = Path(os.environ.get("TOKENBENCH_EMBEDDED_SEG_DIR", REPO_ROOT / "results")) / f"embedded-{name}"
    return {"dir": root, "ckpt": root / "model.pt", "sha": root / "model.pt.sha256", "config": root / "config.json"}


def untrained_note(name: str) -> str:
    return (f"{name} has no trained weights ({seg_paths(name)['ckpt']} is missing): random weights, the "
            f"figures say nothing about the method; train it with `tokenbench train {name} --data "
            f"fashion-mnist-scenes --out {seg_paths(name)['dir']}`")


def configured_arch(name: str) -> dict:
    """The architecture overrides the dense model ``name``'s ``config.json`` names (none without one)."""
    cfg = seg_paths(name)["config"]
    return json.loads(cfg.read_text()).get("arch", {}) if cfg.is_file() else {}


def create_seg_model(name: str) -> tuple[SegModel, dict]:
    """Dense model ``name``: its committed weights (checksum verified) where they exist, else
    random weights (seed 0) marked ``untrained``."""
    from .models import verify_checksum

    p = seg_paths(name)
    if not p["ckpt"].is_file():
        torch.manual_seed(0)
        model = build_seg_model(name)
        model.eval()
        return model, {"weights": "random-init:untrained", "pretrained": False, "untrained": True}
    sha = verify_checksum(p["ckpt"], p["sha"], name)
    model = build_seg_model(name, configured_arch(name))
    state = torch.load(p["ckpt"], map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("model", state))
    model.eval()
    return model, {"weights": f"sha256:{sha}", "pretrained": True}


def seg_weights_id(name: str) -> str:
    """Identity of a dense model's weights without building it."""
    p = seg_paths(name)  # the test create_seg_model makes: no checkpoint, random weights, whatever the .sha256
    return "sha256:" + p["sha"].read_text().split()[0] if p["ckpt"].is_file() and p["sha"].is_file() \
        else "random-init:untrained"
