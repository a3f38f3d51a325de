"""`tokenbench visualize` on hierarchical models: the slow-path positions of each stage-3
predictor (``dynamicvit`` and ``random`` on ConvNeXt), drawn on the stage-3 grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tokenbench import backbones
from tokenbench.visual.draw import render_stage
from tokenbench.visual.trace import FAST, KEPT, SLOW_PATH, trace
from tokenbench.errors import UserError
from tokenbench.methods import dynamicvit_hierarchical as hier
from tokenbench.registry import apply

from test_dynamicvit_hierarchical import SIZE, _randomise, _swin_x, _x, tiny_convnext, tiny_swin


def _chosen_by_hand(net, x, keep_rate):
    """Per image and predictor, the set of positions of largest keep score (on the block's input map)."""
    ratios = [keep_rate, keep_rate - 0.2, keep_rate - 0.4]
    out = []
    for b in range(x.shape[0]):
        h = net.stages[2].downsample(net.stages[1](net.stages[0](net.stem(x[b:b + 1]))))
        sets = []
        for j, blk in enumerate(net.stages[2].blocks):
            if j in (1, 2, 3):
                score = net.score_predictor[j - 1](h[0].flatten(1).t()[None])[0, :, 0]
                sets.append(set(torch.argsort(score, descending=True)[:int(16 * ratios[j - 1])].tolist()))
            h = blk(h)
        out.append(sets)
    return out


@pytest.mark.parametrize("keep_rate", [0.7, 0.9])
def test_one_stage_per_predictor_with_its_slow_positions(keep_rate):
    net = _randomise(apply(tiny_convnext(), "dynamicvit", keep_rate=keep_rate)).eval()
    x = _x(3)
    tr = trace(net, x)
    first = backbones.backbone_of(net).sites("stage 3")[0]
    assert tr.grid == (SIZE // 16, SIZE // 16) and tr.n_prefix == 0
    assert [s.kind for s in tr.stages] == [SLOW_PATH] * 3
    assert [s.block for s in tr.stages] == [first + 1, first + 2, first + 3]
    assert [s.predictor for s in tr.stages] == [0, 1, 2]
    with torch.no_grad():
        torch.testing.assert_close(tr.logits, net(x))           # tracking changes nothing
    want = _chosen_by_hand(net, x, keep_rate)
    for p, s in enumerate(tr.stages):
        assert s.n_tokens == 16 and s.assign.tolist() == [list(range(16))] * 3     # every position stays
        for b in range(3):
            slow = set(torch.nonzero(s.role[b] == KEPT).flatten().tolist())
            assert slow == want[b][p]
            assert set(torch.nonzero(s.role[b] == FAST).flatten().tolist()) == set(range(16)) - slow
            assert s.caption(b) == f"{len(slow)} slow, {16 - len(slow)} fast"


@pytest.mark.parametrize("method", ["dynamicvit", "random"])
def test_swin_one_panel_per_predictor_on_its_stage3_grid(method):
    net = apply(tiny_swin(), method, keep_rate=0.7).eval()
    tr = trace(net, _swin_x(2))
    assert tr.grid == (8, 8)
    assert [s.kind for s in tr.stages] == [SLOW_PATH] * 3
    assert [int(s.role[1].eq(KEPT).sum()) for s in tr.stages] == hier.keep_counts(64, 0.7)
    assert [s.n_tokens for s in tr.stages] == [64] * 3


def test_random_shows_its_draw_per_image():
    net = apply(tiny_convnext(), "random", keep_rate=0.7, seed=3).eval()
    tr = trace(net, _x(4))
    assert [int(s.role[0].eq(KEPT).sum()) for s in tr.stages] == hier.keep_counts(16, 0.7)
    masks = tr.stages[0].role.eq(KEPT)
    assert len({tuple(m.tolist()) for m in masks}) > 1          # not one pattern for the batch
    again = trace(net, _x(4))
    assert all(torch.equal(a.role, b.role) for a, b in zip(tr.stages, again.stages))


def test_fast_positions_dimmed_slow_ones_untouched():
    net = apply(tiny_convnext(), "random", keep_rate=0.7, seed=0).eval()
    tr = trace(net, _x(1))
    img = np.random.default_rng(0).uniform(size=(SIZE, SIZE, 3))
    canvas, hatched, segs, edges = render_stage(img, tr.stages[0], 0, tr.grid)
    slow = tr.stages[0].role[0].eq(KEPT).view(4, 4).numpy()
    pix = np.kron(slow, np.ones((16, 16), dtype=bool))
    assert np.array_equal(canvas[pix], img[pix])
    assert np.all(canvas[~pix] > img[~pix]) and not hatched and not segs
    assert edges                                                # a border between the two paths


def test_a_method_that_records_no_positions_is_refused():
    net = tiny_convnext()
    plan = backbones.prepare(net, "hidden")
    stage3 = backbones.backbone_of(net).sites("stage 3")
    plan.subset[stage3[1]] = lambda block, tokens, st: (torch.zeros(tokens.shape[0], 3, dtype=torch.long), None)
    with pytest.raises(UserError, match="cannot be shown"):
        trace(net, _x(1))
    backbones.restore(net)
    assert trace(net, _x(1)).stages == []                    # the dense model: nothing to refuse


def test_cli_on_the_embedded_convnext(cli, tiny_default_convnext, tmp_path):
    from PIL import Image

    out = tmp_path / "x.png"
    code, stdout, err = cli("visualize", "default-convnext", "--method", "dynamicvit", "--set", "keep_rate=0.7",
                            "--data", "synthetic", "--n", "2", "--dpi", "40", "--out", str(out), "--json")
    assert code == 0, err
    s = json.loads(stdout)
    assert s["panels_per_image"] == 4 and s["n_images"] == 2
    assert [st["kind"] for st in s["stages"]] == ["slow path"] * 3
    assert [st["tokens"] for st in s["stages"]] == [49] * 3     # the 7 x 7 stage-3 map
    assert [st["slow"] for st in s["stages"]] == [[34, 34], [24, 24], [14, 14]]
    with Image.open(out) as im:
        assert im.format == "PNG"
    code, stdout, err = cli("visualize", "default-convnext", "--method", "random", "--set", "keep_rate=0.9",
                            "--stages", "final", "--data", "synthetic", "--n", "1", "--dpi", "40", "--out",
                            str(tmp_path / "r.png"))
    assert code == 0, err
    assert "1 images x 2 panels" in stdout
    code, stdout, err = cli("visualize", "default-convnext", "--compare", "dynamicvit,random", "--data", "synthetic",
                            "--n", "1", "--dpi", "40", "--out", str(tmp_path / "c.png"), "--json")
    assert code == 0, err
    assert [m["final_tokens"] for m in json.loads(stdout)["methods"]] == [49, 49]


def test_a_failed_budget_search_says_what_to_give(cli, tiny_default_convnext, tmp_path, monkeypatch):
    from tokenbench.visual import budget as visual_budget

    def refuse(self, *a, **k):
        raise UserError("dynamicvit needs keep_rate > 0.4, got 0.001")

    monkeypatch.setattr(visual_budget.Flops, "matched", refuse)
    code, stdout, err = cli("visualize", "default-convnext", "--method", "dynamicvit", "--data", "synthetic",
                            "--out", str(tmp_path / "t.png"))
    errors = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert code == 2 and len(errors) == 1, err   # one error line (beside the untrained-predictors warning)
    assert "while searching keep_rate for 0.66x dense FLOPs: give --set keep_rate=VALUE" in errors[0]
    assert all(l.startswith(("error:", "warning:")) for l in err.strip().splitlines()), err


def test_cli_refuses_a_method_that_cannot_apply(cli, tiny_default_convnext, tmp_path):
    code, stdout, err = cli("visualize", "default-convnext", "--method", "tome", "--data", "synthetic",
                            "--out", str(tmp_path / "t.png"))
    assert code == 2 and "tome" in err and len(err.strip().splitlines()) == 1, err


def test_a_budget_the_knob_cannot_reach_says_what_it_reached(cli, tiny_default_convnext, tmp_path):
    # DynamicCNN's keep_rate must stay above 0.4, which leaves the embedded ConvNeXt above 0.66x
    code, stdout, err = cli("visualize", "default-convnext", "--method", "dynamicvit", "--data", "synthetic",
                            "--out", str(tmp_path / "t.png"))
    assert code == 0, err
    note = next(l for l in err.splitlines() if l.startswith("note: dynamicvit at keep_rate="))
    reached = float(note.split(": ")[2].split("x")[0])
    assert reached > 0.67 and "the nearest its keep_rate reaches to 0.66x" in note, note
