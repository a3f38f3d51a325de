"""Shared fixtures: tiny random timm ViTs, in-process CLI, hypothesis settings."""

import os

os.environ.setdefault("TOKENBENCH_QUIET", "1")

import pytest
import torch

try:
    from hypothesis import settings

    settings.register_profile("tokenbench", deadline=None, max_examples=10, derandomize=True)
    settings.load_profile("tokenbench")
except ImportError:  # pragma: no cover
    pass

# One thread: the machine has two cores and a background job may use the other;
# oversubscribed OpenMP threads slow everything down many times over.
torch.set_num_threads(1)


def tiny_vit(**kw):
    """A depth-12 ViT small enough to run in milliseconds (reduction sites exist at 3, 6, 9)."""
    import timm

    args = dict(img_size=32, patch_size=4, embed_dim=32, depth=12, num_heads=2, num_classes=10)
    args.update(kw)
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


@pytest.fixture
def tiny():
    return tiny_vit()


@pytest.fixture
def cli():
    """Run the CLI in-process: returns (exit_code, stdout, stderr)."""
    import sys
    from io import StringIO

    from tokenbench.cli.main import main

    def run(*args):
        out, err = StringIO(), StringIO()
        old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        code = 0
        try:
            main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.stdout, sys.stderr = old
        return code, out.getvalue(), err.getvalue()

    return run


def register_tiny_timm(name: str, **overrides) -> str:
    """Register a depth-12 tiny ViT under a timm model ``name`` (sweeps and the CLI take names).

    32 px, patch 4: 64 patch tokens + class token; ``overrides`` change the defaults.
    """
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if timm.is_model(name):
        return name
    defaults = dict(img_size=32, patch_size=4, embed_dim=32, depth=12, num_heads=2, num_classes=10)
    defaults.update(overrides)

    def build(pretrained=False, **kw):
        for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kw.pop(k, None)
        return VisionTransformer(**{**defaults, **kw})

    build.__name__ = name
    build.__module__ = "conftest"
    register_model(build)
    return name


def peak_weights(m, seed: int = 0):
    """Re-draw ``m``'s weights large enough for peaked attention and O(1) logits, so that
    comparisons against references are not won by near-ties.  Returns ``m``."""
    import math

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() >= 2 and "pos_embed" not in n and "token" not in n:
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(p[0].numel())))
            elif "norm" in n and n.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return m


def random_images(model, b: int, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h, w = model.patch_embed.img_size
    return torch.randn(b, 3, h, w, generator=g).to(dtype)


# A tiny embedded-model architecture (grayscale 28 px, like `default`, milliseconds per batch).
SMALL_EMBEDDED = {"embed_dim": 32, "num_heads": 2, "mlp_ratio": 2.0, "stem_channels": [8, 16]}


@pytest.fixture
def tiny_default(tmp_path, monkeypatch):
    """A tiny stand-in for the embedded model, so `default` resolves without the real checkpoint."""
    import json

    from tokenbench import models
    from tokenbench.train import finalize

    d = tmp_path / "embedded"
    torch.manual_seed(0)
    finalize(models.build_embedded(SMALL_EMBEDDED), d)
    (d / "config.json").write_text(json.dumps({"arch": SMALL_EMBEDDED}))
    monkeypatch.setattr(models, "EMBEDDED_DIR", d)
    return d


# A tiny hierarchical embedded model: stage 3 still 7 x 7 at 28 px, a few thousand weights.
SMALL_EMBEDDED_CONVNEXT = {"family": "convnext", "depths": [1, 1, 4, 1], "dims": [8, 16, 16, 32]}


@pytest.fixture
def tiny_default_convnext(tmp_path, monkeypatch):
    """A tiny stand-in for `default-convnext`, so the name resolves without the real checkpoint."""
    import json

    from tokenbench import models
    from tokenbench.train import finalize

    d = tmp_path / "embedded-convnext"
    torch.manual_seed(0)
    m = models.build_embedded(SMALL_EMBEDDED_CONVNEXT)
    finalize(m, d)
    (d / "config.json").write_text(json.dumps({"arch": m.tokenbench_arch}))  # every key, as training writes
    monkeypatch.setattr(models, "EMBEDDED_CONVNEXT_DIR", d)
    return d
