"""The embedded default: its trainer learns, resumes exactly, and its checksum guards loading."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from tokenbench.errors import UserError
from tokenbench.train import BASE_RECIPE, TrainConfig, train_base, train_loop

from conftest import SMALL_EMBEDDED as SMALL  # noqa: E402


def _fake_data(n=256, seed=0):
    """Two easy classes of 28x28 images, so a few steps visibly learn."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = torch.randn(n, 1, 28, 28, generator=g) * 0.3
    for c in range(10):  # a bright bar whose row depends on the class
        x[y == c, :, 2 + 2 * c:4 + 2 * c, :] += 2.0
    return x, y


def _model(**arch):
    from tokenbench.models import build_embedded

    torch.manual_seed(0)
    return build_embedded({**SMALL, **arch})


def _cfg(**kw):
    base = TrainConfig(epochs=4, batch_size=32, lr=2e-3, warmup_steps=4, eval_every=8, ckpt_every=4,
                       shift=0, erase_p=0.0, threads=1)
    return dataclasses.replace(base, **kw)


def test_embedded_architecture_is_a_timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    from tokenbench.models import EMBEDDED_ARCH, build_embedded

    m = build_embedded()
    assert isinstance(m, VisionTransformer) and len(m.blocks) == 12 and m.cls_token is not None
    assert m.patch_embed.num_patches >= 49 and EMBEDDED_ARCH["in_chans"] == 1
    out = m(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)


def test_embedded_convnext_is_a_timm_convnext_with_a_7x7_stage_3():
    from timm.models.convnext import ConvNeXt

    from tokenbench.backbones import backbone_of
    from tokenbench.models import EMBEDDED_CONVNEXT_ARCH, build_embedded_convnext

    m = build_embedded_convnext().eval()
    assert isinstance(m, ConvNeXt) and EMBEDDED_CONVNEXT_ARCH["in_chans"] == 1
    bb = backbone_of(m)
    assert bb.name == "convnext" and bb.grid == (7, 7) and bb.num_patches >= 49
    assert len(bb.sites("stage 3")) == EMBEDDED_CONVNEXT_ARCH["depths"][2] >= 4
    feats = m.forward_intermediates(torch.randn(2, 1, 28, 28), intermediates_only=True)
    assert [f.shape[-1] for f in feats] == [28, 14, 7, 3]
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_default_convnext_resolves_by_name(tiny_default_convnext):
    from tokenbench.models import create_model

    m, prov = create_model("default-convnext")
    assert prov["weights"].startswith("sha256:") and prov["pretrained"]
    assert m(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_default_convnext_stem_and_layer_scale_and_older_configs(tmp_path):
    """The 3x3 stem and layer scales at 1 are the architecture's; a stored config written before
    those keys existed loads as it was trained (a 1x1 stem, layer scales 1e-6)."""
    import json

    from tokenbench.models import EMBEDDED_CONVNEXT, build_embedded_convnext, load_embedded
    from tokenbench.store import sha256_file

    m = build_embedded_convnext()
    assert m.stem[0].kernel_size == (3, 3) and float(m.stages[2].blocks[0].gamma[0]) == 1.0
    old = build_embedded_convnext({"stem_kernel": 1, "ls_init_value": 1e-6})
    torch.save(old.state_dict(), tmp_path / "model.pt")
    (tmp_path / "model.pt.sha256").write_text(f"{sha256_file(tmp_path / 'model.pt')}  model.pt\n")
    arch = {k: v for k, v in old.tokenbench_arch.items() if k not in ("stem_kernel", "ls_init_value")}
    (tmp_path / "config.json").write_text(json.dumps({"arch": arch}))
    loaded, _ = load_embedded(tmp_path, EMBEDDED_CONVNEXT)
    assert loaded.stem[0].kernel_size == (1, 1)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded(x), old.eval()(x))


def test_train_base_refuses_a_model_that_is_not_embedded(cli):
    code, out, err = cli("train-base", "--model", "resnet50")
    assert code == 2 and "embedded model" in err and "Traceback" not in err
    code, out, err = cli("train-base", "--max-steps", "0")
    assert code == 2 and "--max-steps must be 1 or more" in err and len(err.strip().splitlines()) == 1
    for threads in ("0", "-2"):  # it trained with 0 and recorded it; -2 was an internal error
        code, out, err = cli("train-base", "--threads", threads, "--out", "/nonexistent/never")
        assert code == 2 and "--threads must be positive" in err and len(err.strip().splitlines()) == 1


def test_short_training_learns(tmp_path):
    x, y = _fake_data()
    summary = train_loop(_model(depth=2), x, y, x[:64], y[:64], _cfg(epochs=4, lr=3e-3, label_smoothing=0.0), tmp_path,
                         progress=False)
    rows = (tmp_path / "train_log.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[3]) for r in rows]
    assert losses[-1] < 0.8 * losses[0], losses
    assert summary["finished"] and (tmp_path / "model.pt").is_file() and (tmp_path / "model.pt.sha256").is_file()


def test_resume_continues_exactly(tmp_path):
    """Interrupted after 6 steps and resumed == trained straight through."""
    x, y = _fake_data()
    straight = _model()
    train_loop(straight, x, y, x[:32], y[:32], _cfg(epochs=2), tmp_path / "a", progress=False)
    part = _model()
    train_loop(part, x, y, x[:32], y[:32], _cfg(epochs=2, max_steps=6), tmp_path / "b", progress=False)
    assert not (tmp_path / "b" / "model.pt").exists()
    resumed = _model()  # a fresh process would start from fresh weights too
    summary = train_loop(resumed, x, y, x[:32], y[:32], _cfg(epochs=2), tmp_path / "b", progress=False)
    assert summary["resumed_from"] == 6
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_killed_training_resumes(tmp_path):
    """A real subprocess killed mid-run leaves a checkpoint the next run continues from."""
    code = f"""
import torch, sys
sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
from test_embedded import _fake_data, _model, _cfg
from tokenbench.train import train_loop
x, y = _fake_data()
train_loop(_model(), x, y, x[:32], y[:32], _cfg(epochs=50, ckpt_every=2), {str(tmp_path)!r}, progress=False)
"""
    p = subprocess.Popen([sys.executable, "-c", code])
    import time

    deadline = time.time() + 120
    while not (tmp_path / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    p.kill()
    p.wait()
    assert (tmp_path / "last.pt").exists()
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    done = state["step"]
    assert done >= 2
    x, y = _fake_data()
    summary = train_loop(_model(), x, y, x[:32], y[:32], _cfg(epochs=50, ckpt_every=2, max_steps=2),
                         tmp_path, progress=False)
    assert summary["resumed_from"] == done and summary["step"] == done + 2


def test_checksum_refuses_corrupt_checkpoint(tmp_path):
    from tokenbench.models import build_embedded, load_embedded
    from tokenbench.train import finalize

    m = build_embedded(SMALL)
    finalize(m, tmp_path)
    (tmp_path / "config.json").write_text('{"arch": %s}' % __import__("json").dumps(SMALL))
    loaded, prov = load_embedded(tmp_path)
    assert prov["weights"].startswith("sha256:")
    data = bytearray((tmp_path / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "model.pt").write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt.*train-base"):
        load_embedded(tmp_path)
    (tmp_path / "model.pt").unlink()
    with pytest.raises(UserError, match="missing.*train-base"):
        load_embedded(tmp_path)


def test_recipe_is_recorded_and_config_mismatch_refused(tmp_path):
    x, y = _fake_data(64)
    train_loop(_model(), x, y, x[:16], y[:16], _cfg(epochs=1, max_steps=1), tmp_path, progress=False)
    with pytest.raises(UserError, match="different configuration"):
        train_loop(_model(), x, y, x[:16], y[:16], _cfg(epochs=1, lr=0.1), tmp_path, progress=False)
    assert BASE_RECIPE.seed == 0


def test_reschedule_changes_only_length_and_is_recorded(tmp_path):
    import json

    x, y = _fake_data(64)
    train_loop(_model(), x, y, x[:16], y[:16], _cfg(epochs=2, max_steps=2), tmp_path, progress=False)
    with pytest.raises(UserError, match="--reschedule"):
        train_loop(_model(), x, y, x[:16], y[:16], _cfg(epochs=1), tmp_path, progress=False)
    s = train_loop(_model(), x, y, x[:16], y[:16], _cfg(epochs=1), tmp_path, progress=False, reschedule=True)
    assert s["resumed_from"] == 2 and s["finished"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rescheduled"] == [{"from_epochs": 2, "to_epochs": 1, "at_step": 2}]


def test_max_steps_counts_this_invocation_so_rerunning_continues(tmp_path, capsys):
    x, y = _fake_data(128)
    first = train_loop(_model(), x, y, x[:16], y[:16], _cfg(epochs=2, max_steps=3), tmp_path, progress=False)
    assert first["step"] == 3 and not first.get("finished")
    again = train_loop(_model(), x, y, x[:16], y[:16], _cfg(epochs=2, max_steps=3), tmp_path, progress=True)
    assert again["resumed_from"] == 3 and again["step"] == 6                # the same command went 3 further
    err = capsys.readouterr().err
    assert "resuming" in err and "stopping at step 6" in err


def test_default_small_is_a_smaller_embedded_vit_with_the_same_recipe_and_grid(tmp_path, monkeypatch):
    """`default-small` shares the stem, grid and recipe of `default` at fewer FLOPs, and resolves
    by name from its own folder."""
    import json

    from tokenbench import models
    from tokenbench.backbones import backbone_of
    from tokenbench.measure.flop_count import flops
    from tokenbench.train import BASE_RECIPES, finalize

    small = models.build_embedded(models.embedded_arch("default-small")).eval()
    big = models.build_embedded(models.embedded_arch("default")).eval()
    bs, bb = backbone_of(small), backbone_of(big)
    assert bs.grid == bb.grid and bs.n_prefix == bb.n_prefix
    assert (bs.depth, bs.width) < (bb.depth, bb.width) or bs.width < bb.width
    assert flops(small)["gflops"] < 0.5 * flops(big)["gflops"]
    assert BASE_RECIPES["default-small"] == BASE_RECIPES["default"]
    d = tmp_path / "default-small"
    finalize(small, d)
    (d / "config.json").write_text(json.dumps({"arch": small.tokenbench_arch}))
    monkeypatch.setattr(models, "EMBEDDED_SMALL_DIR", d)
    m, prov = models.create_model("default-small")
    assert prov["weights"].startswith("sha256:") and backbone_of(m).depth == bs.depth
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_reschedule_lengthens_a_finished_run_and_only_lengthens_it(tmp_path):
    import json

    x, y = _fake_data(64)
    train_loop(_model(), x, y, x[:16], y[:16], _cfg(epochs=1), tmp_path, progress=False)
    assert (tmp_path / "model.pt").is_file()
    with pytest.raises(UserError, match="--reschedule"):
        train_loop(_model(), x, y, x[:16], y[:16], _cfg(epochs=2), tmp_path, progress=False)
    before = (tmp_path / "model.pt.sha256").read_text()
    with pytest.raises(UserError, match="only lengthen"):
        train_loop(_model(), x, y, x[:16], y[:16], _cfg(epochs=1), tmp_path, progress=False, reschedule=True)
    assert (tmp_path / "model.pt.sha256").read_text() == before      # a refused lengthening loses nothing
    done = json.loads((tmp_path / "config.json").read_text())["total_steps"]
    s = train_loop(_model(), x, y, x[:16], y[:16], _cfg(epochs=2), tmp_path, progress=False, reschedule=True)
    assert s["resumed_from"] == done and s["finished"] and s["step"] == 2 * done
    assert (tmp_path / "model.pt.sha256").read_text() != before
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rescheduled"] == [{"from_epochs": 1, "to_epochs": 2, "at_step": done}]


def test_reschedule_refuses_a_finished_run_without_its_last_checkpoint(tmp_path):
    x, y = _fake_data(64)
    train_loop(_model(), x, y, x[:16], y[:16], _cfg(epochs=1), tmp_path, progress=False)
    (tmp_path / "last.pt").unlink()  # as in a clone: the resumable checkpoint is not committed
    with pytest.raises(UserError, match="without its last checkpoint"):
        train_loop(_model(), x, y, x[:16], y[:16], _cfg(epochs=2), tmp_path, progress=False, reschedule=True)
    assert (tmp_path / "model.pt").is_file()


def test_a_schedule_of_no_step_is_refused_and_leaves_a_finished_run_alone(tmp_path):
    x, y = _fake_data(64)
    train_loop(_model(), x, y, x[:16], y[:16], _cfg(epochs=1), tmp_path, progress=False)
    before = (tmp_path / "model.pt.sha256").read_text()
    with pytest.raises(UserError, match="no training step"):
        train_loop(_model(), x, y, x[:16], y[:16], _cfg(epochs=0.001), tmp_path, progress=False, force=True)
    assert (tmp_path / "model.pt.sha256").read_text() == before
