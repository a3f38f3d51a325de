"""The GPU protocol: cudnn.benchmark, channels_last for convolutional models, --batch-size max.

What a CPU can check runs everywhere; the tests marked ``gpu`` need CUDA (`make bench-gpu`
runs them on a GPU machine) and are skipped without it.
"""

import json

import pytest
import torch
import torch.nn as nn

from conftest import register_tiny_timm, tiny_vit
from tokenbench import registry
from tokenbench.measure import memory, timed_forward, timing

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_convolutional_models_are_told_apart():
    assert not timed_forward.is_convolutional(tiny_vit())  # a patch embedding alone is not a CNN
    hybrid = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    assert timed_forward.is_convolutional(hybrid)


def test_cpu_timing_leaves_cudnn_and_memory_format_alone():
    m = registry.apply(tiny_vit(), "none").eval()
    before = torch.backends.cudnn.benchmark
    res = timing.throughput(m, batch_size=2, device="cpu", threads=1, min_run_time=0.02, warmup_s=0.01,
                             latency=False)
    assert res["env"]["channels_last"] is False and torch.backends.cudnn.benchmark == before


def test_batch_size_max_on_cpu_follows_the_memory_estimate(monkeypatch):
    m = tiny_vit()
    per = memory.estimate_memory_bytes(m, 2) - memory.estimate_memory_bytes(m, 1)
    fixed = memory.estimate_memory_bytes(m, 1) - per
    # room for 37 images at the 80% budget: 32 is the largest power of two that fits
    monkeypatch.setattr(memory, "available_memory_bytes", lambda dev: int((fixed + 37 * per) / 0.8) + 1)
    assert memory.max_batch_size(m, "cpu") == 32
    memory.check_batch_fits(m, 32, torch.device("cpu"))
    with pytest.raises(Exception):
        memory.check_batch_fits(m, 64, torch.device("cpu"))
    assert memory.max_batch_size(m, "cpu", cap=8) == 8
    monkeypatch.setattr(memory, "available_memory_bytes", lambda dev: 1)
    with pytest.raises(Exception, match="not even batch 1"):
        memory.max_batch_size(m, "cpu")


def test_cli_batch_size_max_is_recorded(cli, monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "max_batch_size", lambda *a, **k: 4)
    name = register_tiny_timm("tiny_max_batch_vit")
    code, out, err = cli("throughput", name, "-b", "max", "--min-run-time", "0.02", "--threads", "1",
                         "--results", str(tmp_path), "--json")
    assert code == 0, err
    rec = json.loads(out)
    assert rec["batch_size"] == 4 and rec["batch_size_from"] == "max"
    code, out, err = cli("throughput", name, "-b", "maximum", "--json")
    assert code == 2 and "--batch-size" in err


@gpu
@needs_cuda
def test_cuda_timing_turns_cudnn_benchmark_on_and_records_it():
    m = registry.apply(tiny_vit(), "tome", r=2).eval()
    before = torch.backends.cudnn.benchmark
    res = timing.throughput(m, batch_size=8, device="cuda", min_run_time=0.1, latency=False)
    assert res["env"]["cudnn_benchmark"] is True and res["env"]["device"] == "cuda"
    assert torch.backends.cudnn.benchmark == before and next(m.parameters()).device.type == "cpu"


@gpu
@needs_cuda
def test_cuda_convolutional_model_runs_channels_last():
    import timm

    cnn = timm.create_model("resnet18", num_classes=10)
    res = timing.throughput(cnn, batch_size=8, device="cuda", min_run_time=0.1, latency=False)
    assert res["env"]["channels_last"] is True
    assert cnn.conv1.weight.is_contiguous()  # the model is left as it was found


@gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_half_precision_compiled_speedup(precision):
    m = registry.apply(tiny_vit(), "topk").eval()
    base = registry.apply(tiny_vit(), "none").eval()
    res = timing.speedup(m, base, batch_size=16, device="cuda", precision=precision, min_run_time=0.2,
                          rounds=3, compile="default")
    assert res["compile_s"] > 0 and res["speedup"] > 0 and res["env"]["compile"] == "default"


@gpu
@needs_cuda
def test_cuda_batch_size_max_is_a_power_of_two_that_runs():
    m = registry.apply(tiny_vit(), "none").eval()
    b = memory.max_batch_size(m, "cuda", cap=256)
    assert b == 256  # a tiny model fits the cap
