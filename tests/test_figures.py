"""Paper figures: recipes parse and expand to the papers' runs; FLOPs-only versions run on a tiny
stand-in model and write their tables and plots; ours are set beside the published numbers."""

import csv
import json

import pytest
import torch
from timm.models import register_model

from tokenbench.figures.plan import FigureOptions, accuracy_status, expand_plan, measure_command
from tokenbench.figures.recipe import PUBLISHED_COLUMNS, Published, arch, load_published, load_recipe, matches, recipe_names
from tokenbench.figures.tables import compare_row
from tokenbench.figures import run as figure_run
from tokenbench.figures.run import build_plan, run_figure
from tokenbench.errors import UserError

TINY = "tokenbench_test_vit"


@register_model
def tokenbench_test_vit(pretrained=False, **kwargs):
    """A 4-block ViT (reduction sites 1, 2, 3) on 32 px, 64 patches: fvcore counts it in a blink."""
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)
    args.update({k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")})
    return VisionTransformer(**args)


RECIPES = ["dynamicvit-convnext", "dynamicvit-deit-b", "dynamicvit-deit-s", "dynamicvit-swin", "evit-deit-s",
           "matched-flops-deit-s", "methods-deit-s", "tome-deit-s", "tome-vit-b"]
KR = [0.5, 0.6, 0.7, 0.8, 0.9]
R = [2, 4, 6, 8, 10, 12, 13, 14, 16]

# recipe -> (model, [(label, method, params), ...]) for the recipes with explicit grids
EXPECTED = {
    "dynamicvit-deit-s": ("deit_small_patch16_224.fb_in1k",
                          [("none", "none", {})] + [("dynamicvit", "dynamicvit", {"keep_rate": k}) for k in KR]),
    "dynamicvit-deit-b": ("deit_base_patch16_224.fb_in1k",
                          [("none", "none", {}), ("dynamicvit", "dynamicvit", {"keep_rate": 0.7})]),
    "tome-deit-s": ("deit_small_patch16_224.fb_in1k",
                    [("none", "none", {})] + [("tome", "tome", {"r": r, "prop_attn": True}) for r in R]),
    "tome-vit-b": ("vit_base_patch16_224.augreg_in21k_ft_in1k",
                   [("none", "none", {})] + [("tome", "tome", {"r": r, "prop_attn": True}) for r in R]),
    "evit-deit-s": ("deit_small_patch16_224.fb_in1k",
                    [("none", "none", {})] + [("evit", "evit", {"keep_rate": k, "fuse_token": True}) for k in KR]
                    + [("evit-nofuse", "evit", {"keep_rate": k, "fuse_token": False}) for k in KR]),
}


def _runs(plan, searcher=None):
    return [(r.label if r.method != "none" else "none", r.method, r.params)
            for r in expand_plan(plan, searcher)]


# --------------------------------------------------------------------------- recipes

def test_every_recipe_parses_and_is_listed(cli):
    assert recipe_names() == RECIPES
    for name in RECIPES:
        rec = load_recipe(name)
        assert rec.description and rec.papers and rec.x
    code, out, err = cli("figure", "list", "--json")
    assert code == 0, err
    listed = {r["name"]: r for r in json.loads(out)["figures"]}
    assert sorted(listed) == RECIPES
    assert listed["tome-vit-b"]["models"] == ["vit_base_patch16_224.augreg_in21k_ft_in1k"]
    code, out, err = cli("figure", "list")
    assert code == 0 and "matched-flops-deit-s" in out and "DynamicViT on DeiT-S" in out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_expands_to_the_papers_runs(name, tmp_path):
    """The pinned weight tag and exactly the papers' settings (no FLOPs search: nothing is built)."""
    from tokenbench.registry import get_method

    model, want = EXPECTED[name]
    plan = build_plan(name, FigureOptions(out=str(tmp_path)))
    runs = expand_plan(plan)
    assert [r.model for r in runs] == [model] * len(want)
    # (the dense run's label is the sweep's business)
    assert [(r.label if r.method != "none" else "none", r.method, r.params) for r in runs] == [
        (lab, m, get_method(m).validate(p)) for lab, m, p in want]
    assert all(r.checkpoint is None and not r.pretrained for r in runs)
    assert plan.sweep.measure == ["flops", "throughput"]  # no data: no accuracy
    assert plan.published and all(p.paper in plan.recipe.papers for p in plan.published)


def test_checkpoints_found_by_template_and_required_entries(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    for f in ("dynamicvit-deit-s-0.7.pth", "dynamicvit-deit-s-0.75.pth", "f367470145_deit_S_r13.pth"):
        (ck / f).write_bytes(b"x")
    plan = build_plan("dynamicvit-deit-s", FigureOptions(checkpoint_dir=str(ck), out=str(tmp_path)))
    runs = expand_plan(plan)
    cks = {r.params.get("keep_rate"): r.checkpoint for r in runs if r.method == "dynamicvit"}
    assert cks[0.7] == str(ck / "dynamicvit-deit-s-0.7.pth")
    assert all(v is None for k, v in cks.items() if k != 0.7) and 0.75 not in cks  # only the grid's values
    # tome-trained needs its checkpoint: dropped without it, run with it
    assert "tome-trained" not in {lab for lab, _, _ in _runs(build_plan(
        "tome-deit-s", FigureOptions(out=str(tmp_path))))}
    plan = build_plan("tome-deit-s", FigureOptions(checkpoint_dir=str(ck), out=str(tmp_path)))
    trained = [r for r in expand_plan(plan) if r.label == "tome-trained"]
    assert len(trained) == 1 and trained[0].params["r"] == 13 and trained[0].checkpoint.endswith("deit_S_r13.pth")
    # accuracy: only runs with real weights, a learned method only with its checkpoint
    plan = build_plan("dynamicvit-deit-s", FigureOptions(
        checkpoint_dir=str(ck), data_dir=str(tmp_path), pretrained=True, out=str(tmp_path)))
    status = {(r.method, r.params.get("keep_rate")): accuracy_status(plan, r)
              for r in expand_plan(plan)}
    assert status[("none", None)] == (True, "")
    assert status[("dynamicvit", 0.7)] == (True, "")
    ok, why = status[("dynamicvit", 0.5)]
    assert not ok and "dynamicvit-deit-s-0.5.pth" in why
    plan = build_plan("dynamicvit-deit-s", FigureOptions(data_dir=str(tmp_path), out=str(tmp_path)))
    ok, why = accuracy_status(plan, expand_plan(plan)[0])
    assert not ok and "--pretrained" in why


@pytest.mark.parametrize("family,sizes,zoo", [
    ("convnext", [("convnext_tiny", "fb_in1k"), ("convnext_small", "fb_in1k"), ("convnext_base", "fb_in1k")], 6),
    ("swin", [(f"swin_{s}_patch4_window7_224", "ms_in1k") for s in ("tiny", "small", "base")], 3)])
def test_hierarchical_recipes_hold_three_sizes_and_name_checkpoints_by_model(family, sizes, zoo, tmp_path):
    """Three sizes, dense and keep rates 0.7 / 0.9 each; `{model}` in a checkpoint file names the
    architecture, one model at a time (the sweep keys checkpoints by the keep rate alone)."""
    name = f"dynamicvit-{family}"
    plan = build_plan(name, FigureOptions(out=str(tmp_path)))
    models = [f"{a}.{tag}" for a, tag in sizes]
    assert [(r.model, r.method, r.params.get("keep_rate")) for r in expand_plan(plan)] == [
        (m, meth, k) for m in models for meth, k in (("none", None), ("dynamicvit", 0.7), ("dynamicvit", 0.9))]
    assert len([p for p in plan.published if p.method == "dynamicvit"]) == zoo
    assert len([p for p in plan.published if p.method == "none"]) == 3
    assert "--checkpoint-dir /path/to/checkpoints --model MODEL" in measure_command(plan)
    ck = tmp_path / "ck"
    ck.mkdir()
    small = sizes[1][0]
    for f in (f"dynamicvit-{small}-0.7.pth", f"dynamicvit-{small}-0.9.pth", f"dynamicvit-{sizes[0][0]}-0.7.pth"):
        (ck / f).write_bytes(b"x")
    with pytest.raises(UserError, match=r"named by \{model\}: measure one model at a time with --model"):
        build_plan(name, FigureOptions(checkpoint_dir=str(ck), out=str(tmp_path)))
    plan = build_plan(name, FigureOptions(model=models[1], checkpoint_dir=str(ck), out=str(tmp_path)))
    cks = {r.params.get("keep_rate"): r.checkpoint for r in expand_plan(plan)}
    assert cks == {None: None, 0.7: str(ck / f"dynamicvit-{small}-0.7.pth"), 0.9: str(ck / f"dynamicvit-{small}-0.9.pth")}
    assert plan.published and {arch(p.model) for p in plan.published} == {small}
    plan = build_plan(name, FigureOptions(model=models[0], checkpoint_dir=str(ck), out=str(tmp_path),
                                                          data_dir=str(tmp_path), pretrained=True))
    status = {r.params.get("keep_rate"): accuracy_status(plan, r) for r in expand_plan(plan)}
    assert status[0.7] == (True, "") and f"dynamicvit-{sizes[0][0]}-0.9.pth" in status[0.9][1]


def test_embedded_variant_of_the_convnext_recipe_runs_on_the_embedded_convnext(tmp_path):
    ck = tmp_path / "results"
    (ck / "dynamicvit-convnext-0.7").mkdir(parents=True)
    (ck / "dynamicvit-convnext-0.7" / "model.pt").write_bytes(b"x")
    plan = build_plan("dynamicvit-convnext@embedded", FigureOptions(checkpoint_dir=str(ck),
                                                                                    out=str(tmp_path)))
    runs = expand_plan(plan)
    assert {r.model for r in runs} == {"default-convnext"} and not plan.published
    assert {r.params.get("keep_rate"): r.checkpoint for r in runs} == {
        None: None, 0.7: str(ck / "dynamicvit-convnext-0.7" / "model.pt"), 0.9: None}
    assert {r.model for r in expand_plan(build_plan(
        "tome-deit-s@embedded", FigureOptions(out=str(tmp_path))))} == {"default"}
    bad = tmp_path / "r.toml"
    bad.write_text('[figure.embedded]\nmodel = "resnet50"\n[sweep]\n[sweep.methods.none]\n')
    with pytest.raises(UserError, match="model must be one of default, default-convnext"):
        load_recipe(bad)


@pytest.fixture(scope="module")
def matched_out(tmp_path_factory):
    """An output directory whose FLOPs-search cache holds the tiny model's matched-FLOPs search."""
    return tmp_path_factory.mktemp("matched")


def test_matched_flops_recipe_expands_on_a_tiny_model(matched_out):
    from tokenbench.sweep import CACHE_FILE, FlopsSearch

    plan = build_plan("matched-flops-deit-s", FigureOptions(model=TINY, out=str(matched_out)))
    runs = expand_plan(plan, FlopsSearch(matched_out / CACHE_FILE))
    by = {}
    for r in runs:
        by.setdefault(r.label if r.method != "none" else "none", []).append(r)
    assert sorted(by) == ["dynamicvit", "evit", "none", "random", "tome", "topk"]
    assert len(by["none"]) == 1 and len(runs) == 1 + 4 * 5 + 5 * 3
    for lab in ("dynamicvit", "evit", "tome", "topk"):
        assert sorted(t for r in by[lab] for t in r.targets) == KR
        assert all(r.search and not r.search["miss"] for r in by[lab])
    assert sorted(r.params["seed"] for r in by["random"]) == [0] * 5 + [1] * 5 + [2] * 5


# --------------------------------------------------------------------------- published figures

def test_published_csv_is_complete_and_consistent():
    import timm

    from tokenbench.registry import get_method

    rows = load_published()
    assert {p.paper for p in rows} == {"ConvNeXt", "DynamicViT", "EViT", "Swin", "ToMe", "PPT", "DiffRate", "MCTF",
                                       "Zero-TPrune"}
    for p in rows:
        assert p.source and timm.is_model(p.model) and "." in p.model, p  # a pinned weight tag
        assert p.weights.startswith(("timm:", "release:")), p
        get_method(p.method).validate(dict(p.params))
        assert p.gflops is not None or p.top1 is not None or p.throughput is not None, p
        if p.throughput is not None:  # a speedup needs the same paper's dense figure on the same hardware
            assert p.dense_throughput and p.hardware, p
            dense = [q for q in rows if q.paper == p.paper and q.method == "none" and q.model == p.model
                     and q.hardware == p.hardware]
            assert dense and dense[0].throughput == p.dense_throughput, p
    dvit = {json.dumps(p.params): p for p in rows if p.paper == "DynamicViT" and p.method == "dynamicvit"
            and p.model.startswith("deit_small") and p.throughput}
    assert dvit['{"keep_rate": 0.7}'].speedup == pytest.approx(2062.1 / 1337.7)


def test_comparison_flags_and_matching():
    pub = Published(paper="P", source="s", model="deit_small_patch16_224.fb_in1k",
                            weights="timm:deit_small_patch16_224.fb_in1k", method="evit",
                            params={"keep_rate": 0.7, "fuse_token": True}, gflops=3.0, top1=79.5,
                            throughput=150.0, hardware="h", dense_throughput=100.0, row=1)
    assert matches(pub, "deit_small_patch16_224", "evit", {"keep_rate": 0.7, "fuse_token": True})
    assert not matches(pub, "deit_small_patch16_224", "evit", {"keep_rate": 0.7, "fuse_token": False})
    assert not matches(pub, "deit_base_patch16_224", "evit", {"keep_rate": 0.7, "fuse_token": True})
    assert not matches(pub, "deit_small_patch16_224", "topk", {"keep_rate": 0.7})
    ours = {"gflops": 3.05, "speedup": 1.3, "top1": 79.0, "weights": "timm:deit_small_patch16_224.fb_in1k",
            "checkpoint": None, "report_flags": []}
    row = compare_row(ours, pub, in_recipe=True)
    assert row["gflops_diff"] == pytest.approx(0.05) and row["flags"] == []
    assert row["speedup_published"] == pytest.approx(1.5) and row["speedup_diff"] == pytest.approx(-0.2)
    assert row["top1_diff"] == pytest.approx(-0.5) and row["weights_same"]
    row = compare_row({**ours, "gflops": 3.11, "weights": "random-init:seed0"}, pub, in_recipe=True)
    assert row["flags"] == ["gflops-differs", "weights-differ"]
    release = Published(**{**pub.__dict__, "weights": "release:trained"})
    assert compare_row({**ours, "checkpoint": "x.pth"}, release, True)["flags"] == []
    assert compare_row(ours, release, True)["flags"] == ["weights-differ"]


# --------------------------------------------------------------------------- FLOPs-only figures on a tiny model

# methods-deit-s: diffrate's default schedules are DeiT-S's 12 blocks (this tiny model has 4), and
# the whole recipe takes minutes on a 12-block tiny model: tests/test_methods_figure.py checks it
@pytest.mark.parametrize("name", [n for n in RECIPES if n != "methods-deit-s"])
def test_flops_only_figure_runs_on_a_tiny_model(name, cli, tmp_path, matched_out):
    out = matched_out if name == "matched-flops-deit-s" else tmp_path / name  # reuses the search's cache
    code, stdout, err = cli("figure", name, "--model", TINY, "--no-throughput", "--out", str(out), "--json")
    assert code == 0, err
    res = json.loads(stdout)
    base = out / name
    for ext in ("md", "csv", "png", "pdf"):
        assert base.with_suffix(f".{ext}").stat().st_size > 0, ext
    rows = [r for r in res["rows"] if r["in_recipe"]]
    assert rows and all(r["gflops"] > 0 and r["tokens"] and len(r["tokens"]) == 4 for r in rows)
    dense = [r for r in rows if r["method"] == "none"]
    assert len(dense) == 1 and dense[0]["tokens"] == [65] * 4
    assert all(r["tokens"][-1] < 65 for r in rows if r["method"] != "none")  # every method reduces
    assert all(r["top1"] is None and r["accuracy_status"] == "no ImageNet (--data-dir)" for r in rows)
    md = base.with_suffix(".md").read_text()
    assert "not measured" in md and f"tokenbench figure {name} --data-dir /path/to/imagenet --pretrained" in md
    assert "none match (the recipe's model was replaced" in md
    with open(base.with_suffix(".csv")) as f:
        assert len(list(csv.DictReader(f))) == len(res["rows"])


def test_published_gflops_are_compared_and_flagged(cli, tmp_path, monkeypatch):
    """A published figure for the tiny model: agreement within 0.1 passes, a wrong value is flagged."""
    from tokenbench.sweep import FlopsSearch

    torch.manual_seed(0)
    g = FlopsSearch().count(TINY, None, "topk", {"keep_rate": 0.5})
    pub = tmp_path / "published.csv"
    rows = [dict(paper="DynamicViT", source="test table", model=f"{TINY}.x", weights="release:test",
                 method="dynamicvit", params=json.dumps({"keep_rate": k}), gflops=str(v), top1="70.0",
                 throughput="300", hardware="hw", dense_throughput="200", note="")
            for k, v in ((0.5, 0.0), (0.7, 5.0))]
    rows.append(dict(paper="DynamicViT", source="test topk", model=TINY, weights="release:test", method="topk",
                     params=json.dumps({"keep_rate": 0.5}), gflops=f"{g:.4f}", top1="", throughput="",
                     hardware="", dense_throughput="", note=""))
    with open(pub, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=PUBLISHED_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    monkeypatch.setattr(figure_run, "PUBLISHED_FILE", pub)
    rec = load_recipe("dynamicvit-deit-s")
    rec.sweep["models"] = [TINY]
    monkeypatch.setattr(figure_run, "load_recipe", lambda name: rec)
    fig = run_figure("dynamicvit-deit-s", FigureOptions(throughput=False, out=str(tmp_path / "o")))
    by = {(r["method"], r["params"].get("keep_rate")): r for r in fig["rows"] if r["paper"]}
    assert by[("dynamicvit", 0.5)]["flags"] == []                      # 0.002 GFLOPs vs 0.0: within 0.1
    assert by[("dynamicvit", 0.7)]["flags"] == ["gflops-differs"]       # vs 5.0
    assert by[("dynamicvit", 0.7)]["speedup_published"] == pytest.approx(1.5)
    extra = fig["extra"]                                               # topk is no run of this recipe
    assert len(extra) == 1 and extra[0]["gflops"] == pytest.approx(g) and extra[0]["flags"] == []
    ag = fig["gflops_agreement"]
    assert ag["compared"] == 3 and ag["agree"] == 2
    md = (tmp_path / "o" / "dynamicvit-deit-s.md").read_text()
    assert "2 of 3 published values within 0.1" in md and "gflops-differs" in md and "[1] DynamicViT: test" in md


# --------------------------------------------------------------------------- the embedded variant

def test_embedded_variant_runs_end_to_end(cli, tiny_default, tmp_path):
    from test_harness import _fake_fmnist

    from tokenbench.api import load

    data = tmp_path / "fmnist"
    data.mkdir()
    _fake_fmnist(data, n=40)
    ck = tmp_path / "ck" / "dynamicvit-0.7"
    ck.mkdir(parents=True)
    net, _ = load("default", "dynamicvit", {"keep_rate": 0.7})
    torch.save(net.state_dict(), ck / "model.pt")
    out = tmp_path / "emb"
    code, stdout, err = cli("figure", "dynamicvit-deit-s@embedded", "--data-dir", str(data), "--limit", "20",
                            "--checkpoint-dir", str(tmp_path / "ck"), "--no-throughput", "--out", str(out), "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["figure"] == "dynamicvit-deit-s@embedded"
    rows = {(r["method"], r["params"].get("keep_rate")): r for r in res["rows"]}
    assert all(r["model"] == "default" and r["paper"] is None for r in res["rows"])  # no published overlay
    assert rows[("none", None)]["top1"] is not None and rows[("none", None)]["n"] == 20
    assert rows[("dynamicvit", 0.7)]["top1"] is not None and rows[("dynamicvit", 0.7)]["checkpoint"]
    r5 = rows[("dynamicvit", 0.5)]
    assert r5["top1"] is None and "dynamicvit-0.5/model.pt" in r5["accuracy_status"]
    md = (out / "dynamicvit-deit-s.md").read_text()
    assert "embedded Fashion-MNIST" in md and "Published figures: none" in md
    # the ToMe recipe swaps in small r for 50 tokens and leaves out the ImageNet-only trained entry
    plan = build_plan("tome-deit-s", FigureOptions(embedded=True, out=str(tmp_path / "t")))
    assert _runs(plan) == [("none", "none", {})] + [("tome", "tome", {"r": r, "prop_attn": True}) for r in (1, 2, 3, 4)]
    assert plan.dropped == ["tome-trained"] and plan.sweep.data == "fashion-mnist" and plan.sweep.limit == 1000


def test_bad_input_is_one_line(cli, tmp_path):
    code, out, err = cli("figure", "dynamicvit-deit")
    assert code == 2 and "no figure recipe" in err and "dynamicvit-deit-s" in err
    code, out, err = cli("figure", "tome-deit-s@imagenet")
    assert code == 2 and "unknown figure variant" in err
    code, out, err = cli("figure", "tome-deit-s", "--embedded", "--model", TINY)
    assert code == 2 and "not both" in err
    code, out, err = cli("figure", "tome-deit-s", "--checkpoint-dir", str(tmp_path / "nope"))
    assert code == 2 and "does not exist" in err
    code, out, err = cli("figure", "tome-deit-s", "--batch-size", "0")
    assert code == 2 and "must be positive" in err
    with pytest.raises(UserError, match="unknown key"):
        p = tmp_path / "r.toml"
        p.write_text('[figure]\ndescripton = "x"\n[sweep]\n[sweep.methods.none]\n')
        load_recipe(p)
