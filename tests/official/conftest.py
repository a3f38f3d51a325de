"""Parity with the official code: each test runs an official implementation from a clone
(``$TOKENBENCH_OFFICIAL_DIR/owner+repo``, never part of this project) on the same weights as
ours and compares logits.  Without the variable, or without that clone, the test is skipped.

The ``parity`` fixture asserts a difference against its tolerance and records it; the run ends
with a table of every difference measured (method, setting, max abs difference, tolerance).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))   # official_code/ sits beside bench.py, outside the package

_MEASURED: list[tuple[str, str, float, float, float]] = []


def clone_of(repo: str) -> Path:
    """The clone ``owner+repo`` under ``$TOKENBENCH_OFFICIAL_DIR``; skips the test where it is missing."""
    from official_code import ENV, official_dir

    root = official_dir()
    if root is None:
        pytest.skip(f"{ENV} is not set (a folder of official clones named owner+repo)")
    path = root / repo
    if not path.is_dir():
        pytest.skip(f"no clone {path} (git clone https://github.com/{repo.replace('+', '/', 1)} {path})")
    return path


class Parity:
    def __init__(self, name: str):
        self.name = name

    def check(self, ours, official, tol: float, setting: str = "", reduced_from=None) -> float:
        """``max |ours - official| <= tol``; with ``reduced_from`` (the dense model's logits), also
        that the method changed the output far more than that (the comparison can fail)."""
        from official_code import max_abs_diff

        assert ours.shape == official.shape
        diff = max_abs_diff(ours, official)
        _MEASURED.append((self.name, setting, diff, tol, ours.abs().max().item()))
        assert diff <= tol, f"{setting}: max abs difference {diff:.3g} > {tol:g}"
        if reduced_from is not None:
            effect = max_abs_diff(ours, reduced_from)
            assert effect > 100 * max(diff, 1e-9), f"{setting}: the method barely changes the logits ({effect:.3g})"
        return diff


@pytest.fixture
def parity(request):
    return Parity(request.node.name)


def pytest_terminal_summary(terminalreporter):
    if not _MEASURED:
        return
    tr = terminalreporter
    tr.section("max abs logit difference, ours against the official code")
    for name, setting, diff, tol, scale in _MEASURED:
        tr.write_line(f"{name} {setting}: {diff:.2e} (tolerance {tol:g}; ours up to {scale:.2f})")


@pytest.fixture
def peaked():
    """Sharpen a random-init model's head so that its logits span a few units (timm's init gives
    logits near 0.1, where a wrong merge would hide in the noise)."""

    def sharpen(model, scale: float = 30.0):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith("head."):
                    p.mul_(scale)
        return model

    return sharpen


def narrow_deit(embed_dim: int = 48, num_classes: int = 10):
    """DeiT-S's geometry (224 px, patch 16: 196 patches and the class token, 12 blocks) at a
    fraction of its width: for official code that counts tokens on the 197-token scale."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", embed_dim=embed_dim, depth=12, num_heads=2,
                             num_classes=num_classes).eval()
