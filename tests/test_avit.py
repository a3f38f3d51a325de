"""Tests of the `avit` adapter (A-ViT token halting) against a slow, per-image reference.

The reference is the official masked form written out for one image: every token stays in
the sequence, halted tokens are zeroed and get -1000 on their attention logits, and the halting
update runs token by token in Python.  The adapter's inference drops halted tokens and pads
the batch; its training form masks as the official: all three must give the same logits.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_batch_equals_per_image, peak_weights, tiny_vit
from tokenbench import backbones
from tokenbench.methods.avit import distribution_target
from tokenbench.registry import apply, get_method

GATE = {"gate_scale": 1.0, "gate_center": 0.5}


def model():
    return peak_weights(tiny_vit(), 1)


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(4))


@torch.no_grad()
def ref_forward(net, img: torch.Tensor, scale: float, center: float) -> tuple[torch.Tensor, list[int]]:
    """Logits of one image and the tokens running at each block."""
    x = net.norm_pre(net._pos_embed(net.patch_embed(img[None])))[0]
    n = x.shape[0]
    c, r, on = [0.0] * n, [1.0] * n, [True] * n
    out = torch.zeros_like(x)
    counts = []
    for bi, blk in enumerate(net.blocks):
        counts.append(sum(on))
        keep = torch.tensor([1.0 if o else 0.0 for o in on])
        x = x * keep[:, None]
        at = blk.attn
        qkv = at.qkv(blk.norm1(x) * keep[:, None]).reshape(n, 3, at.num_heads, at.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        heads = []
        for h in range(at.num_heads):
            logits = (q[:, h] * at.scale) @ k[:, h].T + (1 - keep)[None] * -1000.0
            heads.append(logits.softmax(-1) @ v[:, h])
        x = x + at.proj(torch.cat(heads, -1))
        x = x + blk.mlp(blk.norm2(x * keep[:, None]) * keep[:, None])
        for t in range(n):
            if not on[t]:
                continue
            h = 1.0 if bi == len(net.blocks) - 1 else 1 / (1 + math.exp(-(float(x[t, 0]) * scale - center)))
            c[t] += h
            if c[t] > 1 - 0.01:
                out[t] += x[t] * r[t]
                on[t] = False
            elif c[t] < 1 - 0.01:
                out[t] += x[t] * h
                r[t] -= h
            else:
                on[t] = False
    return net.head(net.norm(out)[0]), counts


def test_inference_and_training_forms_equal_the_reference():
    net = model()
    ref = [ref_forward(net, img, **{k: v for k, v in zip(("scale", "center"), GATE.values())}) for img in images(5)]
    counts = assert_batch_equals_per_image(apply(net, "avit", **GATE), images(5), ref)
    assert len({tuple(cn) for cn in counts}) > 1 and min(cn[-1] for cn in counts) < 65   # halting varies
    net.train()
    train_logits = net(images(5))
    torch.testing.assert_close(train_logits.detach(), torch.stack([r[0] for r in ref]), rtol=1e-4, atol=1e-4)


def test_training_losses_reach_the_backbone_and_match_the_definitions():
    net = apply(model(), "avit", **GATE).train()
    cls = get_method("avit")
    loss_fn = cls().train_setup(net, tiny_vit(), {**GATE, "ponder_token_scale": 1.0, "distr_prior_alpha": 1.0}, None)
    x, y = images(4), torch.arange(4)
    loss, logits, metrics = loss_fn(net, x, y)
    s = backbones.last_state(net).extra["avit"]
    # the ponder count: blocks each token ran, plus its remainder where it halted, at most the depth
    assert 1 <= float(s["rho"].min()) and float(s["rho"].max()) <= 12 + 1e-6
    assert metrics["ponder_loss"] == pytest.approx(float(s["rho"].mean()))
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert net.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_distribution_target_is_the_official_prior():
    t = distribution_target(12, 8)
    assert float(t[:8].sum()) == pytest.approx(0.98)
    assert int(t.argmax()) == 8 and t.shape == (12,)


def test_a_batch_whose_tokens_all_halt_early_is_finite():
    net = apply(model(), "avit", gate_scale=1.0, gate_center=-10.0)  # everything halts at block 0
    with torch.no_grad():
        y = net(images(3))
        assert torch.isfinite(y).all()
        assert backbones.last_state(net).tokens[1:] == [0] * 11


def test_committed_checkpoint_halts_to_its_flops_level():
    """The trained embedded A-ViT (results/avit), at the parameters it was trained with, halts
    to the FLOPs level the default sweep places it at (per-image counts on real test images)."""
    import json
    from pathlib import Path

    from tokenbench.api import load
    from tokenbench.measure.flop_count import flops
    from tokenbench.train_data import fmnist_tensors

    run = Path(__file__).resolve().parent.parent / "results" / "avit"
    params = json.loads((run / "config.json").read_text())["params"]
    net, prov = load("default", "avit", params, checkpoint=str(run / "model.pt"))
    assert prov["learned_parts"] == "trained"
    dense, _ = load("default")
    x = fmnist_tensors(splits=("test",))[0][:64]
    ratio = flops(net, inputs=x, max_images=64)["gflops"] / flops(dense)["gflops"]
    assert abs(ratio - 0.72) <= 0.03, ratio
