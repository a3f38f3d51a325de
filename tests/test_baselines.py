"""The baselines: `resize` (the dense model at a lower resolution) and `pool` (average pooling of
the token grid), each against a slow, obvious reference, and their matched-FLOPs reach."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_vit
from tokenbench import backbones
from tokenbench.registry import apply, get_method


def _images(n=3, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- resize

def test_resized_grid_nearest_count_within_the_allowed_stretch():
    from tokenbench.methods.resize import resized_grid

    def stretch(a, b):
        return max(a / b, b / a)

    for scale in [i / 100 for i in range(5, 101)]:
        r, c = resized_grid((7, 7), scale)
        assert stretch(r, c) <= 1.4 + 1e-9 and 1 <= r <= 7 and 1 <= c <= 7
        # no allowed grid is nearer the goal (brute force)
        allowed = [a * b for a in range(1, 8) for b in range(1, 8) if stretch(a, b) <= 1.4 + 1e-9]
        assert abs(r * c - scale * 49) <= min(abs(n - scale * 49) for n in allowed) + 1e-9
        sr, sc = resized_grid((7, 7), scale, max_stretch=1.0)
        assert sr == sc
    assert resized_grid((7, 7), 1.0) == (7, 7) and resized_grid((14, 14), 100 / 196) == (10, 10)
    assert resized_grid((7, 7), 0.74) == (6, 6) and resized_grid((7, 7), 0.71) == (7, 5)
    assert resized_grid((7, 7), 0.71, max_stretch=1.0) == (6, 6)


@pytest.mark.parametrize("scale", [0.56, 0.5, 0.3])
def test_resize_equals_timm_built_at_the_smaller_size(scale):
    """The reference: timm's own model built for the smaller image, its position embeddings
    resampled by timm's resample_abs_pos_embed, fed the same resized images."""
    import timm
    from timm.layers import resample_abs_pos_embed

    from tokenbench.methods.resize import resized_grid

    net = apply(tiny_vit(), "resize", scale=scale)
    r, c = resized_grid((8, 8), scale)
    small = timm.create_model("vit_tiny_patch16_224", img_size=(4 * r, 4 * c), patch_size=4, embed_dim=32,
                              depth=12, num_heads=2, num_classes=10).eval()
    state = dict(tiny_vit().state_dict())
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=[r, c], old_size=[8, 8],
                                                num_prefix_tokens=1)
    small.load_state_dict(state)
    x = _images()
    xs = F.interpolate(x, size=(4 * r, 4 * c), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        torch.testing.assert_close(net(x), small(xs), rtol=1e-5, atol=1e-5)
    assert backbones.last_state(net).tokens == [r * c + 1] * 12


def test_resize_tokens_cover_the_original_grid_once_for_pictures():
    from tokenbench.visual.trace import trace

    net = apply(tiny_vit(), "resize", scale=0.3)
    t = trace(net, _images(1))
    assign = t.stages[0].assign  # each original patch belongs to exactly one token
    assert assign.shape[1] == 64 and len(t.stages) == 1


def test_resize_reaches_70_and_50_percent_of_the_embedded_models_flops_within_a_point(tmp_path):
    from tokenbench.sweep import FlopsSearch

    s = FlopsSearch(tmp_path / "cache.json")
    for target in (0.7, 0.5):
        res = s.search("default", None, get_method("resize"), {}, "scale", target, tolerance=0.01)
        assert abs(res.ratio - target) <= 0.01 and not res.miss, (target, res)


# --------------------------------------------------------------------------- pool

def _pooled_reference(tokens: torch.Tensor, grid, factor: int, n_prefix: int = 1) -> torch.Tensor:
    """Average of each factor x factor window (cut at the edges), image by image, window by window."""
    out = []
    rows, cols = grid
    for img in tokens:
        seq = [img[i] for i in range(n_prefix)]
        patches = img[n_prefix:].reshape(rows, cols, -1)
        for a in range(0, rows, factor):
            for b in range(0, cols, factor):
                seq.append(patches[a:a + factor, b:b + factor].reshape(-1, patches.shape[-1]).mean(0))
        out.append(torch.stack(seq))
    return torch.stack(out)


@pytest.mark.parametrize("factor,half_block", [(2, 0), (2, 10), (3, 14), (2, 7), (3, 23)])
def test_pool_equals_a_loop_over_windows(factor, half_block):
    net = apply(tiny_vit(), "pool", half_block=half_block, factor=factor, prop_attn=False)
    ref = tiny_vit()
    x = _images()
    block, inside = divmod(half_block, 2)
    with torch.no_grad():
        h = ref._pos_embed(ref.patch_embed(x))
        for i, blk in enumerate(ref.blocks):
            if i == block and not inside:
                h = _pooled_reference(h, (8, 8), factor)
            if i == block and inside:  # between the attention and the MLP
                h = h + blk.ls1(blk.attn(blk.norm1(h)))
                h = _pooled_reference(h, (8, 8), factor)
                h = h + blk.ls2(blk.mlp(blk.norm2(h)))
            else:
                h = blk(h)
        want = ref.forward_head(ref.norm(h))
        got = net(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    pooled = (-(-8 // factor)) ** 2 + 1
    st = backbones.last_state(net)
    assert st.tokens == [65] * (block + inside) + [pooled] * (12 - block - inside)
    assert st.tokens_mlp == [65] * block + [pooled] * (12 - block)


def test_pool_carries_window_sizes_for_proportional_attention():
    net = apply(tiny_vit(), "pool", half_block=4, factor=3)
    with torch.no_grad():
        net(_images(2))
    st = backbones.last_state(net)
    sizes = st.size[0, :, 0].tolist()
    # 8 x 8 by 3: windows of 9, 9, 6 / 9, 9, 6 / 6, 6, 4 patches; the class token stands for itself
    assert sizes == [1, 9, 9, 6, 9, 9, 6, 6, 6, 4]
    plain = apply(tiny_vit(), "pool", half_block=4, factor=3, prop_attn=False)
    with torch.no_grad():
        assert not torch.allclose(net(_images(2)), plain(_images(2)))


def test_pool_refuses_a_block_past_the_last():
    from tokenbench.errors import UserError

    with pytest.raises(UserError, match="past the model's last block"):
        apply(tiny_vit(depth=4), "pool", half_block=8)
    apply(tiny_vit(depth=4), "pool", half_block=7)


def test_pool_reaches_70_and_50_percent_of_the_embedded_models_flops_within_a_point(tmp_path):
    from tokenbench.sweep import FlopsSearch

    s = FlopsSearch(tmp_path / "cache.json")
    for target in (0.7, 0.5):
        res = s.search("default", None, get_method("pool"), {}, "half_block", target, tolerance=0.01)
        assert abs(res.ratio - target) <= 0.01 and not res.miss, (target, res)


# --------------------------------------------------------------------------- dense models as a line

def test_dense_family_is_measured_dense_and_drawn_as_a_line_on_the_models_plot(tmp_path):
    from conftest import register_tiny_timm, write_sweep
    from tokenbench.report.write import write_report
    from tokenbench import sweep as S
    from tokenbench.report.plot import plot_layers
    from tokenbench.store import Store

    main, small = register_tiny_timm("tb_line_tiny_vit"), register_tiny_timm("tb_line_tinier_vit", embed_dim=16)
    p = write_sweep(tmp_path / "s.toml", main, "[methods.resize]\nscale = [0.5]\n", name="line",
                    top=f'dense_family = ["{small}", "{main}"]', batch_size=16)
    sw = S.load_sweep(p, {"out": str(tmp_path / "out")})
    assert sw.dense_family == [small]  # the sweep's own model is its line's dense point already
    out, runs, _, _ = S.prepare(sw)
    fam = [r for r in runs if r.line_of]
    assert [(r.model, r.method, r.line_of) for r in fam] == [(small, "none", main)]
    S.execute(sw, runs, Store(out))
    res = write_report(out)
    rows = res["display"]
    line_row = next(r for r in rows if r.line_of)
    dense_row = next(r for r in rows if r.is_dense and not r.line_of)
    assert line_row.label == small and line_row.flops_rel == pytest.approx(line_row.gflops / dense_row.gflops)
    assert line_row.flops_rel < 0.5 and line_row.mcnemar_p is not None  # compared with the model's dense run
    layers = plot_layers(rows, "gflops")
    assert [r.model for r in layers["line"]] == [small, main] and layers["dense"] == [dense_row]
    assert "resize" in layers["curves"] or any(r.method == "resize" for r in layers["points"])
    assert sorted(f.name for f in (out / "plots").glob("*.png")) == ["accuracy_vs_gflops.png"]
