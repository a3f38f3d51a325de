"""Operators per forward and host time (tokenbench.measure.overhead), and the CUDA-graphs timing mode's refusals."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_vit
from tokenbench import registry
from tokenbench.errors import UserError
from tokenbench.measure.overhead import host_time_ms, operator_count


def deit_s_geometry(**kw):
    """DeiT-S's geometry (197 tokens, 12 blocks) at a tiny width: the same operators as DeiT-S."""
    return tiny_vit(img_size=224, patch_size=16, embed_dim=24, num_heads=2, **kw)


def test_dense_deit_s_dispatches_227_aten_operators_views_included():
    counts = operator_count(deit_s_geometry())
    assert counts["aten_ops"] == 227                     # timm's DeiT-S at batch 2, inference mode
    assert 0 < counts["aten_views"] < 227


def test_the_dense_surgery_adds_at_most_a_few_operators():
    model = registry.apply(deit_s_geometry(), "none")
    assert operator_count(model)["aten_ops"] <= 231


def test_tome_dispatches_no_more_operators_than_the_official_tome():
    """The official ToMe dispatches 825 aten operators per DeiT-S forward (r=16, batch 2)."""
    model = registry.apply(deit_s_geometry(), "tome", r=16)
    assert operator_count(model)["aten_ops"] <= 825


@pytest.mark.parametrize("name", sorted(registry.load_methods()))
def test_every_method_runs_an_empty_batch_for_its_host_time(name):
    if "vit" not in (registry.get_method(name).backbones or ("vit",)):
        pytest.skip("not a ViT method")
    model = registry.apply(tiny_vit(), name)
    out = host_time_ms(model, repeats=2, warmup=1)
    assert out["host_ms"] is not None and out["host_ms"] > 0, out.get("host_note")


class _RefusesEmpty(torch.nn.Module):
    """A user's method that asserts it has images (not one of the usual exceptions)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        assert x.shape[0] > 0, "no images"
        return self.lin(x.flatten(1)[:, :4])


def test_a_model_refusing_an_empty_batch_has_no_host_time_and_says_why(monkeypatch):
    from tokenbench.measure import overhead

    monkeypatch.setattr(overhead, "_input", lambda model, batch, img_size: torch.zeros(batch, 3, 4, 4))
    out = host_time_ms(_RefusesEmpty(), repeats=2, warmup=1)
    assert out["host_ms"] is None and out["host_note"] == "cannot run an empty batch: no images"


def test_cuda_graphs_refused_on_a_cpu_in_one_line(cli, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = cli("throughput", "deit_small_patch16_224", "--method", "tome", "--set", "r=13",
                         "--cuda-graphs")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "CUDA" in err


def test_cuda_graphs_refused_by_the_timing_on_a_cpu():
    from tokenbench.measure import timing

    with pytest.raises(UserError, match="CUDA"):
        timing.throughput(tiny_vit(), batch_size=2, device="cpu", cuda_graphs=True)


def test_cuda_graphs_in_a_sweep_file_is_read(tmp_path):
    from tokenbench.sweep.format import load_sweep

    f = tmp_path / "s.toml"
    f.write_text('name = "s"\nmodels = ["default"]\n[throughput]\ncuda_graphs = true\n[methods.none]\n')
    sw = load_sweep(str(f))
    assert sw.cuda_graphs and sw.settings().cuda_graphs
    f.write_text('name = "s"\nmodels = ["default"]\n[throughput]\ncuda_graphs = true\ncompile = true\n[methods.none]\n')
    with pytest.raises(UserError, match="cuda_graphs"):
        load_sweep(str(f))
