"""Tests of the `ats` adapter (Adaptive Token Sampler) against a slow, obvious reference.

The reference runs the whole model one image at a time, attention written out per head,
and samples tokens with plain Python loops (the official ``create_ys`` grid, the nearest
cdf value for each sample, a set for the duplicates).  The batched adapter pads each batch
to its longest sequence: every image must get the logits and token counts it gets alone.
"""

from __future__ import annotations

import pytest
import torch

from conftest import peak_weights, tiny_vit
from tokenbench import backbones
from tokenbench.errors import UserError
from tokenbench.methods.ats import inverse_transform_sample, n_samples_for
from tokenbench.registry import apply, get_method

SITES = range(3, 12)  # the official ATS_BLOCKS of a 12-block ViT


def model(**kw):
    return peak_weights(tiny_vit(**kw), 0)


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the reference

def ref_sample(score: list[float], n_samples: int) -> list[int]:
    """Positions (into ``score``) ATS keeps, in increasing order of score; one sample at a time."""
    order = sorted(range(len(score)), key=lambda j: score[j])
    cdf, acc = [], torch.tensor(0.0)
    for j in order:                                   # float32 running sum, as cumsum
        acc = acc + torch.tensor(score[j])
        cdf.append(acc)
    cdf = torch.stack(cdf)
    ncdf = (cdf - cdf[0]) / (cdf[-1] - cdf[0])
    y0 = ncdf[ncdf != 0].min()
    lin = torch.linspace(0.0, 1.0, n_samples)
    picked = set()
    for j in range(n_samples):
        y = y0 + ((lin[j] * (n_samples - 1)) - y0 * j) / (n_samples - 1)
        dist = (y - ncdf).abs()
        picked.add(int(torch.nonzero(dist == dist.min())[0]))   # the nearest; the first on a tie
    return [order[i] for i in sorted(picked)]


def ref_forward(net, img: torch.Tensor, n_samples: int) -> tuple[torch.Tensor, list[int]]:
    """Logits of one image and the tokens entering each block."""
    x = net.norm_pre(net._pos_embed(net.patch_embed(img[None])))[0]  # [N, C]
    counts = []
    for bi, blk in enumerate(net.blocks):
        counts.append(x.shape[0])
        at, n = blk.attn, x.shape[0]
        qkv = at.qkv(blk.norm1(x)).reshape(n, 3, at.num_heads, at.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]                    # [N, H, d]
        heads, cls_row = [], torch.zeros(n)
        for h in range(at.num_heads):
            a = ((q[:, h] * at.scale) @ k[:, h].T).softmax(-1)        # [N, N]
            heads.append(a @ v[:, h])
            cls_row = cls_row + a[0]
        x = x + at.proj(torch.cat(heads, -1))
        if bi in SITES:
            v_norm = v.reshape(n, -1).norm(dim=-1)
            s = (cls_row * v_norm)[1:]
            s = (s / s.sum()).tolist()
            kept = ref_sample(s, n_samples)
            x = x[[0] + [j + 1 for j in kept]]
        x = x + blk.mlp(blk.norm2(x))
    return net.head(net.norm(x)[0]), counts


@pytest.mark.parametrize("keep_rate", [1.0, 0.4])
def test_batched_equals_per_image_reference(keep_rate):
    net = apply(model(), "ats", keep_rate=keep_rate)
    x = images(6)
    with torch.no_grad():
        out = net(x)
        per_image = backbones.last_state(net).tokens_per_image()
        refs = [ref_forward(net, img, n_samples_for(64, keep_rate)) for img in x]
    torch.testing.assert_close(out, torch.stack([r[0] for r in refs]), rtol=1e-5, atol=1e-5)
    assert per_image.tolist() == [r[1] for r in refs]
    assert len(set(per_image[:, -1].tolist())) > 1          # the count varies per image
    assert (per_image[:, :4] == 65).all()                   # nothing before block 3


def test_sampling_ignores_padding_and_batch_mates():
    """A padded row samples exactly what the same scores sample alone (official at batch 1)."""
    g = torch.Generator().manual_seed(5)
    for trial in range(20):
        n = int(torch.randint(4, 40, (1,), generator=g))
        s = torch.rand(n, generator=g) ** 4
        s = s / s.sum()
        pad = int(torch.randint(0, 10, (1,), generator=g))
        where = torch.randperm(n + pad, generator=g)
        row = torch.zeros(n + pad)
        real = torch.zeros(n + pad, dtype=torch.bool)
        row[where[:n]], real[where[:n]] = s, True
        samples = int(torch.randint(2, 50, (1,), generator=g))
        idx, keep = inverse_transform_sample(row[None], samples, real[None])
        got = idx[0][keep[0]].tolist()
        want = [int(where[j]) for j in ref_sample(s.tolist(), samples)]
        assert got == want, trial


def test_declared_schedule_and_defaults():
    cls = get_method("ats")
    net = apply(model(), "ats")
    assert cls().expected_tokens(net) is None                 # per-image counts
    assert cls.knob == "keep_rate" and cls.family == "pruning" and not cls.learned
    assert cls.reduces({"keep_rate": 1.0})
    assert n_samples_for(196, 1.0) == 196                     # the official K = 197 of DeiT-S
    assert n_samples_for(196, 0.01) == 7                       # at least 8 tokens, class token included
    plan = backbones.plan_of(net)
    assert sorted(plan.mid) == list(SITES)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, "x"])
def test_bad_parameters(bad):
    with pytest.raises(UserError):
        get_method("ats").validate({"keep_rate": bad})


def test_deterministic_and_budget_moves_tokens():
    x = images(4, seed=2)
    with torch.no_grad():
        a = apply(model(), "ats", keep_rate=0.5)(x)
        b = apply(model(), "ats", keep_rate=0.5)(x)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        full = apply(model(), "ats", keep_rate=1.0)
        full(x)
        many = backbones.last_state(full).tokens_per_image()[:, -1]
        few = apply(model(), "ats", keep_rate=0.2)
        few(x)
        less = backbones.last_state(few).tokens_per_image()[:, -1]
    assert (less < many).all()


def test_registers_are_kept_and_not_scored():
    net = apply(model(reg_tokens=2), "ats")
    x = images(3)
    with torch.no_grad():
        out = net(x)
        st = backbones.last_state(net)
        alone = torch.cat([net(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)
    assert (st.pos[:, :3] == -1).all()                        # the prefix stays in front
