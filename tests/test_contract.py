"""The method contract and the backbone layer.

- a method with a per-image token count, written through the public contract alone
  (a toy: keep the tokens whose norm is above the image's mean; the median would keep
  exactly half of an even count, the same for every image), measured for FLOPs,
  throughput and accuracy;
- the ViT backbone's forward equals timm's for every variant it claims (class token,
  average pooling, registers, LayerScale, distillation token), through timm's own blocks
  and through the re-implemented reducing block, with timm's fused-attention switch,
  ``attn_mask`` and gradient checkpointing;
- the TokenState primitives keep everything carried beside the tokens aligned.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import register_tiny_timm, tiny_vit
from tokenbench import backbones
from tokenbench.backbones import AttnInfo, TokenState, backbone_of
from tokenbench.registry import Method, Param, apply, register

TINY = register_tiny_timm("tb_tiny_contract_vit")


# --------------------------------------------------------------------------- a per-image method

def keep_above_mean(x: torch.Tensor, st: TokenState) -> torch.Tensor:
    """Keep, per image, the patch tokens whose norm is above that image's mean norm."""
    npf = st.n_prefix
    norms = x[:, npf:].norm(dim=-1)                                        # [B, N]
    real = st.pad[:, npf:] if st.pad is not None else torch.ones_like(norms, dtype=torch.bool)
    mean = (norms * real).sum(1, keepdim=True) / real.sum(1, keepdim=True)
    keep = (norms > mean) & real
    k = int(keep.sum(1).max().clamp(min=1))
    order = torch.argsort(keep.to(torch.int8), dim=1, descending=True, stable=True)[:, :k]
    b = x.shape[0]
    prefix = torch.arange(npf, device=x.device).expand(b, npf)
    idx = torch.cat([prefix, order + npf], 1)
    pad = torch.cat([torch.ones(b, npf, dtype=torch.bool, device=x.device), keep.gather(1, order)], 1)
    return st.keep(x, idx, pad=pad)


class MeanNorm(Method):
    name = "tb_test_mean_norm"
    family = "pruning"
    summary = "test: keep the tokens whose norm is above the image's mean, at one site"
    params = (Param("site", "int", 0, "which quarter site (0, 1, 2)", min=0, max=2),)
    compile_note = "per-image token counts: data-dependent shapes (graph breaks)"

    def apply(self, model, site: int = 0, **params):
        bb = backbone_of(model, self.name)
        plan = bb.prepare(self.name)

        def mid(block, x, st: TokenState, info: AttnInfo):
            return keep_above_mean(x, st)

        plan.mid[bb.sites("quarters")[site]] = mid
        return model


@pytest.fixture(autouse=True, scope="module")
def registered():
    """The toy methods exist for this module only (other tests list every registered method)."""
    from tokenbench import registry

    register(MeanNorm)
    yield
    for name in ("tb_test_mean_norm", "tb_test_only_swin"):
        registry._REGISTRY.pop(name, None)
        registry._SOURCES.pop(name, None)


def _images(n: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


@pytest.mark.parametrize("kw", [{}, {"global_pool": "avg", "class_token": False}, {"reg_tokens": 2}])
def test_per_image_counts_pad_mask_and_pool_like_separate_images(kw):
    """A padded batch gives every image the logits it gets alone: padded tokens are never
    attended to, pooled or counted."""
    net = apply(tiny_vit(**kw), "tb_test_mean_norm", site=0)
    x = _images(6)
    with torch.no_grad():
        batched = net(x)
        st = backbones.last_state(net)
        per_image = st.tokens_per_image()
        alone = torch.cat([net(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    npf = backbone_of(net).n_prefix
    assert per_image.shape == (6, 12)
    assert (per_image[:, 0] == 64 + npf).all()                          # before the site: every token
    assert len(set(per_image[:, -1].tolist())) > 1                       # after it: per image
    assert (per_image[:, -1] < 64 + npf).all()


def test_per_image_flops_give_mean_and_spread():
    from tokenbench.measure import flop_count

    net = apply(tiny_vit(), "tb_test_mean_norm", site=0)
    dense = flop_count.flops(tiny_vit())["gflops"]
    out = flop_count.flops(net, inputs=_images(6), max_images=6)
    spread = out["gflops_per_image"]
    assert out["flops_images"] == 6
    assert spread["min"] < spread["max"] < dense
    assert spread["mean"] == pytest.approx(out["gflops"])


def test_per_image_method_through_the_cli(cli, tmp_path):
    """FLOPs, throughput and accuracy of the toy method through the same commands as any method."""
    res = str(tmp_path / "res")
    common = (TINY, "--method", "tb_test_mean_norm", "--results", res, "--json")
    code, out, err = cli("flops", *common)
    assert code == 0, err
    assert 0 < json.loads(out)["gflops"]
    code, out, err = cli("throughput", *common, "--batch-size", "4", "--min-run-time", "0.05", "--threads", "1")
    assert code == 0, err
    assert json.loads(out)
    code, out, err = cli("eval", *common, "--data", "synthetic", "--limit", "16", "--batch-size", "8")
    assert code == 0, err
    assert "top1" in out


# --------------------------------------------------------------------------- parity with timm

def _distilled():
    import timm

    torch.manual_seed(0)
    return timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=4, embed_dim=32,
                             depth=12, num_heads=2, num_classes=10).eval()


VARIANTS = {
    "class token": lambda: tiny_vit(),
    "average pooling": lambda: tiny_vit(global_pool="avg", class_token=False),
    "registers": lambda: tiny_vit(reg_tokens=4),
    "layer scale": lambda: tiny_vit(init_values=0.1),
    "distillation token": _distilled,
}


def _identity_everywhere(net):
    """A plan with a do-nothing hook on every block: every block runs the re-implemented one."""
    bb = backbone_of(net)
    plan = bb.prepare("identity")
    for i in bb.sites("every"):
        plan.mid[i] = lambda block, x, st, info: x
    return net


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fused", [True, False])
def test_dense_forward_equals_timm(variant, fused):
    ref = VARIANTS[variant]()
    x = _images(3)
    for m in ref.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    with torch.no_grad():
        want = ref(x)
        mask = torch.ones(3, 1, 1, ref.patch_embed.num_patches + ref.num_prefix_tokens, dtype=torch.bool)
        mask[..., -3:] = False                                              # hide the last three keys
        want_masked = ref.forward_head(ref.forward_features(x, attn_mask=mask))
        for install in (lambda n: apply(n, "none"), _identity_everywhere):
            net = install(VARIANTS[variant]())
            for m in net.modules():
                if hasattr(m, "fused_attn"):
                    m.fused_attn = fused
            torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-5)
            got = net.forward_head(net.forward_features(x, attn_mask=mask))
            torch.testing.assert_close(got, want_masked, rtol=1e-5, atol=1e-5)
            backbones.restore(net)
            assert type(net) is type(ref)


def test_gradient_checkpointing_is_honoured_on_plain_blocks(monkeypatch):
    import torch.utils.checkpoint as ckpt

    net = apply(tiny_vit(), "tome", r=2)
    net.set_grad_checkpointing(True)
    net.train()
    calls = []
    real = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    net(_images(2)).sum().backward()
    assert not calls  # ToMe hooks every block: none may be recomputed (their hooks change the state)
    net = apply(tiny_vit(), "topk", keep_rate=0.7)
    net.set_grad_checkpointing(True)
    net.train()
    ref = tiny_vit()
    apply(ref, "topk", keep_rate=0.7)
    ref.train()
    x = _images(2)
    net(x).sum().backward()
    ref(x).sum().backward()
    assert len(calls) == 9  # the twelve blocks but the three sites
    for (n, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


# --------------------------------------------------------------------------- the primitives

def _state(b=2, n=7, npf=1, c=4):
    st = TokenState(npf, track_source=True)
    x = torch.randn(b, n, c)
    st.start(x)
    st.ensure_size(x)
    st.policy = torch.rand(b, n, 1)
    return st, x


def test_keep_merge_fuse_keep_everything_aligned():
    st, x = _state()
    idx = torch.tensor([[0, 3, 1, 5], [0, 6, 2, 4]])
    y = st.keep(x, idx)
    assert torch.equal(y, torch.stack([x[0, idx[0]], x[1, idx[1]]]))
    assert torch.equal(st.pos, idx - 1)                                     # the patch's grid index; prefix -1
    assert torch.equal(st.source.argmax(-1), idx)
    # merge token 3 (position) into kept position 1: size-weighted mean, sizes add, sources unite
    st2, x2 = _state()
    keep, src, dst = torch.tensor([[0, 1, 2]] * 2), torch.tensor([[4], [5]]), torch.tensor([[1], [2]])
    y2 = st2.merge(x2, keep, src, dst)
    torch.testing.assert_close(y2[0, 1], (x2[0, 1] + x2[0, 4]) / 2)
    torch.testing.assert_close(y2[1, 2], (x2[1, 2] + x2[1, 5]) / 2)
    assert st2.size[:, :, 0].tolist() == [[1, 2, 1], [1, 1, 2]]
    assert st2.source[0, 1].nonzero().flatten().tolist() == [1, 4]
    assert st2.policy.shape == (2, 3, 1) and st2.pos.tolist() == [[-1, 0, 1]] * 2
    # fuse: the dropped tokens become one appended token; its position is -1, its size their sum
    st3, x3 = _state()
    kept, dropped = torch.tensor([[0, 1, 2]] * 2), torch.tensor([[3, 4, 5, 6]] * 2)
    w = torch.full((2, 4), 0.25)
    y3 = st3.fuse(x3, kept, dropped, w)
    torch.testing.assert_close(y3[:, -1], x3[:, 3:].mean(1))
    assert st3.size[:, -1, 0].tolist() == [4, 4] and st3.pos[:, -1].tolist() == [-1, -1]


def test_tome_through_the_merge_primitive_keeps_positions():
    net = apply(tiny_vit(), "tome", r=8)
    backbones.set_track_source(net)
    with torch.no_grad():
        net(_images(2))
    st = backbones.last_state(net)
    # every token stands at the grid index of one of the patches it covers
    covered = st.source[:, st.n_prefix:, st.n_prefix:].bool()
    pos = st.pos[:, st.n_prefix:]
    assert covered.gather(2, pos[..., None]).all()
    assert st.size[:, st.n_prefix:].sum(1).flatten().tolist() == [64.0, 64.0]


def test_a_method_refuses_a_backbone_it_does_not_declare():
    from tokenbench.errors import UserError

    @register
    class OnlySwin(Method):
        name = "tb_test_only_swin"
        backbones = ("swin",)

        def apply(self, model, **params):
            return model

    with pytest.raises(UserError, match="does not apply to vit models"):
        apply(tiny_vit(), "tb_test_only_swin")
