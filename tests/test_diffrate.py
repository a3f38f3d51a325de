"""Tests of the `diffrate` adapter (prune by class attention, then merge into the most similar
kept token, by per-block counts) against a slow, obvious per-image reference."""

from __future__ import annotations

import pytest
import timm
import torch

from conftest import (VIT_SMALL, VIT_TINY, assert_batch_independent, assert_counts_declared,
                      assert_matches_reference, assert_unchanged_by, peaked_vit, random_images, ref_attend,
                      ref_embed, ref_head)
from tokenbench import registry
from tokenbench.backbones import TokenState, last_state, plan_of
from tokenbench.errors import UserError
from tokenbench.methods.diffrate import SCHEDULES, block_counts, kept_patches

SMALL, TINY = VIT_SMALL, VIT_TINY
VARIANTS = ("cls", "distilled", "registers")  # DiffRate needs a class token
make_model = peaked_vit
# a steep custom schedule (official scale: 197 tokens), so that small grids prune and merge a lot
STEEP = ([197, 180, 150, 120, 100, 80, 60, 50, 40, 30, 20, 10],
         [190, 160, 130, 110, 90, 70, 55, 45, 35, 25, 15, 10])


# --------------------------------------------------------------------------- the reference

def ref_forward(model, imgs, prune, merge, power=1.0):
    """The whole model, one image at a time, every token and head written out.

    Returns the logits and, per image, the original tokens each final token stands for.
    """
    p = model.num_prefix_tokens
    n0 = model.patch_embed.num_patches
    logits, all_members = [], []
    for img in imgs:
        x = ref_embed(model, img)
        size = [1.0] * x.shape[0]
        members = [{i} for i in range(x.shape[0])]
        for bi, blk in enumerate(model.blocks):
            n = x.shape[0]
            x, _, cls_attn = ref_attend(blk, x, torch.log(torch.tensor(size, dtype=x.dtype)))
            # the block's counts, official scale -> this grid, clipped to the tokens present
            pc, mc = prune[bi], merge[bi]
            kp = min(n - p, kept_patches(pc, n0, power))
            km = min(kp, kept_patches(mc, n0, power)) if mc < pc else kp
            if km < n - p:
                ranked = sorted(range(p, n), key=lambda j: -float(cls_attn[j]))[:kp]
                order = list(range(p)) + ranked
                xs = [x[j] for j in order]
                sz = [size[j] for j in order]
                mem = [set(members[j]) for j in order]
                kept = p + km
                unit = [t / t.norm() for t in xs]
                acc = [[t] for t in xs[:kept]]
                new_size = sz[:kept]
                for j in range(kept, len(xs)):
                    sims = [float(unit[j] @ unit[d]) if d >= p else float("-inf") for d in range(kept)]
                    d = max(range(kept), key=lambda i: sims[i])
                    acc[d].append(xs[j])
                    new_size[d] = new_size[d] + sims[d] * sz[j]
                    mem[d] |= mem[j]
                x = torch.stack([sum(a) / len(a) for a in acc])  # plain mean of a token and its merged ones
                size, members = new_size, mem[:kept]
            x = x + blk.mlp(blk.norm2(x))
        logits.append(ref_head(model, x))
        all_members.append(members)
    return torch.stack(logits), all_members


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("variant,schedule,power", [
    ("cls", "2.9", 1.0),
    ("cls", "2.3", 1.0),
    ("cls", "steep", 1.0),
    ("cls", "2.9", 2.5),
    ("distilled", "steep", 1.0),
    ("registers", "steep", 1.0),
])
def test_matches_reference(variant, schedule, power):
    prune, merge = STEEP if schedule == "steep" else SCHEDULES[schedule]
    assert_matches_reference("diffrate", lambda m, x: ref_forward(m, x, prune, merge, power), variant, 1e-6, n=2,
                             prune=prune, merge=merge, power=power)


def test_matches_reference_float32():
    assert_matches_reference("diffrate", lambda m, x: ref_forward(m, x, *STEEP), dtype=torch.float32, n=2,
                             prune=STEEP[0], merge=STEEP[1])


def test_default_is_the_official_deit_s_schedule():
    m = registry.get_method("diffrate")
    d = m.defaults()
    assert (d["prune"], d["merge"]) == SCHEDULES["2.9"] and d["power"] == 1.0
    assert m.knob == "power" and m.family == "hybrid" and not m.learned and m.needs_class_token
    # on a 196-patch grid the counts are the official ones: tokens entering each MLP = merge_kept_num
    model = timm.create_model("vit_tiny_patch16_224", embed_dim=16, num_heads=1, num_classes=3)
    tokens, mlp = m().expected_tokens(model)
    assert mlp == [197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3]
    assert tokens == [197] + mlp[:-1]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("prune,merge,power", [
    (*SCHEDULES["2.9"], 1.0), (*SCHEDULES["3.1"], 0.5), (*STEEP, 1.0), (*STEEP, 4.0),
    (100, 60, 1.0),  # one count for every block
    ([197] * 12, [197] * 12, 1.0),
])
def test_token_counts(variant, prune, merge, power):
    model = make_model(variant, TINY)
    assert_counts_declared(model, "diffrate", prune=prune, merge=merge, power=power)


def test_counts_follow_the_official_rules():
    # 196 patches: a count k keeps k - 1 patches; merging only where merge < prune; clipped to what is there
    assert [kept_patches(k, 196) for k in (197, 196, 58, 3, 2)] == [196, 195, 57, 2, 1]
    assert block_counts([197, 150, 164], [197, 148, 156], 3, 196) == [(196, 196), (149, 147), (163, 155)]
    assert block_counts([150], [160], 1, 196) == [(149, 149)]  # merge >= prune: no merging
    assert block_counts([150], [140, 100], 3, 196) == [(149, 139), (196, 99), (196, 196)]  # padded with 197
    assert kept_patches(99, 64, power=0.0) == 64
    # FLOPs fall monotonically with the knob
    sums = [sum(km for _, km in block_counts(*SCHEDULES["2.9"], 12, 196, pw)) for pw in (0, 0.5, 1, 2, 4)]
    assert sums == sorted(sums, reverse=True) and len(set(sums)) == 5


@pytest.mark.parametrize("params", [{"power": 0.0}, {"prune": 197, "merge": 197}])
def test_identity_settings(params):
    model = make_model("cls", TINY)
    assert_unchanged_by(model, "diffrate", 1e-6, **params)
    assert not plan_of(model).mid
    assert not registry.get_method("diffrate").reduces({**registry.get_method("diffrate").defaults(), **params})
    assert registry.get_method("diffrate").reduces(registry.get_method("diffrate").defaults())


@pytest.mark.parametrize("params", [
    {"prune": [197] * 13}, {"merge": [150] * 13}, {"prune": 1}, {"merge": 198}, {"prune": [197] * 11 + [0]},
    {"power": -0.5}, {"power": 5}, {"power": "strong"}, {"prune": "many"}, {"keep_rate": 0.5},
])
def test_bad_params(params):
    model = make_model("cls", TINY)
    with pytest.raises(UserError):
        registry.apply(model, "diffrate", **params)


def test_batch_consistency_and_determinism():
    model = make_model("cls")
    registry.apply(model, "diffrate", prune=STEEP[0], merge=STEEP[1])
    assert_batch_independent(model, random_images(model, 4))


def test_merge_primitive_plain_mean_and_size_weights():
    """TokenState.merge(mode="avg", size_weights=...): DiffRate's merge, written out."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3)
    st = TokenState(n_prefix=1)
    st.start(x)
    keep = torch.tensor([[0, 1, 2]] * 2)
    src = torch.tensor([[3, 4]] * 2)
    dst = torch.tensor([[1, 1], [2, 1]])
    w = torch.tensor([[0.5, 0.25], [0.8, -0.1]])
    out = st.merge(x, keep, src, dst, mode="avg", size_weights=w)
    want0 = torch.stack([x[0, 0], (x[0, 1] + x[0, 3] + x[0, 4]) / 3, x[0, 2]])
    want1 = torch.stack([x[1, 0], (x[1, 1] + x[1, 4]) / 2, (x[1, 2] + x[1, 3]) / 2])
    torch.testing.assert_close(out, torch.stack([want0, want1]))
    torch.testing.assert_close(st.size[..., 0], torch.tensor([[1, 1.75, 1], [1, 0.9, 1.8]]))


# --------------------------------------------------------------------------- the rate search (training only)

def _search_model(target: float = 0.3):
    from conftest import tiny_vit

    net = registry.apply(tiny_vit(), "diffrate").train()
    m = registry.get_method("diffrate")()
    loss_fn = m.train_setup(net, None, {"search": True, "target_ratio": target, "flops_weight": 100.0}, None)
    return net, m, loss_fn


def test_search_moves_the_rates_toward_the_flops_target():
    net, m, loss_fn = _search_model(target=0.3)
    groups = m.param_groups(net, 0.05)
    rates = net._modules["diffrate_rates"]
    assert [p for g in groups for p in g["params"]] == list(rates.parameters())
    assert not any(p.requires_grad for n, p in net.named_parameters() if not n.startswith("diffrate_rates."))
    opt = torch.optim.AdamW(groups, lr=0.05, weight_decay=0.0)
    x, y = random_images(net, 8), torch.arange(8) % 10
    ratios = []
    for _ in range(6):
        loss, logits, metrics = loss_fn(net, x, y)
        assert logits.shape == (8, 10) and set(metrics) == {"cls_loss", "flops_ratio"}
        assert last_state(net).tokens == [65] * 12  # nothing is removed in training: masked out instead
        opt.zero_grad()
        loss.backward()
        opt.step()
        ratios.append(metrics["flops_ratio"])
    assert ratios[-1] < ratios[0] and abs(ratios[-1] - 0.3) < abs(ratios[0] - 0.3)
    # evaluation during the search removes tokens by the current counts
    prune, merge = rates.schedule()
    assert prune[0] == merge[0] == 65  # block 0 is never compressed
    net.eval()
    with torch.no_grad():
        net(x)
    n, want = 64, []
    for kp, km in zip(prune, merge):
        n = min(n, kp - 1, km - 1 if km < kp else n)
        want.append(n + 1)
    assert last_state(net).tokens_mlp == want


def test_search_is_off_by_default():
    from conftest import tiny_vit

    net = registry.apply(tiny_vit(), "diffrate")
    m = registry.get_method("diffrate")()
    assert m.train_setup(net, None, {}, None) is None and m.param_groups(net, 0.05) is None
    with pytest.raises(UserError):
        registry.get_method("diffrate").validate_training({"target_ratio": 1.5})


def test_train_cli_runs_the_search(cli, tiny_default, tmp_path):
    from test_harness import _fake_fmnist

    d = tmp_path / "fmnist"
    d.mkdir()
    _fake_fmnist(d, n=100)
    out = tmp_path / "run"
    code, stdout, err = cli("train", "default", "--method", "diffrate", "--set", "search=true",
                            "--set", "target_ratio=0.4", "--data-dir", str(d), "--out", str(out), "--epochs", "1", "--batch-size", "32",
                            "--lr", "0.05", "--max-steps", "2")
    assert code == 0, err
    assert "flops_ratio" in (out / "train_log.csv").read_text().splitlines()[0]
