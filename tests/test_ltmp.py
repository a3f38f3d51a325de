"""Tests of the `ltmp` adapter (learned threshold merging and pruning) against a slow reference.

The reference is the official inference written out for one image with Python lists: each
source (even position) finds its most similar destination (odd position), merges when the
similarity passes the block's merge threshold, destinations take the largest importance of
what they absorb, and tokens whose importance does not pass the prune threshold are dropped.
The adapter pads a batch of per-image counts; every image must get its reference logits.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_batch_equals_per_image, peak_weights, tiny_vit
from tokenbench import backbones
from tokenbench.methods.ltmp import flops_ratio
from tokenbench.registry import apply, get_method

MERGE, PRUNE = 0.3, 0.012


def model():
    return peak_weights(tiny_vit(), 2)


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(6))


def set_thresholds(net, merge: float, prune: float):
    with torch.no_grad():
        for m in net.ltmp:
            m.merge_masker.threshold.fill_(merge)
            m.prune_masker.threshold.fill_(prune)
    return net


@torch.no_grad()
def ref_forward(net, img: torch.Tensor, merge_t: float, prune_t: float) -> tuple[torch.Tensor, list[int]]:
    x = net.norm_pre(net._pos_embed(net.patch_embed(img[None])))[0]
    size = torch.ones(x.shape[0])
    counts = []
    for blk in net.blocks:
        counts.append(x.shape[0])
        at, n = blk.attn, x.shape[0]
        qkv = at.qkv(blk.norm1(x)).reshape(n, 3, at.num_heads, at.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        heads, imp = [], torch.zeros(n)
        for h in range(at.num_heads):
            a = ((q[:, h] * at.scale) @ k[:, h].T + size.log()[None]).softmax(-1)
            heads.append(a @ v[:, h])
            imp = imp + a.mean(0) / at.num_heads
        x = x + at.proj(torch.cat(heads, -1))
        imp = imp.tolist()
        imp[0] = float("inf")
        metric = k.mean(1)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        srcs, dsts = list(range(0, n, 2)), list(range(1, n, 2))
        groups = {d: [d] for d in dsts}
        unmerged = [0]
        for s in srcs[1:]:
            sims = [float(metric[s] @ metric[d]) for d in dsts]
            best = max(sims) if sims else float("-inf")
            if best > merge_t:
                groups[dsts[sims.index(best)]].append(s)
            else:
                unmerged.append(s)
        rows, sizes, scores = [], [], []
        for s in unmerged:
            rows.append(x[s]), sizes.append(size[s]), scores.append(imp[s])
        for d in dsts:
            g = groups[d]
            w = size[g]
            rows.append((x[g] * w[:, None]).sum(0) / w.sum()), sizes.append(w.sum()), scores.append(max(imp[j] for j in g))
        keep = [i for i, sc in enumerate(scores) if sc > prune_t]
        x, size = torch.stack([rows[i] for i in keep]), torch.stack([sizes[i] for i in keep])
        x = x + blk.mlp(blk.norm2(x))
    return net.head(net.norm(x)[0]), counts


def test_batched_inference_equals_the_per_image_reference():
    net = set_thresholds(apply(model(), "ltmp"), MERGE, PRUNE)
    ref = [ref_forward(net, img, MERGE, PRUNE) for img in images(5)]
    counts = assert_batch_equals_per_image(net, images(5), ref)
    assert len({tuple(c) for c in counts}) > 1 and max(c[-1] for c in counts) < 30


def test_training_form_matches_inference_and_trains_the_thresholds():
    # pruning off: the masked training form keeps merged tokens as zeros in the attention mask,
    # which (up to the official softmax epsilon) gives inference's logits
    net = set_thresholds(apply(model(), "ltmp"), MERGE, 0.0)
    with torch.no_grad():
        want = net(images(3))
    net.train()
    loss_fn = get_method("ltmp")().train_setup(net, tiny_vit(), {"reduction_target": 0.5}, None)
    loss, logits, metrics = loss_fn(net, images(3), torch.arange(3))
    torch.testing.assert_close(logits.detach(), want, rtol=2e-3, atol=2e-3)
    masks = backbones.last_state(net).extra["ltmp_masks"]
    assert len(masks) == 12 and metrics["flops_ratio"] < 1
    loss.backward()
    thresholds = [p for n, p in net.named_parameters() if n.startswith("ltmp.")]
    assert all(p.grad is not None for p in thresholds) and any(float(p.grad.abs()) > 0 for p in thresholds)
    assert all(not p.requires_grad for n, p in net.named_parameters() if not n.startswith("ltmp."))


def test_flops_ratio_is_the_official_formula():
    n, d = 197, 384
    masks = [torch.full((2, n), f) for f in (0.9, 0.8, 0.7)]
    got = float(flops_ratio(masks, n, (4 * d * d, 2 * d), 8 * d * d))
    ms = [1, 0.9, 0.8, 0.7]
    want = sum((2 * ms[i] * n * d ** 2 + (ms[i] * n) ** 2 * d + 4 * ms[i + 1] * n * d ** 2) / (6 * n * d ** 2 + n ** 2 * d)
               for i in range(3)) / 3
    assert got == pytest.approx(want, rel=1e-6)
