"""tokenbench analyze: IoU, kappa, CKA against hand-computed values; keep maps of random and top-k on a
tiny ViT; the command end to end on a tiny sweep."""

import json
import math

import numpy as np
import pytest
import torch

from tokenbench.analysis import metrics
from tokenbench import registry

from conftest import peak_weights, register_tiny_timm, tiny_vit, write_sweep  # noqa: E402

TINY = "tb_analyze_tiny_vit"
register_tiny_timm(TINY)


# --------------------------------------------------------------------------- IoU

def test_iou_identical_disjoint_and_partial():
    a = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)
    b = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=bool)
    assert metrics.iou(a, b).tolist() == [1.0, 0.0, 1.0]          # identical, disjoint, both empty
    c = np.array([[1, 1, 1, 0]], dtype=bool)
    d = np.array([[0, 1, 1, 1]], dtype=bool)
    assert metrics.iou(c, d)[0] == pytest.approx(2 / 4)
    assert metrics.mean_iou(np.vstack([c, c]), np.vstack([d, c])) == pytest.approx((0.5 + 1) / 2)


def test_chance_iou_is_the_exact_mean_over_every_pair_of_subsets():
    import itertools

    n = 6
    for a in range(n + 1):
        for b in range(n + 1):
            sets_a = list(itertools.combinations(range(n), a))
            sets_b = list(itertools.combinations(range(n), b))
            ious = [len(set(x) & set(y)) / len(set(x) | set(y)) if (x or y) else 1.0
                    for x in sets_a for y in sets_b]
            assert metrics.chance_iou(n, a, b) == pytest.approx(sum(ious) / len(ious), abs=1e-12), (a, b)
    # example sizes: a third of 196 patches each gives about 0.2
    assert 0.19 < metrics.chance_iou(196, 65, 65) < 0.21


def test_pattern_agreement_puts_random_choices_at_zero_and_identical_sets_at_one():
    rng = np.random.default_rng(0)
    n, p = 4000, 64
    a = np.zeros((n, p), bool)
    b = np.zeros((n, p), bool)
    for i in range(n):
        a[i, rng.choice(p, 20, replace=False)] = True
        b[i, rng.choice(p, 40, replace=False)] = True
    r = metrics.pattern_agreement(a, b)
    assert r["informative"] and r["chance"] == pytest.approx(metrics.chance_iou(p, 20, 40))
    assert r["iou"] == pytest.approx(r["chance"], abs=0.01) and abs(r["above_chance"]) < 0.03
    same = metrics.pattern_agreement(a, a)
    assert same["iou"] == 1.0 and same["above_chance"] == pytest.approx(1.0)
    # every patch covered (a merging method): IoU is the other's kept fraction, i.e. its chance level
    full = metrics.pattern_agreement(np.ones((n, p), bool), a)
    assert not full["informative"] and math.isnan(full["iou"]) and math.isnan(full["above_chance"])


def _setting(label, survive, alone):
    from tokenbench.analysis.settings import Setting

    n = len(survive)
    trace = {"pred": np.zeros(n, np.int64), **{f"survive_{b}": survive for b in (3, 11)},
             **{f"alone_{b}": alone for b in (3, 11)}}
    return Setting(label=label, method=label, params={}, seed_param=None, seed_index=0, level=0.5, flops_rel=0.5,
                   gflops=None, top1=0.0, correct=np.zeros(n, bool), predictions=None, keys={}, spec={}, trace=trace)


def test_pattern_table_shows_chance_and_leaves_out_what_says_nothing():
    from tokenbench.analysis.tables import pattern_table

    rng = np.random.default_rng(1)
    kept = rng.random((50, 64)) < 0.3
    other = rng.random((50, 64)) < 0.5
    full = np.ones((50, 64), bool)
    group = [_setting("pa", kept, kept), _setting("pb", other, other), _setting("merge", full, full)]
    t, mats = pattern_table(group, [3, 11])
    pairs = {(r["a"], r["b"]) for r in t.rows}
    assert pairs == {("pa", "pb")}                              # nothing against a set covering every patch
    row = t.rows[0]
    expect = np.mean([metrics.chance_iou(64, int(x), int(y)) for x, y in zip(kept.sum(1), other.sum(1))])
    assert row["chance"] == pytest.approx(expect) and row["iou"] == pytest.approx(metrics.mean_iou(kept, other))
    assert row["above"] == pytest.approx((row["iou"] - expect) / (1 - expect))
    assert "chance" in t.markdown() and "above chance" in t.markdown()
    names, mat = mats[(0.5, 11)]
    assert np.isnan(mat[2]).all() and mat[0, 1] == pytest.approx(row["above"])
    # a merging method whose own tokens are a proper subset keeps its own-token row, surviving blank
    merged_some = _setting("merge", full, kept)
    t, _ = pattern_table([group[1], merged_some], [3])
    assert len(t.rows) == 1 and math.isnan(t.rows[0]["iou"]) and not math.isnan(t.rows[0]["iou_alone"])
    assert "| – |" in t.markdown()


def test_surviving_patches_count_merged_coverage_but_not_a_fused_token():
    # 6 patches; tokens: 0 class token, 1 kept (patch 0), 2 merged group (patches 1, 2), 3 fused (patches 4, 5);
    # patch 3 dropped.
    assign = np.array([[1, 2, 2, -1, 3, 3]])
    role = np.array([[0, metrics.KEPT, metrics.GROUP, metrics.FUSED]])
    merged = metrics.surviving_patches(assign, role, merged=True)
    own = metrics.surviving_patches(assign, role, merged=False)
    assert merged.tolist() == [[True, True, True, False, False, False]]
    assert own.tolist() == [[True, False, False, False, False, False]]
    # against a pruning method that kept patches 0 and 3: 1 shared of 4 in the union
    pruned = np.array([[True, False, False, True, False, False]])
    assert metrics.mean_iou(merged, pruned) == pytest.approx(1 / 4)
    assert metrics.mean_iou(own, pruned) == pytest.approx(1 / 2)


def test_role_codes_match_the_visualisation():
    from tokenbench.visual.trace import FUSED, GROUP, KEPT

    assert (metrics.KEPT, metrics.GROUP, metrics.FUSED) == (KEPT, GROUP, FUSED)


def test_traced_patterns_through_the_surgery():
    """Merging keeps every patch covered; pruning keeps exactly its count; both from the source map."""
    from tokenbench.analysis.trace import comparison_blocks, trace_batch

    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    blocks = comparison_blocks(12)
    assert blocks == [3, 6, 9, 11]
    tome = registry.apply(tiny_vit(), "tome", r=4)
    tr = trace_batch(tome, x, blocks)
    assert tr["survive_11"].all()                              # 64 patches in 65 - 48 tokens, none lost
    assert (tr["alone_11"].sum(1) < 64).all()                  # ... but many no longer their own token
    assert tr["tokens"].tolist() == [[65 - 4 * i for i in range(12)]] * 3
    topk = registry.apply(tiny_vit(), "topk", keep_rate=0.5)
    tr = trace_batch(topk, x, blocks)
    assert tr["survive_3"].sum(1).tolist() == [32] * 3 and tr["survive_11"].sum(1).tolist() == [8] * 3
    assert (tr["survive_11"] <= tr["survive_6"]).all()          # what is dropped stays dropped
    assert tr["features"].shape == (3, 32) and tr["pred"].shape == (3,)


# --------------------------------------------------------------------------- kappa

def test_kappa_against_hand_computed_values():
    a = [1, 1, 1, 0, 0]
    b = [1, 0, 1, 0, 1]
    # p_o = 3/5; p_a = p_b = 3/5, p_e = 0.36 + 0.16 = 0.52; kappa = 0.08 / 0.48
    assert metrics.cohen_kappa(a, b) == pytest.approx(1 / 6)
    # unequal marginals: p_o = 7/8, p_a = 1/2, p_b = 3/8: p_e = 3/16 + 5/16 = 1/2 -> kappa = 0.375 / 0.5
    assert metrics.cohen_kappa([1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]) == pytest.approx(0.75)
    assert metrics.cohen_kappa(a, a) == 1.0
    assert metrics.cohen_kappa([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert metrics.cohen_kappa([1, 1], [1, 1]) == 1.0                # both constant and equal: p_e = 1, taken as 1
    assert metrics.cohen_kappa([1, 1], [0, 0]) == 0.0                # p_o = p_e = 0
    with pytest.raises(ValueError):
        metrics.cohen_kappa([1, 0], [1])


def test_per_class_top1():
    acc = metrics.per_class_top1([1, 0, 1, 1], [0, 0, 1, 2], 4)
    assert acc[:3].tolist() == [50.0, 100.0, 100.0] and math.isnan(acc[3])


# --------------------------------------------------------------------------- CKA and cosine

def test_linear_cka_against_hand_computed_values():
    # one feature each: CKA is the squared correlation; centred x = (-1.5, -.5, .5, 1.5), y = (-1.5, .5, -.5, 1.5):
    # x.y = 4, |x|^2 = |y|^2 = 5 -> 16 / 25
    x = np.array([[1.0], [2.0], [3.0], [4.0]])
    y = np.array([[1.0], [3.0], [2.0], [4.0]])
    assert metrics.linear_cka(x, y) == pytest.approx(16 / 25)
    # X^T X = diag(2, 2), Y^T Y = diag(2, 0), Y^T X = diag(2, 0): 4 / (sqrt(8) * 2)
    X = np.array([[1.0, 0], [0, 1], [-1, 0], [0, -1]])
    Y = np.array([[1.0, 0], [0, 0], [-1, 0], [0, 0]])
    assert metrics.linear_cka(X, Y) == pytest.approx(1 / math.sqrt(2))
    # invariant to rotation, isotropic scale and a shift
    rng = np.random.default_rng(0)
    f = rng.normal(size=(50, 6))
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert metrics.linear_cka(f, 3 * f @ q + 1) == pytest.approx(1.0)
    assert metrics.linear_cka(f, rng.normal(size=(50, 4))) < 0.5


def test_mean_cosine():
    x = np.array([[1.0, 0], [1, 1]])
    y = np.array([[0.0, 2], [2, 2]])
    assert metrics.mean_cosine(x, y) == pytest.approx(0.5)


# --------------------------------------------------------------------------- budget, prior, levels

def test_budget_summary_constant_and_varying_counts():
    labels = np.array([0, 0, 1, 1])
    const = metrics.budget_summary(np.full(4, 30.0), np.full(4, 0.02), labels, np.array([1, 0, 1, 1], bool), 2)
    assert const["constant"] and math.isnan(const["corr_tokens_correct"]) and const["tokens_std"] == 0
    var = metrics.budget_summary(np.array([10.0, 20, 30, 40]), np.array([1.0, 2, 3, 4]), labels,
                            np.array([0, 0, 1, 1], bool), 2)
    assert not var["constant"] and var["tokens_per_class"] == [15.0, 35.0]
    assert var["tokens_correct"] == 35.0 and var["tokens_wrong"] == 15.0 and var["corr_tokens_correct"] > 0.8


def test_centre_prior_and_correlation():
    p = metrics.centre_prior((7, 7))
    assert p[3, 3] == pytest.approx(1.0) and p.argmax() == 24 and p[0, 0] < 0.1
    assert metrics.pearson(p, p) == pytest.approx(1.0) and metrics.pearson(p, -p) == pytest.approx(-1.0)
    assert math.isnan(metrics.pearson(np.ones(49), p.ravel()))


def test_flops_levels():
    assert metrics.flops_level([0.5], 0.49, [0.5, 0.6], 0.03) == 0.5
    assert metrics.flops_level([], 0.498, [0.5, 0.6], 0.03) == 0.5        # a fixed keep rate that lands on a target
    assert metrics.flops_level([], 0.657, [0.5, 0.7], 0.03) == 0.66       # off the grid: its own level


# --------------------------------------------------------------------------- keep maps on a tiny ViT

def _keep_map(method, params, n=512):
    from tokenbench.analysis.trace import trace_setting

    net = peak_weights(tiny_vit())
    registry.apply(net, method, **params)
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ds = torch.utils.data.TensorDataset(x, torch.zeros(n, dtype=torch.long))
    tr = trace_setting(net, ds, n, [3, 6, 9, 11])  # one batch: random's draws are independent per image
    return metrics.keep_map(tr["alone_11"], (8, 8)), n


def test_keep_map_of_random_is_flat_and_of_topk_is_not():
    kmap, n = _keep_map("random", {"keep_rate": 0.7, "seed": 0})
    assert kmap.mean() == pytest.approx(int(64 * 0.7 ** 3) / 64)
    assert metrics.flatness_z(kmap, n) < 4.5                          # within sampling error (64 positions)
    kmap, n = _keep_map("topk", {"keep_rate": 0.7})
    assert metrics.flatness_z(kmap, n) > 6                            # far beyond sampling error


# --------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A tiny sweep, measured once for this module's command tests: its results directory."""
    import io
    import sys

    from tokenbench.cli.main import main

    tmp = tmp_path_factory.mktemp("analyze")
    old = sys.stdout
    sys.stdout = io.StringIO()
    try:
        main(["run", str(_tiny_sweep(tmp)), "--no-plots", "--json"])
    except SystemExit as e:
        assert not e.code, e.code
    finally:
        sys.stdout = old
    return tmp / "out"


def _tiny_sweep(tmp_path):
    return write_sweep(tmp_path / "s.toml", TINY, """
        [methods.topk]
        keep_rate = 0.5
        [methods.random]
        keep_rate = 0.5
        [methods.tome]
        r = 3
        """, out=tmp_path / "out", top="seeds = [0, 1]", limit=40, batch_size=16)


def test_analyze_end_to_end_cached_and_narrowed(swept, cli, monkeypatch):
    from tokenbench.analysis import trace

    d = swept
    code, out, err = cli("analyze", str(d), "--json")
    assert code == 0, err
    res = json.loads(out)
    # dense, topk, random s0 + s1, tome: four re-run (the second seed only in the error tables)
    assert res["settings"] == 5 and res["traced"] == 4 and res["re_run"] == 4 and res["n_images"] == 40
    a = d / "analysis"
    for name in ("patterns", "errors_kappa", "per_class", "drift", "budget", "budget_per_class", "spatial"):
        for ext in ("md", "csv", "tex"):
            assert (a / f"{name}.{ext}").is_file(), name
    for fig in ("errors_kappa_48", "patterns_iou_48", "per_class_change", "drift", "budget_tokens", "keep_maps"):
        assert (a / "plots" / f"{fig}.png").is_file() and (a / "plots" / f"{fig}.pdf").is_file(), fig
    assert b"CreationDate" not in (a / "plots" / "drift.pdf").read_bytes()
    index = (a / "index.md").read_text()
    assert "every re-run checked predicts exactly what its record holds, on all 40 images" in index
    assert f"Written by `tokenbench analyze {d}`." in index and "cache" in index.split("cached in `")[1]
    assert "constant" in (a / "budget.md").read_text()
    kappa = list(csv_rows(a / "errors_kappa.csv"))
    assert len(kappa) == 5 * 4 // 2                                   # every pair
    assert (a / "cache" / ".gitignore").read_text().strip().endswith("*")

    # a second run re-runs nothing
    calls = []
    real = trace.trace_setting
    monkeypatch.setattr(trace, "trace_setting", lambda *a, **k: calls.append(1) or real(*a, **k))
    code, out, err = cli("analyze", str(d), "--json", "--no-plots")
    assert code == 0 and json.loads(out)["re_run"] == 0 and calls == []
    # narrowing: another image count is another cache entry; --methods keeps dense
    code, out, err = cli("analyze", str(d), "--json", "--no-plots", "--methods", "topk", "--limit", "20")
    res = json.loads(out)
    assert code == 0 and res["settings"] == 2 and res["re_run"] == 2 and res["n_images"] == 20


def test_narrowed_run_elsewhere_replaces_its_own_figures_only(swept, cli, tmp_path):
    dest = tmp_path / "elsewhere"
    (dest / "plots").mkdir(parents=True)
    (dest / "plots" / "mine.png").write_bytes(b"not ours")
    code, out, err = cli("analyze", str(swept), "--out", str(dest), "--json")
    assert code == 0, err
    assert (dest / "plots" / "errors_kappa_69.png").is_file() and (dest / "drift.md").is_file()
    code, out, err = cli("analyze", str(swept), "--out", str(dest), "--flops", "0.48", "--json")
    assert code == 0, err
    assert not (dest / "plots" / "errors_kappa_69.png").exists()      # a figure of the wider run: gone
    assert (dest / "plots" / "errors_kappa_48.png").is_file() and (dest / "plots" / "mine.png").is_file()
    assert json.loads(out)["re_run"] == 0                             # the cache of DIR/analysis serves


def csv_rows(path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)


@pytest.mark.parametrize("args, match", [
    (["--methods", "nosuch"], "--methods: no setting of 'nosuch'"),
    (["--flops", "1.5"], "--flops takes fractions"),
    (["--flops", "0.2"], "--flops 0.2: no setting at that level"),
    (["--limit", "1"], "--limit must be at least 2"),
])
def test_analyze_bad_input_is_one_line(swept, cli, args, match):
    code, out, err = cli("analyze", str(swept), *args)
    assert code == 2 and match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_analyze_needs_a_dense_record(tmp_path, cli):
    code, _, err = cli("analyze", str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in err
    (tmp_path / "empty" / "records").mkdir(parents=True)
    code, _, err = cli("analyze", str(tmp_path / "empty"))
    assert code == 2 and "no records" in err


def test_a_dense_sweep_is_refused_with_what_reads_it(cli):
    from pathlib import Path

    seg = Path(__file__).resolve().parent.parent / "results" / "default-seg"
    if not (seg / "records").is_dir():
        pytest.skip("no dense reference results in this checkout")
    for extra in ((), ("--model", "default-seg")):
        code, _, err = cli("analyze", str(seg), *extra)
        assert code == 2 and "holds a dense sweep (mIoU): analyze reads classification sweeps" in err, err
        assert len(err.strip().splitlines()) == 1
