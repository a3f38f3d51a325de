"""Reliability: bad input, interrupted, concurrent and damaged runs, misleading results, and a
property test of every registered method.

Bad input must give one line on stderr naming the problem, exit code 2, no traceback
(unless ``--debug``), and leave the results directory exactly as it was.
"""

import functools
import gzip
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tokenbench.errors import UserError

from conftest import register_tiny_timm  # noqa: E402
from tokenbench.backbones import last_state

TINY = "tb_rel_tiny_vit"          # in-process only: 32 px, patch 4 (64 patches + class token), width 32
GAP = "vit_medium_patch16_gap_256"  # a real timm ViT without a class token (global average pooling)
SUB_MODEL = "deit_tiny_patch16_224"  # a real timm name for subprocesses (with img_size = 32: 4 patches)


register_tiny_timm(TINY)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# --------------------------------------------------------------------------- helpers

def snapshot(d: Path) -> dict:
    """Every path under ``d`` with its contents (None for directories)."""
    if not d.exists():
        return {}
    return {str(p.relative_to(d)): (None if p.is_dir() else p.read_bytes()) for p in sorted(d.rglob("*"))}


def assert_refused(cli, results: Path, *args, match: str | tuple = ()):
    """``args`` exit with code 2 and one line naming the problem; ``results`` is unchanged."""
    before = snapshot(results)
    code, out, err = cli(*args)
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err + out
    for m in ([match] if isinstance(match, str) else match):
        assert m in lines[0], (m, lines[0])
    assert snapshot(results) == before, "the results directory changed"
    return lines[0]


@pytest.fixture(scope="module")
def _seeded_results(tmp_path_factory):
    """A results directory already holding one genuine record (so 'unchanged' means something)."""
    from tokenbench.runner import Settings, measure_run, spec_dict
    from tokenbench.store import Store

    d = tmp_path_factory.mktemp("seeded") / "res"
    measure_run("flops", spec_dict(TINY, "none", {}, False, None, None), Settings(), Store(d))
    assert len(list((d / "records").glob("*.json"))) == 1
    return d


@pytest.fixture
def results(_seeded_results, tmp_path):
    d = tmp_path / "res"
    shutil.copytree(_seeded_results, d)
    return d


def idx_bytes(shape, data: bytes, magic=(0, 0, 8)) -> bytes:
    return bytes(magic) + bytes([len(shape)]) + struct.pack(">" + "I" * len(shape), *shape) + data


def fake_fashion_mnist(d: Path, n: int = 20) -> Path:
    """The four Fashion-MNIST idx files (gzipped) with ``n`` blank images per split."""
    d.mkdir(parents=True, exist_ok=True)
    imgs = idx_bytes((n, 28, 28), bytes(n * 28 * 28))
    lbls = idx_bytes((n,), bytes(i % 10 for i in range(n)))
    for split in ("train", "t10k"):
        (d / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(imgs))
        (d / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(lbls))
    return d


def tiny_state_dict(**kw):
    import timm

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=4, embed_dim=32, depth=12, num_heads=2, num_classes=10)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args).state_dict()


# --------------------------------------------------------------------------- names

def test_unknown_model_suggests_close_names(cli, results):
    assert_refused(cli, results, "flops", "vit_tiny_patc16_224", "--results", str(results),
                   match=("unknown model 'vit_tiny_patc16_224'", "did you mean", "'vit_tiny_patch16_224'"))


def test_unknown_method_suggests(cli, results):
    assert_refused(cli, results, "flops", TINY, "-m", "tomee", "--results", str(results),
                   match=("unknown method 'tomee'", "did you mean 'tome'"))


def test_unknown_parameter_suggests(cli, results):
    assert_refused(cli, results, "flops", TINY, "-m", "tome", "-s", "rr=4", "--results", str(results),
                   match=("tome: unknown parameter 'rr'", "did you mean 'r'"))
    assert_refused(cli, results, "flops", TINY, "-m", "topk", "-s", "keep_rte=0.5", "--results", str(results),
                   match="did you mean 'keep_rate'")


# --------------------------------------------------------------------------- types and ranges

@pytest.mark.parametrize("value", ["0", "1.5", "-1", "nan", "true", "abc"])
def test_keep_rate_out_of_range_or_wrong_type(cli, results, value):
    line = assert_refused(cli, results, "flops", TINY, "-m", "topk", "-s", f"keep_rate={value}",
                          "--results", str(results), match="topk: keep_rate")
    assert "out of range (0, 1]" in line or "must be a float" in line


@pytest.mark.parametrize("value, match", [
    ("-1", "r=-1 is out of range [0, inf]"),
    ('[1,"a"]', "r must be an integer or a list of integers"),
    ("[1,-2]", "r=-2 is out of range"),
    ("1.5", "r must be an integer"),
    ("[" + ",".join(["1"] * 13) + "]", "r has 13 entries but the model has 12 blocks"),
])
def test_tome_r_refused(cli, results, value, match):
    assert_refused(cli, results, "flops", TINY, "-m", "tome", "-s", f"r={value}", "--results", str(results),
                   match=match)


def test_tome_r_larger_than_the_tokens_is_clipped_like_the_official(cli, tmp_path):
    """ToMe merges at most half the tokens per block: any r beyond that is accepted and clipped."""
    from tokenbench.registry import get_method

    toks = {}
    for r in ("32", "1000000", "[1000000]"):
        code, out, err = cli("flops", TINY, "-m", "tome", "-s", f"r={r}", "--json")
        assert code == 0, err
        toks[r] = json.loads(out)["tokens"]
    assert toks["32"] == toks["1000000"]
    # 65 tokens: 33 after the first block's merge, then halving down to the class token + 1
    assert toks["1000000"][:3] == [65, 33, 17] and toks["1000000"][-1] == 2
    assert toks["[1000000]"] == [65] + [33] * 11
    from tokenbench.api import load

    net, _ = load(TINY, "tome", {"r": 10**6})
    exp = get_method("tome")().expected_tokens(net, r=10**6)
    assert exp[0] == toks["1000000"]


@pytest.mark.parametrize("args, match", [
    (["--img-size", "0"], "--img-size must be positive, got 0"),
    (["--img-size", "-3"], "--img-size must be positive"),
    (["--img-size", "2"], "smaller than tb_rel_tiny_vit's patch size 4"),
    (["--set", "r"], "--set expects KEY=VALUE, got 'r'"),
    (["--set", "=4"], "--set expects KEY=VALUE"),
])
def test_flops_flags_refused(cli, results, args, match):
    assert_refused(cli, results, "flops", TINY, "-m", "tome", *args, "--results", str(results), match=match)


@pytest.mark.parametrize("args, match", [
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--batch-size", "-4"], "--batch-size must be positive"),
    (["--batch-size", "x"], "--batch-size takes an integer"),
    (["--precision", "fp64"], "unknown precision 'fp64'"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_throughput_flags_refused(cli, results, args, match):
    assert_refused(cli, results, "throughput", TINY, "--min-run-time", "0.01", *args, "--results", str(results),
                   match=match)


@pytest.mark.parametrize("args, match", [
    (["--limit", "0"], "--limit must be positive, got 0"),
    (["--limit", "-5"], "--limit must be positive, got -5"),
    (["--split", "tset"], "unknown split 'tset' (did you mean 'test'?)"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--batch-size", "0"], "--batch-size must be positive"),
])
def test_eval_flags_refused(cli, results, args, match):
    assert_refused(cli, results, "eval", TINY, "--data", "synthetic", *args, "--results", str(results),
                   match=match)


def test_unknown_dataset_suggests(cli, results):
    assert_refused(cli, results, "eval", TINY, "--data", "fashion-mnst", "--results", str(results),
                   match=("unknown dataset 'fashion-mnst'", "did you mean 'fashion-mnist'"))


# --------------------------------------------------------------------------- models a method cannot handle

def test_convnet_refused(cli, results):
    assert_refused(cli, results, "flops", "resnet18", "-m", "tome", "--results", str(results),
                   match=("tome applies to timm VisionTransformer models", "ResNet is not one"))
    assert_refused(cli, results, "flops", "resnet18", "--results", str(results),
                   match="ResNet is not one")
    assert_refused(cli, results, "flops", "resnet18", "--img-size", "32", "--results", str(results),
                   match="resnet18 takes no --img-size")


def _class_token_methods():
    from tokenbench.registry import list_methods

    return [m["name"] for m in list_methods() if m["needs_class_token"]]


@pytest.mark.parametrize("method", _class_token_methods())
def test_method_needing_a_class_token_refuses_a_gap_vit(cli, results, method):
    import timm

    assert timm.create_model(GAP, img_size=32).cls_token is None
    assert_refused(cli, results, "flops", GAP, "--img-size", "32", "-m", method, "--results", str(results),
                   match=f"{method} needs a class token; this model has none")


def test_tome_runs_on_a_gap_vit(cli):
    code, out, err = cli("flops", GAP, "--img-size", "32", "-m", "tome", "-s", "r=1", "--json")
    assert code == 0, err
    assert json.loads(out)["tokens"][:3] == [4, 3, 2]


# --------------------------------------------------------------------------- data

@pytest.mark.parametrize("case", ["missing", "a_file", "empty", "wrong_layout", "truncated_gz", "wrong_magic",
                                  "short_data", "bad_labels", "broken_link"])
def test_bad_fashion_mnist_dir(cli, results, tmp_path, case):
    d = tmp_path / "data"
    expect = {
        "missing": "data directory {d} does not exist",
        "a_file": "data directory {d} is not a directory",
        "empty": "{d} does not hold Fashion-MNIST: missing train-images-idx3-ubyte.gz",
        "wrong_layout": "{d} does not hold Fashion-MNIST: missing",
        "truncated_gz": "cannot read {d}/t10k-images-idx3-ubyte.gz",
        "wrong_magic": "{d}/t10k-images-idx3-ubyte.gz is not a uint8 idx file (bad magic number)",
        "short_data": "{d}/t10k-images-idx3-ubyte.gz is truncated or corrupt",
        "bad_labels": "{d}/t10k-labels-idx1-ubyte.gz: label 200 out of range",
        "broken_link": "{d} does not hold Fashion-MNIST: missing t10k-images-idx3-ubyte.gz",
    }[case]
    if case == "a_file":
        d.write_text("not a directory")
    elif case == "empty":
        d.mkdir()
    elif case == "wrong_layout":
        (d / "images" / "0").mkdir(parents=True)
        (d / "images" / "0" / "a.png").write_bytes(b"")
    elif case != "missing":
        fake_fashion_mnist(d)
        img = d / "t10k-images-idx3-ubyte.gz"
        if case == "truncated_gz":
            raw = img.read_bytes()
            img.write_bytes(raw[: len(raw) // 2])
        elif case == "wrong_magic":
            img.write_bytes(gzip.compress(idx_bytes((20, 28, 28), bytes(20 * 28 * 28), magic=(0x12, 0x34, 8))))
        elif case == "short_data":
            img.write_bytes(gzip.compress(idx_bytes((20, 28, 28), bytes(100))))
        elif case == "bad_labels":
            (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes((20,), bytes([200] * 20))))
        elif case == "broken_link":
            img.unlink()
            img.symlink_to(tmp_path / "nowhere.gz")
    assert_refused(cli, results, "eval", TINY, "--data", "fashion-mnist", "--data-dir", str(d), "--limit", "10",
                   "--results", str(results), match=expect.format(d=d))


@pytest.mark.skipif(IS_ROOT, reason="running as root: directory permissions do not stop root from reading")
def test_unreadable_data_dir(cli, results, tmp_path):
    d = fake_fashion_mnist(tmp_path / "data")
    d.chmod(0)
    try:
        assert_refused(cli, results, "eval", TINY, "--data", "fashion-mnist", "--data-dir", str(d),
                       "--results", str(results), match=(str(d), "is not readable"))
    finally:
        d.chmod(0o755)


def test_good_fake_fashion_mnist_is_accepted(cli, tmp_path):
    """The fixture data is valid: the refusals above are about the damage, not the fixture."""
    d = fake_fashion_mnist(tmp_path / "data")
    code, out, err = cli("eval", TINY, "--data", "fashion-mnist", "--data-dir", str(d), "--json")
    assert code == 0, err
    assert json.loads(out)["n"] == 20


# --------------------------------------------------------------------------- checkpoints

def test_checkpoint_missing(cli, results, tmp_path):
    assert_refused(cli, results, "flops", TINY, "-c", str(tmp_path / "nope.pt"), "--results", str(results),
                   match=f"checkpoint {tmp_path / 'nope.pt'} does not exist")


def test_checkpoint_truncated_or_not_a_checkpoint(cli, results, tmp_path):
    good = tmp_path / "good.pt"
    torch.save(tiny_state_dict(), good)
    code, out, err = cli("flops", TINY, "-c", str(good), "--json")
    assert code == 0, err  # the whole file loads
    half = tmp_path / "half.pt"
    raw = good.read_bytes()
    half.write_bytes(raw[: len(raw) // 2])
    assert_refused(cli, results, "eval", TINY, "--data", "synthetic", "--limit", "4", "-c", str(half),
                   "--results", str(results), match=(f"cannot read checkpoint {half}", "truncated"))
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    assert_refused(cli, results, "flops", TINY, "-c", str(text), "--results", str(results),
                   match=f"cannot read checkpoint {text}")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert_refused(cli, results, "flops", TINY, "-c", str(empty), "--results", str(results),
                   match="the file is empty")
    nodict = tmp_path / "list.pt"
    torch.save([1, 2, 3], nodict)
    assert_refused(cli, results, "flops", TINY, "-c", str(nodict), "--results", str(results),
                   match="holds no state dict of tensors")


def test_checkpoint_of_another_architecture_names_the_keys(cli, results, tmp_path):
    import timm

    cnn = tmp_path / "resnet.pt"
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), cnn)
    line = assert_refused(cli, results, "flops", TINY, "-c", str(cnn), "--results", str(results),
                          match=(f"checkpoint {cnn} does not fit VisionTransformer", "missing: cls_token",
                                 "unexpected: conv1.weight"))
    wide = tmp_path / "wide.pt"
    torch.save(tiny_state_dict(embed_dim=64), wide)
    assert_refused(cli, results, "flops", TINY, "-c", str(wide), "--results", str(results),
                   match=("shape mismatch:", "cls_token (1, 1, 64) vs (1, 1, 32)"))
    shallow = tmp_path / "shallow.pt"
    torch.save(tiny_state_dict(depth=6), shallow)
    assert_refused(cli, results, "flops", TINY, "-c", str(shallow), "--results", str(results),
                   match=("missing: blocks.6."))


# --------------------------------------------------------------------------- output directory

def test_results_below_a_file_refused(cli, tmp_path):
    f = tmp_path / "plain.txt"
    f.write_text("x")
    before = snapshot(tmp_path)
    code, out, err = cli("flops", TINY, "--results", str(f / "sub"))
    assert code == 2 and err.strip().count("\n") == 0 and "Traceback" not in err
    assert f"cannot create results directory {f / 'sub' / 'records'}: {f} is not a directory" in err
    code, out, err = cli("run", "--model", TINY, "-m", "tome", "--measure", "flops", "--out", str(f / "o"),
                         "--no-plots")
    assert code == 2 and "is not a directory" in err and err.strip().count("\n") == 0
    assert snapshot(tmp_path) == before


def test_a_file_on_the_way_of_an_output_is_named(tmp_path):
    from tokenbench.errors import cannot_write

    f = tmp_path / "plain.txt"
    f.write_text("x")
    with pytest.raises(OSError) as e:
        (f / "x.png").parent.mkdir(parents=True, exist_ok=True)       # the system says 'File exists'
    assert cannot_write(f / "x.png", e.value) == f"cannot write {f / 'x.png'}: {f} is a file, not a directory"


def test_results_dir_is_created_only_when_a_record_is_written(cli, tmp_path):
    d = tmp_path / "new" / "res"
    code, out, err = cli("flops", TINY, "-m", "tome", "-s", "r=-1", "--results", str(d))
    assert code == 2 and not (tmp_path / "new").exists()
    code, out, err = cli("flops", TINY, "--results", str(d), "--json")
    assert code == 0, err
    assert len(list((d / "records").glob("*.json"))) == 1


@pytest.mark.skipif(IS_ROOT, reason="running as root: chmod 555 does not stop root from writing "
                                    "(os.access reports the directory writable, correctly)")
def test_unwritable_results_dir(cli, results):
    os.chmod(results / "records", 0o555)
    try:
        assert_refused(cli, results, "flops", TINY, "-m", "tome", "--results", str(results),
                       match="is not writable")
        os.chmod(results, 0o555)
        assert_refused(cli, results, "run", "--model", TINY, "-m", "tome", "--measure", "flops", "--out",
                       str(results / "sub"), "--no-plots", match="is not writable")
    finally:
        os.chmod(results, 0o755)
        os.chmod(results / "records", 0o755)


def _deny(monkeypatch, denied: Path, bits: int):
    """Emulate a non-root user's permission check on ``denied`` (root passes every os.access)."""
    real = os.access

    def access(path, mode, *a, **k):
        if Path(path) == denied and mode & bits:
            return False
        return real(path, mode, *a, **k)

    monkeypatch.setattr(os, "access", access)


def test_unwritable_results_dir_as_any_user(cli, results, monkeypatch):
    """The same refusals with the permission check emulated, so they are tested when running as root too."""
    _deny(monkeypatch, results / "records", os.W_OK)
    assert_refused(cli, results, "flops", TINY, "-m", "tome", "--results", str(results),
                   match=f"results directory {results / 'records'} is not writable")
    _deny(monkeypatch, results, os.W_OK)
    assert_refused(cli, results, "run", "--model", TINY, "-m", "tome", "--measure", "flops", "--out",
                   str(results / "sub"), "--no-plots",
                   match=f"results directory {results / 'sub' / 'records'} cannot be created ({results} is not "
                         "writable)")


def test_unreadable_data_dir_as_any_user(cli, results, tmp_path, monkeypatch):
    d = fake_fashion_mnist(tmp_path / "data")
    _deny(monkeypatch, d, os.R_OK)
    assert_refused(cli, results, "eval", TINY, "--data", "fashion-mnist", "--data-dir", str(d),
                   "--results", str(results), match=(str(d), "is not readable"))


# --------------------------------------------------------------------------- devices and memory

@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("cmd", [["throughput", TINY], ["eval", TINY, "--data", "synthetic"],
                                 ["run", "--model", TINY, "-m", "tome", "--measure", "flops,throughput"]])
def test_cuda_without_cuda(cli, results, cmd):
    extra = ["--out", str(results / "sweep"), "--no-plots"] if cmd[0] == "run" else ["--results", str(results)]
    assert_refused(cli, results, *cmd, "--device", "cuda", *extra,
                   match="--device cuda requested but CUDA is not available on this machine")


def test_batch_that_cannot_fit_is_refused_with_a_size_that_fits(cli, results, monkeypatch):
    from tokenbench.measure import memory

    line = assert_refused(cli, results, "throughput", TINY, "--batch-size", "100000000", "--results", str(results),
                          match=("batch size 100000000 needs about", "try --batch-size"))
    # the suggestion fits (free memory held fixed: background jobs change it from one moment to the next)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 64 * 2**20)
    line = assert_refused(cli, results, "throughput", TINY, "--batch-size", "100000000", "--results", str(results),
                          match=("batch size 100000000 needs about", "try --batch-size"))
    fit = int(line.rsplit(" ", 1)[1])
    from tokenbench.api import load

    net, _ = load(TINY)
    memory.check_batch_fits(net, fit, torch.device("cpu"))
    with pytest.raises(UserError):
        memory.check_batch_fits(net, fit * 4, torch.device("cpu"))


def test_eval_batch_is_checked_against_memory(cli, results, monkeypatch):
    """Evaluation checks the largest batch it will really make (the batch size, or the whole set if smaller)."""
    from tokenbench.measure import memory

    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 8 * 2**20)
    line = assert_refused(cli, results, "eval", TINY, "--data", "synthetic", "--limit", "64", "--batch-size",
                          "100000000", "--results", str(results),
                          match=("batch size 64 needs about", "try --batch-size"))
    fit = int(line.rsplit(" ", 1)[1])
    assert 1 <= fit < 64
    code, out, err = cli("eval", TINY, "--data", "synthetic", "--limit", "64", "--batch-size", str(fit), "--json")
    assert code == 0, err
    # a huge batch on a set that fits is harmless
    code, out, err = cli("eval", TINY, "--data", "synthetic", "--limit", str(fit), "--batch-size", "100000000",
                         "--json")
    assert code == 0, err


def test_sweep_batches_are_checked_before_anything_is_written(cli, tmp_path, monkeypatch):
    out = tmp_path / "o"
    code, _, err = cli("run", "--model", TINY, "-m", "tome", "--measure", "flops,throughput", "--batch-size",
                       "100000000", "--out", str(out), "--no-plots")
    assert code == 2 and "throughput batch size 100000000 needs about" in err and err.count("\n") == 1
    assert not out.exists()
    from tokenbench.measure import memory

    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 8 * 2**20)
    code, _, err = cli("run", "--model", TINY, "-m", "tome", "--data", "synthetic", "--limit", "64",
                       "--measure", "flops,accuracy", "--eval-batch-size", "100000000", "--out", str(out),
                       "--no-plots")
    assert code == 2 and "evaluation batch size 64 needs about" in err and "try --eval-batch-size" in err
    assert not out.exists()


# --------------------------------------------------------------------------- sweep files

BASE = f"""
name = "bad"
models = ["{TINY}"]
measure = ["flops", "accuracy"]
device = "cpu"
"""
DATA = """
[data]
name = "synthetic"
limit = 8
"""


@pytest.mark.parametrize("text, match", [
    (BASE + DATA + "[methods.tome\n", "invalid TOML: Expected ']'"),
    (BASE + "colour = 3\n" + DATA + "[methods.tome]\n", "unknown key 'colour' in the sweep"),
    (BASE + DATA + "[methods.tome]\nrr = 3\n", "unknown key 'rr' in [methods.tome]"),
    (BASE + DATA + "[methods.tome]\nr = []\n", "[methods.tome] r is an empty grid"),
    (BASE + DATA, "no methods"),
    (BASE + DATA + "[methods]\n", "no methods"),
    (BASE.replace(TINY, "vit_tiny_patc16_224") + DATA + "[methods.tome]\n",
     "unknown model 'vit_tiny_patc16_224' (did you mean"),
    (BASE.replace(f'["{TINY}"]', "[]") + DATA + "[methods.tome]\n", "models is an empty grid"),
    (BASE + DATA + "[methods.tomme]\n", "unknown method 'tomme' (did you mean 'tome'"),
    (BASE + DATA + "[methods.topk]\nkeep_rate = 0\n", "keep_rate=0.0 is out of range (0, 1]"),
    (BASE + DATA + '[methods.tome]\nr = [1, "a"]\n', "r must be an integer or a list of integers, got 'a'"),
    (BASE + DATA + "[methods.tome]\nr = [[" + ",".join(["1"] * 13) + "]]\n",
     "r has 13 entries but the model has 12 blocks"),
    (BASE.replace(TINY, "resnet18") + DATA + "[methods.tome]\n", "ResNet is not one"),
    (BASE.replace(TINY, GAP) + "img_size = 32\n" + DATA + "[methods.topk]\nkeep_rate = [0.5]\n",
     "topk needs a class token"),
    (BASE.replace(TINY, GAP) + "img_size = 32\nflops_targets = [0.5]\n" + DATA + "[methods.evit]\n",
     "evit needs a class token"),
    (BASE + "img_size = 0\n" + DATA + "[methods.tome]\n", "img_size must be positive"),
    (BASE + "precision = \"fp64\"\n" + DATA + "[methods.tome]\n", "unknown precision 'fp64'"),
    (BASE + DATA + "split = \"tset\"\n[methods.tome]\n", "unknown data split 'tset'"),
    (BASE + DATA.replace("limit = 8", "limit = 0") + "[methods.tome]\n", "data limit must be positive"),
    (BASE + DATA.replace("synthetic", "fashion-mnist") + "dir = \"/nonexistent/fm\"\n[methods.tome]\n",
     "data directory /nonexistent/fm does not exist"),
    (BASE.replace('measure = ["flops", "accuracy"]', "measure = [\"flops\"]") + "[methods.tome]\n"
     "checkpoint = \"/nonexistent/x.pt\"\n", "checkpoint /nonexistent/x.pt does not exist"),
])
def test_malformed_sweep_refused_before_anything_is_written(cli, tmp_path, text, match):
    f = tmp_path / "s.toml"
    f.write_text(text)
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    code, o, err = cli("run", str(f), "--out", str(out), "--no-plots")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    assert snapshot(tmp_path) == before and not out.exists()


def test_sweep_checkpoint_for_another_architecture_refused_before_anything_is_written(cli, tmp_path):
    ck = tmp_path / "wide.pt"
    torch.save(tiny_state_dict(embed_dim=64), ck)
    f = tmp_path / "s.toml"
    f.write_text(BASE + DATA + f"[methods.tome]\nr = [1, 2]\ncheckpoint = \"{ck}\"\n")
    before = snapshot(tmp_path)
    code, o, err = cli("run", str(f), "--out", str(tmp_path / "out"), "--no-plots")
    assert code == 2 and err.count("\n") == 1
    assert "[methods.tome]: checkpoint" in err and "shape mismatch: cls_token (1, 1, 64) vs (1, 1, 32)" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("args, match", [
    (["--limit", "0"], "data limit must be positive, got 0"),
    (["--limit", "-1"], "data limit must be positive"),
    (["--img-size", "0"], "img_size must be positive"),
    (["--split", "tset"], "unknown data split 'tset'"),
    (["--precision", "fp64"], "unknown precision 'fp64'"),
    (["--set", "r"], "--set expects KEY=VALUE"),
    (["--set", "rr=3"], "no listed method takes 'rr' (did you mean 'r'?)"),
    (["--measure", "flops,speed"], "unknown measurement 'speed'"),
])
def test_run_flags_refused(cli, tmp_path, args, match):
    out = tmp_path / "o"
    code, o, err = cli("run", "--model", TINY, "-m", "tome", "--data", "synthetic", *args, "--out", str(out),
                       "--no-plots")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and match in err, err
    assert not out.exists()


@pytest.mark.parametrize("args, match", [
    (["flops"], "Missing argument 'model'"),
    (["flops", TINY, "--bogus"], "No such option: --bogus"),
    (["eval", TINY, "--data", "synthetic", "--limit", "abc"], "Invalid value for '--limit'"),
    (["flops", TINY, "--img-size", "3.5"], "Invalid value for '--img-size'"),
    (["flopz", TINY], "No such command 'flopz'"),
])
def test_usage_errors_are_exit_2_one_line(cli, results, args, match):
    """typer's own parse errors (it vendors click) are bad input too, not internal errors."""
    assert_refused(cli, results, *args, match=match)


# --------------------------------------------------------------------------- --debug

def test_debug_shows_the_traceback():
    import traceback

    from tokenbench.cli.main import main

    with pytest.raises(UserError) as exc:
        main(["--debug", "flops", TINY, "-m", "tome", "-s", "r=-1"])
    tb = "".join(traceback.format_exception(exc.value))
    assert tb.startswith("Traceback") and "registry.py" in tb and "r=-1 is out of range" in tb


# --------------------------------------------------------------------------- results that would mislead

def test_nan_logits_refused_by_eval_and_throughput(cli, results, tmp_path):
    sd = tiny_state_dict()
    sd["head.weight"] = torch.full_like(sd["head.weight"], float("nan"))
    ck = tmp_path / "nan.pt"
    torch.save(sd, ck)
    assert_refused(cli, results, "eval", TINY, "--data", "synthetic", "--limit", "4", "-c", str(ck),
                   "--results", str(results), match="the model produced NaN or infinite logits")
    assert_refused(cli, results, "throughput", TINY, "-b", "2", "--min-run-time", "0.01", "--threads", "1",
                   "-c", str(ck), "--results", str(results), match="NaN or infinite logits")
    sd["head.weight"] = torch.full_like(sd["head.weight"], float("inf"))
    torch.save(sd, ck)
    assert_refused(cli, results, "eval", TINY, "--data", "synthetic", "--limit", "4", "-c", str(ck),
                   "--results", str(results), match="NaN or infinite logits")


def test_method_that_changes_nothing_is_flagged_in_the_report(cli, tmp_path):
    """At 4 px (one patch) ToMe cannot merge and top-k cannot prune: the run is flagged, not silently equal."""
    out = tmp_path / "o"
    code, o, err = cli("run", "--model", TINY, "--img-size", "4", "-m", "tome", "-m", "topk", "--set", "r=[2]",
                       "--set", "keep_rate=[0.5]", "--measure", "flops", "--out", str(out), "--no-plots", "--json")
    assert code == 0, err
    rows = {r["method"]: r for r in json.loads(o)["rows"]}
    for m in ("tome", "topk"):
        assert "warning" in rows[m]["flags"].split(","), rows[m]
        assert "method left every block at the dense token count" in rows[m]["warnings"]
    assert "warning" not in (rows["none"]["flags"] or "")
    md = (out / "results.md").read_text()
    assert "method left every block at the dense token count" in md and "**warning**" in md
    code, o, err = cli("flops", TINY, "--img-size", "4", "-m", "tome", "-s", "r=2")
    assert code == 0 and "warning: method left every block at the dense token count" in err


def test_wide_throughput_spread_is_flagged(cli, tmp_path, monkeypatch):
    from tokenbench.measure import timing

    # every attempt is flagged, so each is taken three times: no warm-up, which changes no flag
    monkeypatch.setattr(timing, "throughput", functools.partial(timing.throughput, max_spread=-1.0, warmup_s=0.0))
    out = tmp_path / "o"
    code, o, err = cli("run", "--model", TINY, "-m", "tome", "--set", "r=[4]", "--measure", "flops,throughput",
                       "--batch-size", "2", "--min-run-time", "0.01", "--threads", "1", "--out", str(out),
                       "--no-plots", "--json")
    assert code == 0, err
    rows = json.loads(o)["rows"]
    assert rows and all("noisy" in r["flags"].split(",") for r in rows)
    assert "**noisy**" in (out / "results.md").read_text()


# --------------------------------------------------------------------------- damaged records

def test_damaged_records_are_set_aside_with_one_line_each(cli, tmp_path):
    out = tmp_path / "o"
    code, o, err = cli("run", "--model", TINY, "-m", "tome", "--set", "r=[2,4]", "--measure", "flops",
                       "--out", str(out), "--no-plots", "--json")
    assert code == 0, err
    plan = json.loads((out / "sweep.json").read_text())
    keys = [r["keys"]["flops"] for r in plan["runs"]]
    half = out / "records" / f"{keys[1]}.json"
    half.write_bytes(half.read_bytes()[:100])                           # half-written
    tampered = out / "records" / f"{keys[2]}.json"
    tampered.write_text(tampered.read_text().replace('"gflops": ', '"gflops": 1'))  # parses, checksum fails
    code, o, err = cli("report", str(out), "--no-plots")
    assert code == 0, err
    warn = [ln for ln in err.splitlines() if ln.startswith("warning: damaged record")]
    assert len(warn) == 2 and all("set aside as" in w for w in warn)
    assert any(str(half) in w for w in warn) and any(str(tampered) in w for w in warn)
    assert "Traceback" not in err
    assert sorted(p.name.split(".json")[0] for p in (out / "quarantine").iterdir()) == sorted(keys[1:])
    code, o, err = cli("report", str(out), "--no-plots", "--json")
    rows = json.loads(o)["rows"]
    assert [r["gflops"] is None for r in rows] == [False, True, True]
    assert all("incomplete" in r["flags"] for r in rows[1:])
    # the next run measures them again
    code, o, err = cli("run", "--model", TINY, "-m", "tome", "--set", "r=[2,4]", "--measure", "flops",
                       "--out", str(out), "--no-plots", "--json")
    assert code == 0 and json.loads(o)["measured"] == 2 and json.loads(o)["reused"] == 1


def test_damaged_plan_and_flops_cache(cli, tmp_path):
    out = tmp_path / "o"
    args = ["run", "--model", TINY, "-m", "topk", "--flops-targets", "0.6", "--measure", "flops", "--out",
            str(out), "--no-plots", "--json"]
    code, o, err = cli(*args)
    assert code == 0, err
    (out / "sweep.json").write_text('{"runs": [')
    code, o, err = cli("report", str(out), "--no-plots")
    assert code == 0 and "is damaged" in err and err.count("warning:") == 1
    (out / "flops_cache.json").write_text("{not json")
    with pytest.warns(UserWarning, match="FLOPs cache .* is damaged"):
        code, o, err = cli(*args)
    assert code == 0, err
    import warnings

    # the CLI shows every warning on one line
    assert warnings.formatwarning("damaged\nmore", UserWarning, "f.py", 1) == "warning: damaged\n"
    assert json.loads((out / "flops_cache.json").read_text())["gflops"]  # rewritten whole
    assert json.loads((out / "sweep.json").read_text())["runs"]


# --------------------------------------------------------------------------- killed, interrupted, concurrent

SUB_SWEEP = f"""
name = "sub"
models = ["{SUB_MODEL}"]
img_size = 32
measure = ["flops", "accuracy"]
device = "cpu"
[data]
name = "synthetic"
limit = 8
batch_size = 8
[methods.tome]
r = [1, 2, 3]
[methods.topk]
keep_rate = [0.5, 0.75]
[methods.evit]
keep_rate = [0.5, 0.75]
"""
SUB_RECORDS = 16  # 8 runs (dense, 3 tome, 2 topk, 2 evit) x 2 kinds


def _tokenbench_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("tokenbench")
    return [str(exe)] if exe.is_file() else [sys.executable, "-c", "from tokenbench.cli.main import main; main()"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _default_sigint() -> None:
    # a job started in the background of a non-interactive shell inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler: give the sweep Ctrl-C as a terminal has it
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(sweep: Path, out: Path, *extra, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(_tokenbench_cmd() + ["run", str(sweep), "--out", str(out), "--no-plots", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or _env(),
                            cwd=sweep.parent, preexec_fn=_default_sigint if os.name == "posix" else None)


# In the sweep to interrupt: a pause after each record written, so that the signal, sent when the
# first record appears, lands part way even when this process is slow to see it (a loaded machine:
# the 16 tiny records can all be written before it looks again).
PAUSE_AFTER_EACH_RECORD = """
import os
if os.environ.get("TB_TEST_PAUSE_AFTER_PUT"):
    import time
    from tokenbench import store
    _put = store.Store.put
    def put(self, rec):
        path = _put(self, rec)
        time.sleep(float(os.environ["TB_TEST_PAUSE_AFTER_PUT"]))
        return path
    store.Store.put = put
"""


def _paused_env(tmp_path: Path) -> dict:
    d = tmp_path / "pause"
    d.mkdir()
    (d / "sitecustomize.py").write_text(PAUSE_AFTER_EACH_RECORD)
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(d), env.get("PYTHONPATH", "")])
    env["TB_TEST_PAUSE_AFTER_PUT"] = "0.5"
    return env


def _records(out: Path) -> list[Path]:
    d = out / "records"
    return sorted(d.glob("*.json")) if d.is_dir() else []


def _check_exactly_once(out: Path) -> None:
    """Every planned (run, kind) has exactly one record file, each loads, nothing else is there."""
    from tokenbench.store import Store

    plan = json.loads((out / "sweep.json").read_text())
    planned = [k for r in plan["runs"] for k in r["keys"].values()]
    assert len(planned) == SUB_RECORDS and len(set(planned)) == len(planned)
    files = [p.stem for p in _records(out)]
    assert sorted(files) == sorted(planned)
    recs = Store(out).records()
    assert sorted(r["key"] for r in recs) == sorted(planned)
    assert not (out / "quarantine").exists()
    json.loads((out / "flops_cache.json").read_text()) if (out / "flops_cache.json").exists() else None


def _interrupt_part_way(tmp_path: Path, sig: int) -> tuple[Path, subprocess.Popen, int, str]:
    sweep = tmp_path / "sub.toml"
    sweep.write_text(SUB_SWEEP)
    out = tmp_path / "out"
    p = _start(sweep, out, env=_paused_env(tmp_path))
    deadline = time.monotonic() + 300
    while not _records(out):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "no record after 300 s"
        time.sleep(0.02)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    n = len(_records(out))
    assert 1 <= n < SUB_RECORDS, f"the signal landed after the sweep finished ({n} records)"
    return out, p, n, err


def _rerun_and_check(cli, out: Path, already: int) -> None:
    """The rerun need not be another process: in this one, it saves the imports."""
    code, o, err = cli("run", str(out.parent / "sub.toml"), "--out", str(out), "--no-plots", "--json")
    assert code == 0, err
    res = json.loads(o)
    assert res["measured"] == SUB_RECORDS - already and res["reused"] == already
    _check_exactly_once(out)


def test_sigkill_part_way_then_rerun_records_every_run_once(tmp_path, cli):
    out, p, n, err = _interrupt_part_way(tmp_path, signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL
    for rec in _records(out):  # what a killed sweep left is whole
        json.loads(rec.read_text())
    _rerun_and_check(cli, out, n)


def test_sigint_part_way_is_a_clean_exit_130_then_rerun_completes(tmp_path, cli):
    out, p, n, err = _interrupt_part_way(tmp_path, signal.SIGINT)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "error: interrupted; completed runs are recorded, rerun to continue"
    assert not list((out / "records").glob(".*.tmp"))  # an interrupted write cleans up after itself
    _rerun_and_check(cli, out, n)


def test_two_concurrent_writers_record_every_run_once(tmp_path):
    sweep = tmp_path / "sub.toml"
    sweep.write_text(SUB_SWEEP.replace('measure = ["flops", "accuracy"]',
                                       'measure = ["flops", "accuracy"]\nflops_targets = [0.6]')
                     .replace("[methods.evit]\nkeep_rate = [0.5, 0.75]\n", "[methods.evit]\n"))
    out = tmp_path / "out"
    a, b = _start(sweep, out, "--json"), _start(sweep, out, "--json")
    (oa, ea), (ob, eb) = a.communicate(timeout=600), b.communicate(timeout=600)
    assert a.returncode == 0, ea
    assert b.returncode == 0, eb
    ra, rb = json.loads(oa), json.loads(ob)
    # 8 runs x 2 kinds: dense, 3 tome, 2 topk, the evit run at its FLOPs target... and topk at the target
    plan = json.loads((out / "sweep.json").read_text())
    planned = [k for r in plan["runs"] for k in r["keys"].values()]
    assert ra["runs"] == rb["runs"] == len(plan["runs"])
    assert ra["measured"] + ra["reused"] == rb["measured"] + rb["reused"] == len(planned)
    assert ra["measured"] + rb["measured"] == len(set(planned))  # each run claimed, so measured once
    files = [p.stem for p in _records(out)]
    assert sorted(files) == sorted(set(planned))
    from tokenbench.store import Store

    assert sorted(r["key"] for r in Store(out).records()) == sorted(set(planned))
    assert not (out / "quarantine").exists()
    cache = json.loads((out / "flops_cache.json").read_text())["gflops"]
    assert cache and all(isinstance(v, float) for v in cache.values())
    assert not [p for p in out.rglob("*.tmp")]


# --------------------------------------------------------------------------- property test: every method

def _method_names():
    from tokenbench.registry import list_methods

    return [m["name"] for m in list_methods()]


DEPTH = 12


# parameters that name a block, whose valid range is the model's depth (declared without a bound)
BLOCK_INDEX = {("visionzip", "layer"): (-DEPTH, DEPTH - 1), ("pool", "half_block"): (0, 2 * DEPTH - 1)}


def _param_strategy(st, p):
    """A hypothesis strategy over the declared range of one parameter."""
    if p.choices:
        return st.sampled_from(list(p.choices))
    if p.type == "bool":
        return st.booleans()
    if p.type == "float":
        lo = -4.0 if p.min is None else float(p.min)
        hi = lo + 8.0 if p.max is None else float(p.max)
        return st.floats(lo, hi, exclude_min=p.min_exclusive, allow_nan=False, allow_infinity=False)
    if p.type in ("int", "int_or_list"):
        lo = 0 if p.min is None else int(math.ceil(p.min + (1 if p.min_exclusive else 0)))
        hi = lo + 40 if p.max is None else int(p.max)
        # unbounded: 1000 is far beyond any token or block count here (<= 39 tokens, 12 blocks) and, unlike
        # 10**6, cheap where the parameter is an iteration count (Zero-TPrune's: 30 s a test at 10**6)
        one = st.one_of(st.integers(lo, min(hi, lo + 40)), st.just(hi if p.max is not None else 1000))
        if p.type == "int":
            return one
        return st.one_of(one, st.lists(st.integers(lo, min(hi, lo + 20)), min_size=1, max_size=DEPTH))
    return st.just(p.default)


from hypothesis import given, strategies as st  # noqa: E402


@pytest.mark.parametrize("name", _method_names())
@given(data=st.data())
def test_every_method_on_random_grids_matches_its_declared_tokens(name, data):
    import timm

    from tokenbench.registry import apply, get_method

    cls = get_method(name)
    patch = data.draw(st.sampled_from([4, 8, 16]), label="patch")
    grid = data.draw(st.integers(1, 6), label="grid")
    img = patch * grid
    batch = data.draw(st.integers(1, 4), label="batch")
    cls_token = True if cls.needs_class_token else data.draw(st.booleans(), label="class_token")
    reg = data.draw(st.integers(0, 2), label="reg_tokens")
    if name == "mctf":  # MCTF refuses models with register tokens (one prefix token, as the official)
        reg = 0
    params = {p.name: data.draw(_param_strategy(st, p), label=p.name) for p in cls.params}
    for (method, key), (lo, hi) in BLOCK_INDEX.items():   # a block index: within this model's depth
        if method == name:
            params[key] = data.draw(st.integers(lo, hi), label=key)
    params = cls.validate(params)
    if name == "mctf" and isinstance(params["r"], list) and params["r"]:
        params["r"][0] = 0  # MCTF fuses before blocks 1..11 (the official layers), never before block 0
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", img_size=img, patch_size=patch, embed_dim=32, depth=DEPTH,
                            num_heads=2, num_classes=5, class_token=cls_token, reg_tokens=reg,
                            global_pool="token" if cls_token else "avg").eval()
    from hypothesis import assume

    from tokenbench.errors import UserError

    try:
        apply(net, name, **params)
    except UserError as e:  # a per-site or per-block list longer than the method's sites: refused
        assume("entries" not in str(e))
        raise
    x = torch.randn(batch, 3, img, img)
    with torch.inference_mode():
        y = net(x)
    assert y.shape == (batch, 5)
    assert torch.isfinite(y).all()
    st_ = last_state(net)
    assert len(st_.tokens) == len(st_.tokens_mlp) == DEPTH
    exp = cls().expected_tokens(net, **params)
    if exp is not None:
        assert list(st_.tokens) == list(exp[0]), (params, img, patch)
        assert list(st_.tokens_mlp) == list(exp[1]), (params, img, patch)
    n0 = grid * grid + net.num_prefix_tokens
    # the first block sees every token, unless the method shrinks the input itself (resize: its
    # declared schedule, checked above, says how many); A-ViT may halt every token, class token too
    least = 0 if name == "avit" else 1
    assert st_.tokens[0] == n0 or (name == "resize" and st_.tokens[0] <= n0)
    assert all(least <= t <= n0 for t in st_.tokens + st_.tokens_mlp)
    assert all(a >= b for a, b in zip(st_.tokens_mlp, st_.tokens[1:]))  # only the method's sites change lengths


def test_ctrl_c_in_process_is_exit_130_with_one_line(cli, tmp_path, monkeypatch):
    from tokenbench import sweep as S

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "execute", interrupted)
    code, o, err = cli("run", "--model", TINY, "-m", "tome", "--measure", "flops", "--out", str(tmp_path / "o"),
                       "--no-plots")
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "error: interrupted; completed runs are recorded, rerun to continue"


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc")
def test_a_measurements_own_child_processes_are_not_other_processes():
    # torch.compile compiles in worker processes of its own: their CPU time is the measurement's,
    # so it must not make the machine look busy
    from tokenbench.measure import busy

    before = busy._self_jiffies()
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.6: pass\ntime.sleep(30)"])
    try:
        deadline = time.time() + 20
        while busy._self_jiffies() - before < 30 and time.time() < deadline:  # 0.3 s of the child's CPU
            time.sleep(0.1)
        assert busy._self_jiffies() - before >= 30
    finally:
        child.kill()
        child.wait()
