"""The command line: compact schedules as input, ``--debug`` anywhere, run directories that
are never overwritten, a quiet install and API, cheap checks first and per-model defaults."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenbench.registry import get_method, parse_set
from tokenbench.report.stats import parse_selector
from tokenbench.sweep import fmt_value

TINY = "tb_tiny_cli"


# --------------------------------------------------------------------------- r=[3x3,2x9]

def test_compact_schedule_accepted_by_set_and_compare():
    want = [3, 3, 3] + [2] * 9
    assert parse_set(["r=[3x3,2x9]"]) == {"r": want}
    assert parse_set(["r=[5,4x11]"])["r"] == [5] + [4] * 11
    assert get_method("tome").validate(parse_set(["r=[3x3,2x9]"]))["r"] == want
    assert parse_selector("tome:r=[3x3,2x9],prop_attn=true") == ("tome", {"r": want, "prop_attn": True})
    # what is not a schedule stays a string, for the method's own validation to refuse
    assert parse_set(["r=[3x,2]"])["r"] == "[3x,2]"
    assert parse_set(["name=x3"])["name"] == "x3"


@given(st.one_of(st.lists(st.integers(0, 40), max_size=14),
                 st.lists(st.sampled_from([0.5, 0.7, 0.25, 1.0]), max_size=6),
                 st.integers(0, 100), st.sampled_from([0.7, 0.48, 1.0])))
def test_printed_values_read_back(value):
    """Whatever a table prints (fmt_value) --set and compare read back as the same value."""
    printed = fmt_value(value)
    assert parse_set([f"k={printed}"])["k"] == value
    assert parse_selector(f"tome:k={printed}")[1]["k"] == value


# --------------------------------------------------------------------------- --debug anywhere

@pytest.mark.parametrize("where", ["first", "after the command", "last"])
def test_debug_works_where_a_user_appends_it(where):
    import traceback

    from tokenbench.cli.main import main
    from tokenbench.errors import UserError

    args = ["flops", "default", "-m", "tome", "-s", "r=-1"]
    args = {"first": ["--debug"] + args, "after the command": args[:1] + ["--debug"] + args[1:],
            "last": args + ["--debug"]}[where]
    with pytest.raises(UserError) as exc:
        main(args)
    tb = "".join(traceback.format_exception(exc.value))
    assert tb.startswith("Traceback") and "r=-1 is out of range" in tb


def test_without_debug_the_error_is_one_line(cli):
    code, out, err = cli("flops", "default", "-m", "tome", "-s", "r=-1")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


# --------------------------------------------------------------------------- a quiet install and API

def test_pyproject_gives_setuptools_nothing_to_warn_about():
    """The license is an SPDX string (a table is deprecated) and every folder of files under
    tokenbench/ is a listed package (else setuptools warns "Package would be ignored")."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = tomllib.loads((root / "pyproject.toml").read_text())
    assert isinstance(cfg["project"]["license"], str)
    packages = set(cfg["tool"]["setuptools"]["packages"])
    data = cfg["tool"]["setuptools"].get("package-data", {})
    for d in (root / "tokenbench").iterdir():
        if d.is_dir() and d.name != "__pycache__" and any(f.is_file() for f in d.iterdir()):
            name = f"tokenbench.{d.name}"
            assert name in packages, f"{name} missing from [tool.setuptools] packages"
            shipped = {f.name for pat in ["*.py", *data.get(name, [])] for f in d.glob(pat)}  # modules ship too
            assert shipped >= {f.name for f in d.iterdir() if f.is_file()}, f"{name}: files not in package-data"


def test_python_api_prints_no_third_party_notices():
    """flops (fvcore: torch.jit deprecation) and throughput (torch.utils.benchmark: "No CUDA
    runtime is found") leave stderr empty, even with every warning shown."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import tokenbench\n"
            "m, _ = tokenbench.load('default')\n"
            "tokenbench.flops(m)\n"
            "tokenbench.throughput(m, batch_size=1, min_run_time=0.01, warmup_s=0.0, latency=False, threads=1)\n"
            "import warnings; warnings.warn('still shown', UserWarning)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "still shown" in lines[0], p.stderr  # other warnings still pass


# --------------------------------------------------------------------------- finished runs are never overwritten

def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_train_base_defaults_to_runs_not_the_committed_model(cli, monkeypatch, tmp_path):
    from tokenbench import train as T

    seen = {}

    def fake_train_base(out, cfg, **kw):
        seen["out"] = out
        return {"steps": 10, "step": 10, "resumed_from": 0, "finished": True, "test_acc": 50.0}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(T, "train_base", fake_train_base)
    code, out, err = cli("train-base")
    assert code == 0, err
    assert str(seen["out"]).replace("\\", "/") == "runs/embedded"


def test_a_finished_run_is_never_touched_without_force(cli, tiny_default, tmp_path):
    """train-base and train into a finished run directory are refused, leaving every file as it was."""
    from test_harness import _fake_fmnist

    data = tmp_path / "fmnist"
    data.mkdir()
    _fake_fmnist(data, n=300)
    before = _snapshot(tiny_default)
    code, out, err = cli("train-base", "--out", str(tiny_default), "--data-dir", str(data), "--max-steps", "1")
    assert code == 2 and "finished run" in err and "--force" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli("train", "default", "--method", "topk", "--out", str(tiny_default), "--data-dir", str(data),
                         "--max-steps", "1")
    assert code == 2 and "finished run" in err
    assert _snapshot(tiny_default) == before
    # --force starts it over; an interruption then leaves an unfinished, resumable run (no stale model.pt)
    run = tmp_path / "run"
    code, out, err = cli("train", "default", "--method", "topk", "--out", str(run), "--data-dir", str(data),
                         "--epochs", "1", "--batch-size", "100")
    assert code == 0 and (run / "model.pt").is_file(), err
    code, out, err = cli("train", "default", "--method", "topk", "--out", str(run), "--data-dir", str(data),
                         "--epochs", "1", "--batch-size", "100", "--max-steps", "1", "--force")
    assert code == 0, err
    assert (run / "last.pt").is_file() and not (run / "model.pt").exists()
    assert "stopped at step 1 of 2" in out   # 275 train images in batches of 100 (25 are held out for val)


# --------------------------------------------------------------------------- Ctrl-C saves a checkpoint

def test_ctrl_c_before_the_first_checkpoint_saves_one(tmp_path):
    import os
    import signal

    import torch
    from test_embedded import _cfg, _fake_data, _model

    from tokenbench.train import train_loop

    x, y = _fake_data()
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job

    def ctrl_c_at_step_3(model, epoch):
        if round(epoch * 8) == 3:  # 8 steps per epoch
            os.kill(os.getpid(), signal.SIGINT)

    cfg = _cfg(epochs=2, ckpt_every=200, eval_every=200)
    with pytest.raises(KeyboardInterrupt):
        train_loop(_model(), x, y, x[:32], y[:32], cfg, tmp_path, progress=False, step_hook=ctrl_c_at_step_3)
    assert torch.load(tmp_path / "last.pt", weights_only=False)["step"] == 4  # the step under way finished
    summary = train_loop(_model(), x, y, x[:32], y[:32], cfg, tmp_path, progress=False)
    assert summary["resumed_from"] == 4 and summary["finished"]
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back


# --------------------------------------------------------------------------- train's summary, per-model recipes

@pytest.fixture
def fake_finetune(monkeypatch):
    from tokenbench import train as T

    calls = []

    def fake(model, method, params, out, cfg, **kw):
        calls.append({"model": model, "method": method, "params": params, "out": out, "cfg": cfg, **kw})
        return {"steps": 936, "step": 936, "resumed_from": 0, "finished": True, "test_acc": 88.5}

    monkeypatch.setattr(T, "finetune", fake)
    return calls


def test_train_prints_a_summary_and_json_only_on_request(cli, fake_finetune, tmp_path):
    out = tmp_path / "r"
    code, stdout, err = cli("train", "default", "--method", "topk", "--out", str(out))
    assert code == 0, err
    assert "trained 936 steps" in stdout and "88.50%" in stdout and f"--checkpoint {out / 'model.pt'}" in stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(stdout)
    code, stdout, err = cli("train", "default", "--method", "topk", "--out", str(out), "--json")
    assert code == 0 and json.loads(stdout)["finished"] is True


def test_dynamicvit_on_the_embedded_model_gets_the_recipe_that_trains(cli, fake_finetune, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = cli("train", "default", "--method", "dynamicvit", "--set", "keep_rate=0.5")
    assert code == 0, err
    call = fake_finetune[-1]
    assert call["params"] == {"keep_rate": 0.5, "keep_prior_init": True, "decision_grad_clip": 1.0}
    assert call["loss_weights"] == {"ratio_weight": 2000.0}
    cfg = call["cfg"]
    assert (cfg.lr, cfg.epochs, cfg.grad_clip) == (2e-3, 2.0, 1.0)
    assert str(call["out"]).replace("\\", "/") == "runs/default-dynamicvit-keep_rate0.5"
    assert "note:" in err and "ratio_weight=2000" in err and "--grad-clip 1" in err
    # the user's flags win; another model gets the method's general recipe
    code, stdout, err = cli("train", "default", "--method", "dynamicvit", "--lr", "1e-3", "--set",
                            "keep_prior_init=false", "--loss-weight", "ratio_weight=2")
    call = fake_finetune[-1]
    assert code == 0 and call["cfg"].lr == 1e-3 and call["params"]["keep_prior_init"] is False
    assert call["loss_weights"] == {"ratio_weight": 2.0} and call["cfg"].grad_clip == 1.0
    code, stdout, err = cli("train", "default", "--method", "dynamicvit", "--grad-clip", "0")
    assert code == 0 and fake_finetune[-1]["cfg"].grad_clip is None  # the official recipe is reachable
    code, stdout, err = cli("train", "deit_tiny_patch16_224", "--method", "dynamicvit")
    call = fake_finetune[-1]
    assert code == 0 and call["params"]["keep_prior_init"] is False and call["loss_weights"] is None
    assert call["cfg"].grad_clip is None and "note:" not in err


# --------------------------------------------------------------------------- cheap checks first, offline fast

@pytest.fixture
def no_network(monkeypatch):
    import timm

    from tokenbench import models

    def touched(*a, **k):
        raise AssertionError("timm.create_model (a download) was reached")

    monkeypatch.setattr(models, "_pretrained_cached", lambda name: False, raising=False)
    monkeypatch.setattr(models, "_network_reachable", lambda *a, **k: False, raising=False)
    monkeypatch.setattr(timm, "create_model", touched)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_pretrained_offline_fails_fast_in_one_line(cli, no_network, monkeypatch):
    from tokenbench import models

    code, out, err = cli("eval", "deit_tiny_patch16_224", "--pretrained", "--data", "synthetic", "--limit", "2")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "not in the local cache" in err and "cannot be reached" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_network_reachable", lambda *a, **k: pytest.fail("probed while offline"))
    code, out, err = cli("flops", "deit_tiny_patch16_224", "--pretrained")
    assert code == 2 and "HF_HUB_OFFLINE" in err


def test_a_missing_data_dir_is_reported_before_any_download(cli, no_network, tmp_path):
    code, out, err = cli("eval", "deit_tiny_patch16_224", "--pretrained", "--data", "folder", "--data-dir",
                         str(tmp_path / "nope"))
    assert code == 2 and "does not exist" in err and "pretrained" not in err
    code, out, err = cli("train", "deit_tiny_patch16_224", "--method", "topk", "--pretrained", "--data", "folder",
                         "--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "r"))
    assert code == 2 and "nope" in err and "pretrained" not in err


# --------------------------------------------------------------------------- visualize's default budget

def test_visualize_one_method_defaults_to_a_matched_flops_level(cli, monkeypatch, tmp_path):
    """`visualize default --method tome` draws ToMe at a FLOPs level, not at r=16 (2 tokens left)."""
    from tokenbench.visual import sheets
    from tokenbench.visual.budget import Flops

    searched, drawn = [], []

    def fake_matched(self, model, method, params, target, preferred=()):
        searched.append((model, method, target))
        return {**params, "r": [3] * 12}, None

    def fake_visualize(model, method, params, **kw):
        drawn.append(params)
        return {"out": "x.png", "n_images": 1, "panels_per_image": 2, "gflops": 1.0, "flops_ratio": 0.66}

    monkeypatch.setattr(Flops, "matched", fake_matched)
    monkeypatch.setattr(sheets, "visualize", fake_visualize)
    code, out, err = cli("visualize", "default", "--method", "tome")
    assert code == 0, err
    assert searched == [("default", "tome", 0.66)] and drawn[-1]["r"] == [3] * 12
    assert "r=[3x12]" in err and "0.66x dense FLOPs" in err
    code, out, err = cli("visualize", "default", "--method", "tome", "--flops", "0.5")
    assert code == 0 and searched[-1][2] == 0.5
    code, out, err = cli("visualize", "default", "--method", "tome", "--set", "r=16")  # asked for: as asked
    assert code == 0 and drawn[-1] == {"r": 16} and len(searched) == 2
    code, out, err = cli("visualize", "default", "--method", "tome", "--set", "r=4", "--flops", "0.5")
    assert code == 2 and "not both" in err
    code, out, err = cli("visualize", "default", "--method", "none")
    assert code == 0 and drawn[-1] == {} and len(searched) == 2
