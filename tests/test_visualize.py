"""Token visualisations: the source bookkeeping they read, the drawing, and `tokenbench visualize`."""

import ast
import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import tiny_vit
from tokenbench.visual.draw import DROPPED_GHOST, DROPPED_GREY, method_figure, render_stage, save_figure, select_stages
from tokenbench.visual.inputs import Images, _to_display, images_from_files
from tokenbench.visual.trace import FUSED, GROUP, KEPT, PAD, PREFIX, classify, patch_assignment, trace
from tokenbench.sweep import DEFAULT_TOLERANCE
from tokenbench.backbones import backbone_of, last_state, set_track_source
from tokenbench.errors import UserError
from tokenbench.registry import apply, get_method, list_methods

from conftest import SMALL_EMBEDDED as SMALL  # noqa: E402

# Settings that reduce a lot on the tiny 8x8-patch model, plus every registered method's defaults.
CASES = [("tome", {"r": 4}), ("tome", {"r": [9, 0, 5, 3, 20]}), ("topk", {"keep_rate": 0.6}),
         ("random", {"keep_rate": 0.5}), ("evit", {"keep_rate": 0.6}), ("evit", {"keep_rate": 0.3}),
         ("evit", {"keep_rate": 0.5, "fuse_token": False}), ("dynamicvit", {"keep_rate": 0.6})]
CASES += [(m["name"], {}) for m in list_methods()]


def run_tracked(method, params, b=2, seed=0):
    model = tiny_vit()
    apply(model, method, **params)
    set_track_source(model, True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model(torch.randn(b, 3, 32, 32, generator=g))
    return model, last_state(model).stages


def rows(src_b):
    """The patch sets of one image's tokens (frozensets of original-token indices)."""
    return [frozenset(torch.nonzero(r).flatten().tolist()) for r in src_b]


def check_bookkeeping(model, method, params, stages):
    """Every invariant of the source map the figures rely on (see the module docstring)."""
    npf = model.num_prefix_tokens
    n_patches = backbone_of(model).num_patches
    cls = get_method(method)
    expected = cls().expected_tokens(model, **cls.validate(params))
    b = stages[0]["source"].shape[0] if stages else 0
    prev = [[frozenset([j]) for j in range(npf + n_patches)] for _ in range(b)]
    prev_dropped = [set() for _ in range(b)]
    fused_ever = [frozenset() for _ in range(b)]
    analysed = classify(stages, npf)
    last_in_block = {s["block"]: i for i, s in enumerate(stages)}
    for k, (stage, an) in enumerate(zip(stages, analysed)):
        src = stage["source"]
        if stage.get("pad") is not None:  # a padding slot stands for no token of its image
            src = src * stage["pad"][:, :, None]
        assert set(src.unique().tolist()) <= {0.0, 1.0}
        patch_src = src[:, :, npf:]
        assert (patch_src.sum(1) <= 1).all(), "a patch is in more than one token"
        assign = patch_assignment(stage, npf)
        assert assign.shape == (b, n_patches) and assign.dtype == torch.long
        # the assignment says exactly what the source map says
        covered = patch_src.sum(1) > 0
        assert ((assign >= 0) == covered).all()
        for i in range(b):
            for p in range(n_patches):
                if assign[i, p] >= 0:
                    assert src[i, assign[i, p], npf + p] == 1
        n = src.shape[1]
        assert torch.equal(an.assign, assign) and an.n_tokens == n
        for i in range(b):
            real = stage["pad"][i] if stage.get("pad") is not None else torch.ones(n, dtype=torch.bool)
            assert (an.role[i][~real] == PAD).all()
            toks = rows(src[i][real])
            n_real = int(real.sum())
            # prefix tokens stay first, themselves alone; every other token covers >= 1 patch
            assert toks[:npf] == [frozenset([j]) for j in range(npf)]
            assert all(len(t) >= 1 and min(t) >= npf for t in toks[npf:])
            dropped = {p for p in range(n_patches) if assign[i, p] < 0}
            assert prev_dropped[i] <= dropped, "a dropped patch came back"
            old = set(prev[i])
            kind = stage["kind"]
            if kind in ("merge", "mix"):  # mix: a linear map, each old token followed to its dominant new one
                assert dropped == prev_dropped[i]
                # every new token is a union of old ones
                for t in toks:
                    parts = [o for o in old if o <= t]
                    assert frozenset().union(*parts) == t
            elif kind == "merge+prune":  # a merge that also drops some tokens (PPT's pruning images)
                assert prev_dropped[i] <= dropped
                for t in toks:
                    parts = [o for o in old if o <= t]
                    assert frozenset().union(*parts) == t
            elif kind == "prune":
                assert set(toks) <= old
                assert len(toks) == len(set(toks))
            elif kind == "fuse":
                assert stage["fused_last"] and an.newest_fused == n - 1
                kept = toks[:-1]
                assert set(kept) <= old
                lost = old - set(kept)
                # the fused token covers exactly the patches dropped at this site
                assert toks[-1] == frozenset().union(*lost)
                assert int(an.role[i, -1]) == FUSED and not dropped - prev_dropped[i]
            else:
                pytest.fail(f"unknown stage kind {kind}")
            # roles: fused if it holds a patch ever fused, else kept (one patch) or merged (several)
            if kind == "fuse":
                fused_ever[i] |= toks[-1]
            role = an.role[i][real]
            for t, tok in enumerate(toks[npf:], start=npf):
                want = FUSED if tok & fused_ever[i] else (GROUP if len(tok) > 1 else KEPT)
                assert int(role[t]) == want
            # the roles add up
            c = an.counts(i)
            assert c["kept"] + c["groups"] + c["fused"] == n_real - npf == c["tokens"] - npf
            assert c["kept"] + c["grouped_patches"] + c["fused_patches"] + c["dropped"] == n_patches
            assert c["dropped"] == len(dropped)
            prev[i], prev_dropped[i] = toks, dropped
        # the declared schedule: tokens after the block's last reduction
        if expected is not None and last_in_block[stage["block"]] == k:
            assert n == expected[1][stage["block"]], (method, params, stage["block"])
            if kind == "prune" and not stage["fused_last"]:
                c0 = an.counts(0)  # a hybrid prunes tokens that earlier merges made groups
                assert c0["kept"] + c0["groups"] == expected[1][stage["block"]] - npf
    if expected is not None:
        tokens, tokens_mlp = expected
        before = [npf + n_patches] + tokens_mlp[:-1]
        reducing = {i for i in range(len(tokens)) if tokens[i] < before[i] or tokens_mlp[i] < tokens[i]}
        assert {s["block"] for s in stages} == reducing
    if stages and all(s["kind"] == "merge" for s in stages):
        assert all((a.assign >= 0).all() for a in analysed), "merging dropped a patch"
    return analysed


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{json.dumps(p)}" for m, p in CASES])
def test_source_bookkeeping(method, params):
    model, stages = run_tracked(method, params)
    analysed = check_bookkeeping(model, method, params, stages)
    if method == "tome" and params.get("r") == 4:
        assert len(stages) == 12 and any((a.role == GROUP).any() for a in analysed)
    if method == "evit" and params.get("fuse_token", True) and params:
        assert stages and all(s["kind"] == "fuse" for s in stages)
    if method in ("topk", "random", "dynamicvit") and params:
        assert [s["kind"] for s in stages] == ["prune"] * 3 and (analysed[-1].assign < 0).any()


@given(method=st.sampled_from(["tome", "topk", "random", "evit", "dynamicvit"]),
       rate=st.floats(0.15, 0.95), r=st.integers(1, 40), b=st.integers(1, 3), fuse=st.booleans(),
       seed=st.integers(0, 100))
def test_source_bookkeeping_property(method, rate, r, b, fuse, seed):
    params = {"r": r} if method == "tome" else {"keep_rate": rate}
    if method == "evit":
        params["fuse_token"] = fuse
    model, stages = run_tracked(method, params, b=b, seed=seed)
    check_bookkeeping(model, method, params, stages)


def _stage(source, kind="prune", block=3, fused_last=False):
    return {"block": block, "kind": kind, "source": torch.tensor(source, dtype=torch.float32)[None],
            "fused_last": fused_last}


def test_patch_assignment_by_hand():
    # class token + 4 patches: token 1 = patch 0, token 2 = patches 1 and 3, patch 2 dropped
    s = _stage([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 1]], kind="merge")
    assert patch_assignment(s, 1).tolist() == [[1, 2, -1, 2]]
    (a,) = classify([s], 1)
    assert a.role.tolist() == [[PREFIX, KEPT, GROUP]]
    assert a.counts(0) == {"tokens": 3, "kept": 1, "groups": 1, "grouped_patches": 2, "fused": 0,
                           "fused_patches": 0, "dropped": 1}
    assert a.title() == "block 3: 3 tokens" and a.caption(0) == "1 kept, 1 merged (2 p.), 1 dropped"
    # a fused token appended last; at the next stage it survives as an ordinary token: still fused
    f1 = _stage([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 1]], "fuse", 3, True)
    f2 = _stage([[1, 0, 0, 0, 0], [0, 0, 0, 1, 1], [0, 1, 1, 0, 0]], "fuse", 6, True)
    a1, a2 = classify([f1, f2], 1)
    assert a1.role.tolist() == [[PREFIX, KEPT, KEPT, FUSED]] and a1.newest_fused == 3
    assert a2.role.tolist() == [[PREFIX, FUSED, FUSED]]
    # a patch in two tokens is broken bookkeeping
    bad = _stage([[1, 0, 0], [0, 1, 1], [0, 0, 1]])
    with pytest.raises(ValueError, match="patch 1 of image 0 is covered by 2 tokens"):
        patch_assignment(bad, 1)


def test_render_stage_pixels():
    """Kept patches show the image, dropped ones are greyed, merged groups are flat, fused ones hatched."""
    img = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    for method, params in (("topk", {"keep_rate": 0.5}), ("tome", {"r": 6}), ("evit", {"keep_rate": 0.5})):
        model, stages = run_tracked(method, params, b=1)
        a = classify(stages, 1)[-1]
        canvas, hatched, segs, drop_segs = render_stage(img, a, 0, (8, 8))
        assign = a.assign[0].view(8, 8)
        role = a.role[0]
        for i in range(8):
            for j in range(8):
                px, im = canvas[4 * i:4 * i + 4, 4 * j:4 * j + 4], img[4 * i:4 * i + 4, 4 * j:4 * j + 4]
                t = int(assign[i, j])
                if t < 0:
                    assert np.allclose(px, (1 - DROPPED_GHOST) * DROPPED_GREY + DROPPED_GHOST * im)
                elif role[t] == KEPT:
                    assert np.array_equal(px, im)
                elif role[t] == GROUP:
                    assert np.allclose(px, px[0, 0])  # one flat colour per merged token
        if method == "topk":
            assert drop_segs and not segs and not hatched
        if method == "tome":
            assert segs and not drop_segs and (role == GROUP).any()
        if method == "evit":
            (rows_, cols_, _), = hatched
            fused = {(int(r), int(c)) for r, c in zip(rows_, cols_)}
            assert fused == {(i, j) for i in range(8) for j in range(8) if role[int(assign[i, j])] == FUSED}


# --------------------------------------------------------------------------- inputs

def test_images_from_files_gray_and_rgb(tmp_path):
    from PIL import Image

    from tokenbench.models import build_embedded

    rgb = tmp_path / "wide.png"
    a = np.zeros((20, 40, 3), dtype=np.uint8)
    a[:, 10:30] = (255, 0, 0)  # a red band in the middle of a wide image: the centre crop keeps it
    Image.fromarray(a).save(rgb)
    gray = tmp_path / "g.jpg"
    Image.fromarray(np.full((30, 30), 128, dtype=np.uint8)).save(gray)
    model = tiny_vit()  # RGB, 32 px
    im = images_from_files(model, [rgb, gray])
    assert im.x.shape == (2, 3, 32, 32) and im.display.shape == (2, 32, 32, 3)
    assert im.labels == ["wide", "g"]
    assert im.display[0, :, :, 0].mean() > 0.9 and im.display[0, :, :, 1].mean() < 0.1  # all red
    assert np.allclose(im.display[1], im.display[1, :, :, :1], atol=1e-6)  # gray stays gray
    torch.manual_seed(0)
    g = build_embedded(SMALL)  # grayscale, 28 px
    im = images_from_files(g, [tmp_path])  # a folder: its images, sorted
    assert im.x.shape == (2, 1, 28, 28) and im.labels == ["g", "wide"]
    assert np.allclose(im.display[..., 0], im.display[..., 2])
    # normalised with the model's own statistics
    assert torch.allclose(im.x[0, 0, 0, 0], torch.tensor((128 / 255 - 0.2860) / 0.3530), atol=0.02)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image"):
        images_from_files(g, [bad])
    with pytest.raises(UserError, match="does not exist"):
        images_from_files(g, [tmp_path / "nope.png"])


def test_rgb_method_figure(tmp_path):
    """The figure itself on an RGB model (no CLI: the tiny timm model has no name)."""
    from PIL import Image

    model = tiny_vit()
    apply(model, "tome", r=6)
    x = torch.rand(2, 3, 32, 32)
    images = Images(x=x, display=_to_display(x), labels=["a", "b"], targets=[None, None])
    tr = trace(model, x)
    assert tr.grid == (8, 8) and len(tr.stages) > 1 and tr.logits.shape == (2, 10)
    fig = method_figure(images, tr, title="tiny + tome", stages="final")
    out = save_figure(fig, tmp_path / "f" / "rgb.png", dpi=40)
    w, h = Image.open(out).size
    assert 0.5 < w / h < 1.0  # two square panels per row, two rows, titles above each
    assert len(fig.axes) == 4
    with pytest.raises(UserError, match="--out must end"):
        save_figure(fig, tmp_path / "x.jpg")
    with pytest.raises(UserError, match="--stages"):
        select_stages(tr.stages, "three")
    with pytest.raises(UserError, match="no reduction in blocks"):
        select_stages(tr.stages, "99")


# --------------------------------------------------------------------------- the command

@pytest.fixture
def stand_in(tiny_default, tmp_path):
    """A tiny embedded model (the real checkpoint may not exist yet) and a fake Fashion-MNIST."""
    from test_harness import _fake_fmnist

    data = tmp_path / "fmnist"
    data.mkdir()
    _fake_fmnist(data, n=30)
    return data


@pytest.fixture(scope="module")
def flops_cache(request, tmp_path_factory):
    """One FLOPs cache for this test run, shared by the parallel suite's workers (the cache merges
    concurrent writes): the figure tests and the comparison sheet search the same budgets. Without
    pytest-xdist (``-p no:xdist``) there is one process and the run's own temporary folder serves."""
    base = tmp_path_factory.getbasetemp()
    worker = getattr(request.config, "workerinput", None)
    return (base.parent if worker is not None else base) / "visualize-flops-cache.json"


@pytest.mark.parametrize("name", [m["name"] for m in list_methods()])
def test_figure_for_every_method(name, cli, stand_in, flops_cache, tmp_path):
    # one test per method: the parallel suite spreads them over its workers
    from PIL import Image

    out = tmp_path / f"tokens_{name}.png"
    # at the comparison sheet's budget, so that the two share their FLOPs searches (the default
    # budget without --flops: tests/test_cli.py)
    code, stdout, err = cli("visualize", "default", "--method", name, "--flops", "0.6", "--data-dir", str(stand_in),
                            "--n", "2", "--out", str(out), "--dpi", "40", "--flops-cache", str(flops_cache),
                            "--json")
    assert code == 0, (name, err)
    s = json.loads(stdout)
    assert s["out"] == str(out) and s["n_images"] == 2
    assert s["panels_per_image"] == 1 + max(1, len(s["stages"]))
    assert 0 < s["flops_ratio"] <= 1.0 + 1e-9
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_figure_of_chosen_images_and_stages_as_pdf(cli, stand_in, flops_cache, tmp_path):
    code, stdout, err = cli("visualize", "default", "-m", "evit", "--data-dir", str(stand_in), "--index", "3,4,5",
                            "--stages", "final", "--out", str(tmp_path / "e.pdf"), "--flops-cache", str(flops_cache))
    assert code == 0, err
    assert "3 images x 2 panels" in stdout and (tmp_path / "e.pdf").read_bytes()[:5] == b"%PDF-"


def test_comparison_sheet(cli, stand_in, flops_cache, tmp_path):
    out = tmp_path / "figs" / "sheet.png"
    code, stdout, err = cli("visualize", "default", "--compare", "all", "--flops", "0.6", "--data-dir",
                            str(stand_in), "--n", "2", "--out", str(out), "--dpi", "40", "--flops-cache",
                            str(flops_cache), "--json")
    assert code == 0, err
    s = json.loads(stdout)
    assert out.is_file() and s["target"] == 0.6
    assert [c["method"] for c in s["methods"]] == [m["name"] for m in list_methods()]
    for c in s["methods"]:
        if get_method(c["method"]).knob:
            # near the target; flagged exactly when further than the tolerance (a coarse knob on
            # this 49-patch stand-in, such as a grid of a resized image, may not land closer)
            assert abs(c["flops_ratio"] - 0.6) < 0.05, c
            assert c["miss"] is (abs(c["flops_ratio"] - 0.6) > DEFAULT_TOLERANCE + 1e-12), c
        elif get_method(c["method"]).learned:
            # a learned method without a knob runs at its own (here untrained) thresholds
            assert 0 < c["flops_ratio"] <= 1.0 + 1e-9, c
        else:
            assert c["flops_ratio"] == pytest.approx(1.0)
    # without --flops: each method's own parameters; --set reaches the methods declaring the key
    code, stdout, err = cli("visualize", "default", "--compare", "topk,tome", "--set", "keep_rate=0.5",
                            "--set", "tome.r=3", "--data-dir", str(stand_in), "--n", "1", "--out",
                            str(tmp_path / "s2.png"), "--dpi", "40", "--flops-cache", str(flops_cache), "--json")
    assert code == 0, err
    s = json.loads(stdout)
    assert s["methods"][0]["params"] == {"keep_rate": 0.5} and s["methods"][1]["params"]["r"] == 3


def test_visualize_errors(cli, stand_in, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    base = ["visualize", "default", "--data-dir", str(stand_in), "--out", str(tmp_path / "x.png")]
    for args, msg in [
        (["-m", "topk", "--images", str(tmp_path / "missing.png")], "does not exist"),
        (["-m", "topk", "--images", str(bad)], "cannot read image"),
        (["-m", "tomee"], "unknown method 'tomee'"),
        (["--compare", "topk,bogus"], "unknown method 'bogus'"),
        ([], "give --method"),
        (["-m", "topk", "--flops", "1.5"], "--flops is a fraction"),
        (["-m", "topk", "--flops", "0.5", "--set", "keep_rate=0.5"], "not both"),
        (["--compare", "topk", "--flops", "1.5"], "--flops is a fraction"),
        (["--compare", "topk", "--set", "r=3"], "none of the compared methods"),
        (["-m", "topk", "--set", "keep_rate=2"], "out of range"),
        (["-m", "topk", "--n", "0"], "--n must be positive"),
        (["-m", "topk", "--index", "99"], "out of range"),
        (["-m", "topk", "--stages", "99"], "no reduction in blocks"),
        (["-m", "topk", "--out", str(tmp_path / "x.gif")], "--out must end"),
        (["-m", "topk", "--checkpoint", str(tmp_path / "none.pt")], "does not exist"),
    ]:
        code, stdout, err = cli(*base, *args)
        assert code == 2 and msg in err, (args, err)
        assert len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- what the modules may know

VISUAL_MODULES = ["visual.sheets", "visual.trace", "visual.inputs", "visual.draw", "visual.budget", "cli.visualize",
                  "analysis.trace", "analysis.settings", "analysis.tables", "analysis.analyze"]
# (the analysis tables write LaTeX column specs such as "r": only their attribute reads are checked)
NAME_CHECKED = set(VISUAL_MODULES) - {"analysis.tables"}
VIT_ATTRIBUTES = {"blocks", "embed_dim", "patch_embed", "num_prefix_tokens", "num_patches", "grid_size",
                  "pretrained_cfg", "cls_token", "pos_embed", "_model_input"}
GEOMETRY_MARK = "# backbone geometry"


def _marked_functions(tree, lines):
    """The top-level functions right under the geometry mark."""
    return [n for n in tree.body if isinstance(n, ast.FunctionDef)
            and lines[min([n.lineno] + [d.lineno for d in n.decorator_list]) - 2].strip() == GEOMETRY_MARK]


@pytest.mark.parametrize("module", VISUAL_MODULES)
def test_visualisation_reads_no_model_attribute_and_names_no_method(module):
    """Model attributes are read only in the marked geometry functions; no method name or
    method parameter name appears as a string in code (docstrings and comments may explain)."""
    import importlib
    import inspect

    src = inspect.getsource(importlib.import_module(f"tokenbench.{module}"))
    tree, lines = ast.parse(src), src.splitlines()
    allowed = {id(n) for f in _marked_functions(tree, lines) for n in ast.walk(f)}
    reads = [(n.lineno, getattr(n, "attr", None) or getattr(n, "name", None))
             for n in ast.walk(tree) if id(n) not in allowed
             and ((isinstance(n, ast.Attribute) and n.attr in VIT_ATTRIBUTES)
                  or (isinstance(n, ast.alias) and n.name in VIT_ATTRIBUTES))]
    assert not reads, f"{module} reads model attributes outside the marked geometry functions: {reads}"
    if module not in NAME_CHECKED:
        return
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    known = {m["name"] for m in list_methods() if get_method(m["name"]).family != "none"}
    # every parameter name but the seed's ("seed" is also the key of a data subset's seed)
    known |= {p.name for m in list_methods() for p in get_method(m["name"]).params
              if p.name != get_method(m["name"]).seed_param}
    named = [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and id(n) not in docstrings
             and isinstance(n.value, str) and n.value in known]
    assert not named, f"{module} names methods or their parameters: {named}"


def test_drawing_runs_no_model():
    """Data flows one way: visual.draw draws traces and images, and imports nothing that loads or runs a model."""
    import inspect

    from tokenbench.visual import draw as visual_draw

    tree = ast.parse(inspect.getsource(visual_draw))
    imported = {(n.module or "").lstrip(".") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not imported & {"api", "vit", "registry", "models", "data", "torch.nn", "timm"}, imported
    assert not names & {"trace", "run_with_sources", "token_geometry", "input_config", "load"}, names
