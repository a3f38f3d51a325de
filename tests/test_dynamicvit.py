"""DynamicViT adapter: inference against a slow reference, schedule, parameters, training pieces."""

import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import gelu, lin, ln, ref_attention, ref_mlp, small_vit
from tokenbench import registry
from tokenbench.errors import UserError
from tokenbench.backbones import TokenState, backbone_of, last_state, restore
from tokenbench.backbones.vit import attention
from tokenbench.methods._policy import softmax_with_policy
from tokenbench.methods._staged import keep_counts

registry.load_methods()
dv = sys.modules["tokenbench.methods.dynamicvit"]


tiny = small_vit


def spread_predictors(model, seed=1, scale=0.3):
    """Untrained predictors score all tokens about alike; spread the scores for a sharp test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.score_predictor.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


# --------------------------------------------------------------------------- slow reference

def ref_keep_score(pred, t):
    """The prediction module on one image's patch tokens t [N, C]: keep log-probability per token."""
    h = gelu(lin(ln(t, pred.in_conv[0]), pred.in_conv[1]))
    n, c = h.shape
    half = c // 2
    g = torch.zeros(c - half)
    for j in range(n):
        g = g + h[j, half:]
    g = g / n
    z = torch.cat([h[:, :half], g.expand(n, c - half)], dim=1)
    z = gelu(lin(z, pred.out_conv[0]))
    z = gelu(lin(z, pred.out_conv[2]))
    z = lin(z, pred.out_conv[4])
    return torch.log_softmax(z, dim=-1)[:, 0]


@torch.no_grad()
def ref_dynamicvit(model, images, keep_rate):
    n0 = model.patch_embed.num_patches
    sites = backbone_of(model).sites("quarters")
    out = []
    for img in images:  # one image at a time
        t = model._pos_embed(model.patch_embed(img[None]))[0]
        for i, blk in enumerate(model.blocks):
            if i in sites:
                s = sites.index(i)
                k = int(n0 * keep_rate ** (s + 1))
                score = ref_keep_score(model.score_predictor[s], t[1:])
                order = sorted(range(len(score)), key=lambda j: -float(score[j]))[:k]
                t = torch.cat([t[:1], t[1:][order]], dim=0)
            t = t + ref_attention(blk, t)[0]
            t = t + ref_mlp(blk, t)
        t = ln(t, model.norm)
        out.append(lin(t[0], model.head))
    return torch.stack(out)


# --------------------------------------------------------------------------- inference

def test_predictor_matches_reference():
    torch.manual_seed(0)
    pred = dv.init_predictor(dv.PredictorLG(48))
    with torch.no_grad():
        for p in pred.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        x = torch.randn(2, 10, 48)
        out = pred(x)
        assert out.shape == (2, 10, 2) and torch.allclose(out.exp().sum(-1), torch.ones(2, 10))
        for b in range(2):
            assert torch.allclose(out[b, :, 0], ref_keep_score(pred, x[b]), atol=1e-5)
        # with a policy, the global half averages the kept tokens only
        policy = (torch.rand(2, 10, 1) > 0.4).float()
        policy[:, 0] = 1
        outp = pred(x, policy)
        for b in range(2):
            kept = policy[b, :, 0].nonzero()[:, 0]
            h = gelu(lin(ln(x[b], pred.in_conv[0]), pred.in_conv[1]))
            g = h[kept, 24:].sum(0) / len(kept)
            z = torch.cat([h[:, :24], g.expand(10, 24)], dim=1)
            z = lin(gelu(lin(gelu(lin(z, pred.out_conv[0])), pred.out_conv[2])), pred.out_conv[4])
            assert torch.allclose(outp[b], torch.log_softmax(z, -1), atol=1e-5)


@pytest.mark.parametrize("keep_rate", [0.7, 0.45])
def test_matches_reference(keep_rate):
    m = registry.apply(tiny(), "dynamicvit", keep_rate=keep_rate)
    spread_predictors(m)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        y = m(x)
    ref = ref_dynamicvit(m, x, keep_rate)
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4), (y - ref).abs().max()


def test_token_counts_match_expected():
    m = registry.apply(tiny(), "dynamicvit", keep_rate=0.6)
    with torch.no_grad():
        m(torch.randn(2, 3, 64, 64))
    st = last_state(m)
    exp = registry.get_method("dynamicvit")().expected_tokens(m, keep_rate=0.6)
    assert (st.tokens, st.tokens_mlp) == exp
    n = 64
    assert exp[0] == [n + 1] * 3 + [int(n * 0.6) + 1] * 3 + [int(n * 0.6 ** 2) + 1] * 3 + [int(n * 0.6 ** 3) + 1] * 3


def test_deit_s_schedule():
    # DeiT-S geometry: 224 / 16 -> 196 patches; the official counts 137, 96, 67 (+ class token).
    m = registry.apply(tiny(img=224, patch=16), "dynamicvit", keep_rate=0.7)
    exp = registry.get_method("dynamicvit")().expected_tokens(m, keep_rate=0.7)
    assert exp[0] == [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3
    assert exp[1] == exp[0]
    with torch.no_grad():
        m(torch.randn(1, 3, 224, 224))
    assert last_state(m).tokens == exp[0] and last_state(m).tokens_mlp == exp[1]
    assert keep_counts(196, 3, 0.7) == [int(196 * 0.7), int(196 * 0.7 ** 2), int(196 * 0.7 ** 3)]


def test_batch_consistency():
    m = registry.apply(tiny(), "dynamicvit", keep_rate=0.5)
    spread_predictors(m)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        y = m(x)
        for i in range(4):
            assert torch.allclose(y[i:i + 1], m(x[i:i + 1]), atol=1e-5)


def test_keep_rate_one_is_dense():
    dense = tiny()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y0 = dense(x)
        m = registry.apply(dense, "dynamicvit", keep_rate=1.0)
        y1 = m(x)
    assert last_state(m).tokens == [65] * 12
    assert torch.allclose(y0, y1, atol=1e-5)


def test_untrained_predictors_run_and_trace():
    m = registry.apply(tiny(), "dynamicvit")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = m(x)
        tr = torch.jit.trace(m, x, check_trace=False)
        assert torch.allclose(tr(x), y, atol=1e-6)
    assert torch.isfinite(y).all()


def test_bad_parameters_rejected():
    for bad in ({"keep_rate": 0}, {"keep_rate": 1.5}, {"keep_rate": -1}, {"keep_ratio": 0.5}, {"keep_rate": "x"}):
        with pytest.raises(UserError):
            registry.apply(tiny(), "dynamicvit", **bad)
    with pytest.raises(UserError):
        registry.apply(tiny(class_token=False, global_pool="avg"), "dynamicvit")
    assert registry.get_method("dynamicvit").learned and registry.get_method("dynamicvit").needs_class_token


# --------------------------------------------------------------------------- weights

OFFICIAL_KEYS = [  # names in the official VisionTransformerDiffPruning state dict
    "cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight",
    "blocks.0.attn.proj.bias", "blocks.11.mlp.fc2.weight", "norm.weight", "head.weight",
    "score_predictor.0.in_conv.0.weight", "score_predictor.0.in_conv.0.bias", "score_predictor.0.in_conv.1.weight",
    "score_predictor.1.out_conv.0.weight", "score_predictor.1.out_conv.2.weight", "score_predictor.2.out_conv.4.weight",
    "score_predictor.2.out_conv.4.bias",
]


def test_official_names_load_after_apply():
    src = registry.apply(tiny(), "dynamicvit", keep_rate=0.6)
    spread_predictors(src, seed=5)
    sd = src.state_dict()
    assert set(OFFICIAL_KEYS) <= set(sd)
    assert sum(k.startswith("score_predictor.") for k in sd) == 3 * 10
    # as the official training script saves it: {'model': DDP-module state dict}
    ckpt = {"model": {"module." + k: v.clone() for k, v in sd.items()}, "epoch": 3}
    official = registry.apply(tiny(), "dynamicvit", keep_rate=0.6)
    official.load_state_dict(dv.official_state_dict(ckpt), strict=True)
    native = registry.apply(tiny(), "dynamicvit", keep_rate=0.6)
    native.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(official(x), native(x))
        assert torch.equal(native(x), src(x))


def test_deepcopy_uses_its_own_predictors():
    import copy

    m = registry.apply(tiny(), "dynamicvit", keep_rate=0.5)
    spread_predictors(m)
    c = copy.deepcopy(m)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = m(x)
        assert torch.equal(c(x), y)
        for p in c.score_predictor.parameters():
            p.mul_(-1.0)  # reverses the ranking in the copy only
        assert torch.equal(m(x), y)
        assert not torch.allclose(c(x), y)


def test_reapply_keeps_loaded_predictors():
    m = registry.apply(tiny(), "dynamicvit", keep_rate=0.7)
    spread_predictors(m, seed=3)
    w = m.score_predictor[1].out_conv[2].weight.clone()
    registry.apply(m, "dynamicvit", keep_rate=0.5)
    assert torch.equal(m.score_predictor[1].out_conv[2].weight, w)
    restore(m)
    assert not any(k.startswith("score_predictor") for k in m.state_dict())


# --------------------------------------------------------------------------- training pieces

def test_ratio_loss_by_hand():
    d1 = torch.tensor([[1., 1., 0., 1.], [0., 0., 0., 1.]])   # kept 0.75, 0.25
    d2 = torch.tensor([[1., 0., 0., 0.], [0., 0., 0., 0.]])   # kept 0.25, 0.0
    r = 0.5
    hand = (((0.75 - r) ** 2 + (0.25 - r) ** 2) / 2 + ((0.25 - r * r) ** 2 + (0.0 - r * r) ** 2) / 2) / 2
    assert dv.ratio_loss([d1, d2], r).item() == pytest.approx(hand, rel=1e-6)


def test_logit_distill_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[0.5, 0.5, 2.0], [1.0, 1.0, 1.0]])
    hand = 0.0
    for b in range(2):
        ps, pt = torch.softmax(s[b], 0), torch.softmax(t[b], 0)
        hand += float((pt * (pt.log() - ps.log())).sum())
    assert dv.logit_distill_loss(s, t).item() == pytest.approx(hand / 2, rel=1e-5)


def test_token_distill_by_hand():
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[[1.], [0.], [1.]], [[0.], [0.], [1.]]])
    kept = [(0, 0), (0, 2), (1, 2)]
    hand = sum(float(((a[i, j] - b[i, j]) ** 2).sum()) for i, j in kept) / (len(kept) * 4)
    assert dv.token_distill_loss(a, b, mask).item() == pytest.approx(hand, rel=1e-5)
    assert dv.token_distill_loss(a, b, torch.zeros(2, 3, 1)).item() == 0.0


def test_gumbel_decisions_never_revive():
    m = registry.apply(tiny(), "dynamicvit", keep_rate=0.5)
    spread_predictors(m, scale=0.1)
    m.train()
    x = torch.randn(4, 3, 64, 64)
    for seed in range(3):
        torch.manual_seed(seed)
        logits, tokens, mask, decisions = dv.student_outputs(m, x)
        assert len(decisions) == 3 and all(d.shape == (4, 64) for d in decisions)
        for d in decisions:
            assert set(d.unique().tolist()) <= {0.0, 1.0}
        for prev, cur in zip(decisions, decisions[1:]):
            assert (cur <= prev).all()  # a dropped token stays dropped
        assert torch.equal(mask[..., 0], decisions[-1])
        st = last_state(m)
        assert st.tokens == [65] * 12  # training removes nothing
        assert torch.equal(st.policy[:, 1:, 0], decisions[-1]) and (st.policy[:, 0] == 1).all()
        assert tokens.shape == (4, 64, 48) and logits.shape == (4, 7)


def test_masked_attention_equals_attention_over_kept():
    torch.manual_seed(0)
    blk = tiny().blocks[2]
    x = torch.randn(2, 9, 48)
    keep = torch.tensor([[1, 1, 0, 1, 0, 0, 1, 1, 0], [1, 0, 0, 0, 1, 1, 1, 0, 1]], dtype=torch.float32)
    st = TokenState(1)
    st.policy = keep[..., None]
    with torch.no_grad():
        out, _ = attention(blk.attn, x, st, policy_softmax=softmax_with_policy)
        for b in range(2):
            idx = keep[b].nonzero()[:, 0]
            sub, _ = attention(blk.attn, x[b:b + 1, idx], TokenState(1))
            assert torch.allclose(out[b, idx], sub[0], atol=1e-5)
            # a dropped token attends to the kept tokens and to itself
            for j in (keep[b] == 0).nonzero()[:, 0].tolist():
                idx_j = torch.cat([idx, torch.tensor([j])])
                sub_j, _ = attention(blk.attn, x[b:b + 1, idx_j], TokenState(1))
                assert torch.allclose(out[b, j], sub_j[0, -1], atol=1e-5)


def test_training_loss_composition_and_backward():
    torch.manual_seed(0)
    teacher = tiny()
    model = registry.apply(tiny(), "dynamicvit", keep_rate=0.6)
    model.load_state_dict({**teacher.state_dict(), **{k: v for k, v in model.state_dict().items()
                                                     if k.startswith("score_predictor")}})
    model.train()
    loss_fn = dv.train_setup(model, teacher, weights={"ratio_weight": 3.0})
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 7, (4,))
    torch.manual_seed(11)
    loss, logits, met = loss_fn(model, x, y)
    # recompute every term from the same forward
    torch.manual_seed(11)
    lg, tok, mask, dec = dv.student_outputs(model, x)
    assert torch.equal(lg, logits)
    t_logits, t_tok = dv.teacher_outputs(teacher, x)
    with torch.no_grad():
        assert torch.allclose(t_logits, teacher(x))
    ce = F.cross_entropy(lg, y, label_smoothing=0.1)
    rl = sum(((d.mean(1) - 0.6 ** (s + 1)) ** 2).mean() for s, d in enumerate(dec)) / 3
    kl = dv.logit_distill_loss(lg, t_logits)
    mse = dv.token_distill_loss(tok, t_tok, mask)
    assert loss.item() == pytest.approx((ce + 3.0 * rl + 0.5 * kl + 0.5 * mse).item(), rel=1e-5)
    assert set(met) >= {"cls_loss", "ratio_loss", "cls_kl", "token_mse", "keep_frac"}
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    loss.backward()
    g = model.score_predictor[0].out_conv[4].weight.grad
    assert g is not None and g.abs().sum() > 0  # the ratio loss reaches the predictors (straight-through)
    with pytest.raises(UserError):
        dv.train_setup(model, teacher, weights={"ratio_wieght": 1.0})
    assert registry.get_method("dynamicvit")().train_setup(model, teacher) is not None


@pytest.mark.parametrize("keep_rate", [0.5, 0.7])
def test_committed_checkpoints_meet_their_token_budget(keep_rate):
    """The trained embedded DynamicViT checkpoints (results/dynamicvit-*) keep, at training
    time, the fraction of tokens each stage targets (keep_rate ** s), within 0.05: the
    predictors were trained for the budget they are evaluated at."""
    from pathlib import Path

    from tokenbench.api import load
    from tokenbench.train_data import fmnist_tensors

    root = Path(__file__).resolve().parent.parent
    ckpt = root / "results" / f"dynamicvit-{keep_rate}" / "model.pt"
    model, _ = load("default", "dynamicvit", {"keep_rate": keep_rate}, checkpoint=str(ckpt))
    x = fmnist_tensors(splits=("test",))[0][:512]
    fracs = dv.training_keep_fractions(model, x)
    targets = [keep_rate ** (s + 1) for s in range(len(fracs))]
    assert len(fracs) == 3
    assert all(abs(f - t) <= 0.05 for f, t in zip(fracs, targets)), (fracs, targets)
    assert not model.training


def test_keep_prior_init_starts_at_the_targets():
    """keep_prior_init: fresh predictors keep about keep_rate of what they see at every stage
    (the official initialisation keeps 1/2 per stage); a training-only parameter."""
    model = registry.apply(tiny(), "dynamicvit", keep_rate=0.6)
    x = torch.randn(64, 3, 64, 64)
    official = dv.training_keep_fractions(model, x)
    assert official == pytest.approx([0.5, 0.25, 0.125], abs=0.04)
    teacher = tiny()
    dv.train_setup(model, teacher, {"keep_prior_init": True})
    fracs = dv.training_keep_fractions(model, x)
    assert fracs == pytest.approx([0.6, 0.36, 0.216], abs=0.04)
    with pytest.raises(UserError, match="unknown parameter"):
        registry.apply(tiny(), "dynamicvit", keep_prior_init=True)   # not a model parameter


def test_decision_grad_clip_bounds_the_straight_through_gradient():
    """decision_grad_clip: each token's decision gradient is clamped (forward unchanged)."""
    x = torch.tensor([0.0, 1.0, 1.0], requires_grad=True)
    (dv._ClampGrad.apply(x, 0.5) * torch.tensor([10.0, -0.1, -3.0])).sum().backward()
    assert x.grad.tolist() == pytest.approx([0.5, -0.1, -0.5])

    def predictor_grad(clip):
        model = registry.apply(tiny(), "dynamicvit", keep_rate=0.6)
        loss_fn = dv.train_setup(model, tiny(), {"decision_grad_clip": clip})
        model.train()
        torch.manual_seed(0)
        imgs, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
        torch.manual_seed(1)
        logits = loss_fn(model, imgs, y)[1]
        torch.manual_seed(1)
        F.cross_entropy(model(imgs), y).backward()
        return logits, torch.cat([p.grad.flatten() for p in model.score_predictor.parameters()])

    l0, g0 = predictor_grad(0.0)
    l1, g1 = predictor_grad(1e-12)
    assert torch.equal(l0, l1)                      # the forward is the same
    assert g1.abs().max() < 1e-6 < g0.abs().max()   # the decision gradient is (almost) cut
