"""Evaluation data: eval on image folders, silent semantics refused or warned, `random`
independent of the evaluation batch."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenbench.backbones import image_ids, surgery_of
from tokenbench import checks, registry
from tokenbench.measure import accuracy
from tokenbench.errors import UserError

from conftest import peak_weights, register_tiny_timm, tiny_vit  # noqa: E402

TINY = register_tiny_timm("tiny_vit_eval_data")                     # 32 px, patch 4, RGB, 10 classes
TINY_1000 = register_tiny_timm("tiny_vit_eval_data_1000", num_classes=1000)
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _images(d: Path, n: int, c: int, mode: str = "RGB") -> None:
    from PIL import Image

    rng = np.random.default_rng(c * 100 + n)
    d.mkdir(parents=True)
    for i in range(n):
        a = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(a).convert(mode).save(d / f"{i}.png")


def _tree(root: Path, per_split: dict, classes: int = 10, mode: str = "RGB") -> Path:
    """``root/<split>/c<k>/`` with ``per_split[split]`` images per class; split "" is the flat layout."""
    for split, n in per_split.items():
        for c in range(classes):
            _images(root / split / f"c{c}" if split else root / f"c{c}", n, c, mode)
    return root


def _eval(cli, *args):
    code, out, err = cli("eval", *args, "--device", "cpu", "--json")
    return code, (json.loads(out) if code == 0 else None), err


def _one_line_error(code, err, *words):
    assert code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    for w in words:
        assert w in err, err


# --------------------------------------------------------------------------- eval on folders

def test_folder_split_honoured(cli, tmp_path):
    root = _tree(tmp_path / "d", {"train": 3, "val": 2})
    code, pub, err = _eval(cli, TINY, "--data", "folder", "--data-dir", str(root))
    assert code == 0, err
    assert pub["n"] == 20 and pub["data"]["layout"] == "split"          # val/ by default
    assert pub["data"]["source"] == str(root / "val")
    code, pub, err = _eval(cli, TINY, "--data", "folder", "--data-dir", str(root), "--split", "train")
    assert code == 0, err
    assert pub["n"] == 30 and pub["data"]["source"] == str(root / "train")
    code, out, err = cli("eval", TINY, "--data", "folder", "--data-dir", str(root), "--device", "cpu")
    assert code == 0 and f"{root / 'val'} (split val)" in out, (out, err)


def test_flat_folder_keeps_working(cli, tmp_path):
    root = _tree(tmp_path / "flat", {"": 2})
    code, pub, err = _eval(cli, TINY, "--data", "folder", "--data-dir", str(root))
    assert code == 0, err
    assert pub["n"] == 20 and pub["data"]["layout"] == "flat" and pub["data"]["source"] == str(root)


def test_flat_folder_with_a_class_named_train_stays_flat(tmp_path):
    from tokenbench.data import folder_split

    root = _tree(tmp_path / "flat", {"": 1}, classes=2)
    _images(root / "train", 1, 0)  # a class called "train", holding images, not class folders
    assert folder_split("folder", "val", root) == (root, "flat")


def test_class_count_checked_against_the_head(cli, tmp_path):
    root = _tree(tmp_path / "d", {"val": 1}, classes=3)
    code, _, err = _eval(cli, TINY, "--data", "folder", "--data-dir", str(root))
    _one_line_error(code, err, "10 outputs", "3 classes")


def test_one_channel_model_on_rgb_folder(cli, tmp_path, tiny_default):
    root = _tree(tmp_path / "rgb", {"val": 1})
    code, pub, err = _eval(cli, "default", "--data", "folder", "--data-dir", str(root))
    assert code == 0, err
    assert pub["n"] == 10


def test_rgb_model_on_grayscale_folder(cli, tmp_path):
    root = _tree(tmp_path / "gray", {"val": 1}, mode="L")
    code, pub, err = _eval(cli, TINY, "--data", "folder", "--data-dir", str(root))
    assert code == 0, err
    assert pub["n"] == 10


def test_empty_or_missing_split_one_line(cli, tmp_path):
    root = _tree(tmp_path / "noval", {"train": 1})
    code, _, err = _eval(cli, TINY, "--data", "folder", "--data-dir", str(root))
    _one_line_error(code, err, "no val/ split", "--split train")
    (root / "val").mkdir()  # empty val/
    code, _, err = _eval(cli, TINY, "--data", "folder", "--data-dir", str(root), "--split", "val")
    _one_line_error(code, err, "no class sub-folders")
    for c in range(10):  # class folders, no images
        (root / "val" / f"c{c}").mkdir()
    code, _, err = _eval(cli, TINY, "--data", "folder", "--data-dir", str(root))
    _one_line_error(code, err, "holds no images")


# --------------------------------------------------------------------------- silent semantics

def test_untrained_predictors_warned_and_recorded(cli, tmp_path):
    res = tmp_path / "res"
    code, pub, err = _eval(cli, TINY, "--method", "dynamicvit", "--data", "synthetic", "--limit", "8",
                           "--results", str(res))
    assert code == 0, err
    assert any("untrained" in w for w in pub["warnings"])
    assert "warning: dynamicvit's learned parts are untrained" in err
    rec = json.loads(next((res / "records").rglob("*.json")).read_text())
    assert any("untrained" in w for w in rec["metrics"]["warnings"])


def _trained_run(run: Path, method: str, params: dict) -> Path:
    from tokenbench.api import load

    net, _ = load(TINY, method, params)
    run.mkdir()
    torch.save(net.state_dict(), run / "model.pt")
    (run / "config.json").write_text(json.dumps({"model": TINY, "method": method, "params": params}))
    return run / "model.pt"


def test_checkpoint_params_compared_with_training(cli, tmp_path):
    ckpt = _trained_run(tmp_path / "run", "topk", {"keep_rate": 0.7})
    base = (TINY, "--method", "topk", "--data", "synthetic", "--limit", "8", "--checkpoint", str(ckpt))
    code, pub, err = _eval(cli, *base, "--set", "keep_rate=0.5")
    assert code == 0, err
    assert pub["warnings"] == ["the checkpoint was trained with topk at keep_rate=0.7, measured here at keep_rate=0.5"]
    assert "warning: the checkpoint was trained with topk at keep_rate=0.7" in err
    code, pub, err = _eval(cli, *base, "--set", "keep_rate=0.7")
    assert code == 0 and pub["warnings"] == [], err


def test_flops_of_a_checkpoint_at_other_params_warns(cli, tmp_path):
    ckpt = _trained_run(tmp_path / "run", "topk", {"keep_rate": 0.7})
    base = ("flops", TINY, "--method", "topk", "--checkpoint", str(ckpt), "--results", str(tmp_path / "res"))
    code, out, err = cli(*base, "--set", "keep_rate=0.5", "--json")
    assert code == 0, err
    assert "warning: the checkpoint was trained with topk at keep_rate=0.7, measured here at keep_rate=0.5" in err
    assert json.loads(out)["warnings"] == ["the checkpoint was trained with topk at keep_rate=0.7, measured here at keep_rate=0.5"]
    code, out, err = cli(*base, "--set", "keep_rate=0.7", "--json")
    assert code == 0 and "warning" not in err, err


def test_trained_params_warning_is_generic():
    run = {"method": "m", "params": {"a": 1, "b": [2, 3], "c": "x"}}
    assert checks.trained_params_warnings("m", {"a": 1, "b": [2, 3], "c": "x"}, run) == []
    assert checks.trained_params_warnings("other", {"a": 2}, run) == []
    assert checks.trained_params_warnings("m", {"a": 2, "b": [2, 4], "c": "x"}, run) == [
        "the checkpoint was trained with m at a=1, b=[2, 3], measured here at a=2, b=[2, 4]"]


@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Fashion-MNIST")
def test_random_init_head_mismatch_refused_and_chance_level_warned(cli):
    code, _, err = _eval(cli, TINY_1000, "--data", "fashion-mnist", "--limit", "20")
    _one_line_error(code, err, "1000 outputs", "10 classes")
    code, pub, err = _eval(cli, TINY, "--data", "fashion-mnist", "--limit", "20")
    assert code == 0, err
    assert any(w.startswith("random-init weights") for w in pub["warnings"])


@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Fashion-MNIST")
def test_limit_above_the_set_refused(cli, tmp_path):
    code, _, err = _eval(cli, TINY, "--data", "fashion-mnist", "--limit", "20000", "--results", str(tmp_path))
    _one_line_error(code, err, "--limit 20000", "10000 images")
    assert not list(tmp_path.rglob("*.json"))


def test_limit_above_a_folder_refused(cli, tmp_path):
    root = _tree(tmp_path / "d", {"val": 1})
    code, _, err = _eval(cli, TINY, "--data", "folder", "--data-dir", str(root), "--limit", "11")
    _one_line_error(code, err, "--limit 11", "10 images")


def test_img_size_not_a_multiple_of_the_patch_refused(cli):
    code, _, err = cli("flops", TINY, "--img-size", "34")
    _one_line_error(code, err, "--img-size 34", "patch size 4", "use 32 or 36")
    code, out, err = cli("flops", TINY, "--img-size", "36", "--json")
    assert code == 0 and json.loads(out)["img_size"] == 36, err


def test_img_size_on_default_refused(cli, tiny_default):
    code, _, err = cli("flops", "default", "--img-size", "56")
    _one_line_error(code, err, "default takes 28 px input only")


@pytest.mark.parametrize("cmd", [("flops", TINY), ("eval", TINY, "--data", "synthetic"), ("train", TINY),
                                 ("visualize", TINY)])
def test_set_key_twice_refused(cli, cmd):
    code, _, err = cli(*cmd, "--method", "topk", "--set", "keep_rate=0.5", "--set", "keep_rate=0.6")
    _one_line_error(code, err, "--set keep_rate is given twice")


def test_run_still_builds_a_grid_from_a_repeated_set(cli, tmp_path):
    code, out, err = cli("run", "--model", TINY, "-m", "topk", "--set", "keep_rate=0.5", "--set", "keep_rate=0.6",
                         "--measure", "flops", "--out", str(tmp_path / "o"), "--no-plots", "--json")
    assert code == 0, err
    rows = [r for r in json.loads(out)["rows"] if r["method"] == "topk"]
    assert sorted(r["params"]["keep_rate"] for r in rows) == [0.5, 0.6]


def test_min_run_time_must_be_positive(cli):
    code, _, err = cli("throughput", TINY, "--min-run-time", "-1", "--device", "cpu")
    _one_line_error(code, err, "--min-run-time must be positive")


# --------------------------------------------------------------------------- random and the batch

class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_random_predictions_do_not_depend_on_the_eval_batch():
    m = registry.apply(peak_weights(tiny_vit()), "random", keep_rate=0.5, seed=0)
    ds = _Images(40)
    by_batch = [accuracy.evaluate(m, ds, batch_size=b, device="cpu")["predictions"] for b in (7, 16)]
    assert by_batch[0] == by_batch[1]
    other = registry.apply(peak_weights(tiny_vit()), "random", keep_rate=0.5, seed=1)
    assert accuracy.evaluate(other, ds, batch_size=16, device="cpu")["predictions"] != by_batch[0]  # the test has power


def test_random_logits_follow_the_image_not_the_batch():
    m = registry.apply(peak_weights(tiny_vit()), "random", keep_rate=0.5, seed=4)
    x = _Images(23).x
    with torch.no_grad():
        parts = []
        for bs in (7, 16):
            out = []
            for i in range(0, len(x), bs):
                with image_ids(m, torch.arange(i, min(i + bs, len(x)))):
                    out.append(m(x[i:i + bs]))
            parts.append(torch.cat(out))
        assert torch.allclose(parts[0], parts[1], atol=1e-5)
        alone = m(x[9:10])  # outside the block: image 9 is id 0 here, another draw
        assert not torch.allclose(alone, parts[0][9:10], atol=1e-5)
        with image_ids(m, torch.tensor([9])):
            assert torch.allclose(m(x[9:10]), parts[0][9:10], atol=1e-5)
    assert surgery_of(m).image_ids is None  # the block leaves nothing behind


def test_random_scores_compile_without_graph_breaks():
    registry.load_methods()
    import sys

    rnd = sys.modules["tokenbench.methods.random"]
    key = rnd.stage_key(0, 1)
    fn = torch.compile(lambda ids: rnd.token_scores(key, ids, 49), fullgraph=True, backend="eager")
    ids = torch.arange(5, 12)
    assert torch.equal(fn(ids), rnd.token_scores(key, ids, 49))


def test_a_val_figure_of_weights_trained_on_all_the_train_images_says_it_is_not_held_out(tmp_path):
    from tokenbench import checks

    run = tmp_path / "run"
    run.mkdir()
    spec = {"model": "m", "checkpoint": str(run / "model.pt")}
    for steps, warned in ((468, True), (429, False)):       # batch 128: all 60,000, or the 55,000 outside val
        (run / "config.json").write_text(json.dumps({"data": "fashion-mnist", "steps_per_epoch": steps,
                                                     "train": {"batch_size": 128}}))
        said = checks.held_out_warnings(spec, "fashion-mnist", "val")
        assert bool(said) == warned and (not said or "this val figure is not held out" in said[0])
        assert checks.held_out_warnings(spec, "fashion-mnist", "test") == []
