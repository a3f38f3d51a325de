"""torch.compile: every method compiles as one graph, and compiled timings are recorded apart.

The per-method check uses the ``eager`` backend: dynamo's graph capture, where graph breaks
happen, without AOTAutograd or a C++ compile (a third of ``aot_eager``'s time), to stay within
the suite's time; one test compiles through inductor, the default backend (AOTAutograd too).
"""

import json
import time

import pytest
import torch

from conftest import random_images, register_tiny_timm, tiny_vit
from tokenbench import backbones, registry, runner
from tokenbench.measure import compilation, flop_count, timed_forward, timing


def _compiled_equals_eager(name: str, backend: str, **model_kw) -> tuple[list[float], list[int]]:
    """Compile ``name`` on a tiny ViT; the logits must equal the eager ones.  Returns the
    eager forward's token count per block.  A method with static token counts must compile as
    one graph; one whose counts vary per image (no declared schedule) may break the graph.
    Also returns the dense model's token count per block."""
    from tokenbench.errors import UserError

    torch._dynamo.reset()
    try:
        m = registry.apply(tiny_vit(**model_kw), name).eval()
    except UserError:  # default schedules written for 12 blocks (diffrate's per-block counts)
        m = registry.apply(tiny_vit(), name).eval()
    cls = registry.get_method(name)
    static = cls().expected_tokens(m, **cls.defaults()) is not None
    x = random_images(m, 2)
    tokens, _ = flop_count.token_counts(m, x=x)
    with torch.inference_mode():
        ref = m(x)
        out = torch.compile(m, backend=backend, fullgraph=static, dynamic=False)(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    return tokens, backbones.backbone_of(m).dense_tokens()


@pytest.mark.parametrize("name", sorted(registry.load_methods()))
def test_every_method_compiles_without_graph_breaks(name):
    # fullgraph=True raises on the first graph break.  Four blocks hold the same three reduction
    # sites as twelve (blocks 1, 2, 3: the quarter points) at a third of the tracing time.
    tokens, dense = _compiled_equals_eager(name, "eager", depth=4)
    cls = registry.get_method(name)
    if cls.reduces(cls.defaults()):  # the compiled graph holds the method's reductions (a resized input: from the start)
        assert tokens[-1] < dense[0], tokens


def test_inductor_compiles_tome():
    # inductor builds C++ kernels per block shape, and ToMe's shapes change in every block: two
    # blocks (both merging) hold the same operators as twelve and keep it within the suite's time
    tokens, _ = _compiled_equals_eager("tome", "inductor", depth=2)
    assert tokens[0] > tokens[1], tokens


def test_every_method_declares_how_it_compiles():
    for name, cls in registry.load_methods().items():
        assert cls.compile_note, name
    assert registry.get_method("tome").compile_note == "static token counts: fullgraph"


def test_compile_mode_is_checked():
    assert compilation.compile_mode(None) is None and compilation.compile_mode(False) is None
    assert compilation.compile_mode(True) == "default"
    assert compilation.compile_mode("max-autotune") == "max-autotune"
    with pytest.raises(Exception, match="unknown compile mode"):
        compilation.compile_mode("fastest")


def test_compile_enters_the_timing_keys_only_when_set():
    spec = runner.spec_dict("vit_tiny_patch16_224", "tome", {"r": 2, "prop_attn": True}, False, None, None)
    eager = runner.key_fields("throughput", spec, "w", runner.Settings(device="cpu"))
    comp = runner.key_fields("throughput", spec, "w", runner.Settings(device="cpu", compile="default"))
    auto = runner.key_fields("throughput", spec, "w", runner.Settings(device="cpu", compile="max-autotune"))
    assert "compile" not in eager and comp["compile"] == "default" and auto["compile"] == "max-autotune"
    dense = runner.spec_dict("vit_tiny_patch16_224", "none", {}, False, None, None)
    sp = runner.key_fields("speedup", spec, "w", runner.Settings(device="cpu", compile="default"), baseline=dense)
    assert sp["compile"] == "default"
    assert "compile" not in runner.key_fields("flops", spec, "w", runner.Settings(compile="default"))


class _SlowFirstCall:
    """A stand-in compiler: the first call of the compiled model sleeps (its 'compile')."""

    def __init__(self, seconds: float):
        self.seconds, self.calls = seconds, 0

    def __call__(self, model, mode):
        def run(x):
            self.calls += 1
            if self.calls == 1:
                time.sleep(self.seconds)
            return model(x)
        return run if mode else model


def test_compile_time_is_reported_apart_from_the_timing(monkeypatch):
    fake = _SlowFirstCall(1.0)
    monkeypatch.setattr(timed_forward, "compiled", fake)
    m = registry.apply(tiny_vit(), "topk").eval()
    res = timing.throughput(m, batch_size=2, device="cpu", threads=1, min_run_time=0.05, warmup_s=0.01,
                             latency=False, compile="default")
    assert res["compile_s"] >= 1.0 and res["compile"] == "default" and res["env"]["compile"] == "default"
    # the sleep was not in any timed block: every block ran faster than one sleep per batch
    assert res["img_per_s_q1"] > 2 / 1.0
    eager = timing.throughput(m, batch_size=2, device="cpu", threads=1, min_run_time=0.05, warmup_s=0.01,
                               latency=False)
    assert "compile_s" not in eager and eager["env"]["compile"] is None


def test_paired_speedup_compiles_both_models(monkeypatch):
    seen = []
    monkeypatch.setattr(timed_forward, "compiled", lambda model, mode: seen.append((model, mode)) or model)
    m = registry.apply(tiny_vit(), "topk").eval()
    base = registry.apply(tiny_vit(), "none").eval()
    res = timing.speedup(m, base, batch_size=2, device="cpu", threads=1, min_run_time=0.05, rounds=3,
                          warmup_s=0.01, compile="default")
    assert {id(n) for n, _ in seen} == {id(m), id(base)} and {mode for _, mode in seen} == {"default"}
    assert "compile_s" in res and "baseline_compile_s" in res and res["env"]["compile"] == "default"


def test_a_compiled_speedups_graphs_are_the_methods_own(monkeypatch):
    monkeypatch.setattr(timed_forward, "compiled",
                        lambda model, mode: torch.compile(model, backend="eager", dynamic=False) if mode else model)
    m = registry.apply(tiny_vit(depth=2), "tome", r=1).eval()
    base = registry.apply(tiny_vit(depth=2), "none").eval()
    res = timing.speedup(m, base, batch_size=2, device="cpu", threads=1, min_run_time=0.05, rounds=3,
                          warmup_s=0.01, compile="default")
    # the method's own count, as timing it alone gives it, not the two models' together
    alone = timing.throughput(m, batch_size=2, device="cpu", threads=1, min_run_time=0.02, warmup_s=0.01,
                              latency=False, compile="default")
    assert (res["graphs"], res["graph_breaks"]) == (alone["graphs"], alone["graph_breaks"]) == (1, 0)
    assert res["baseline_graph_breaks"] == 0 and res["baseline_graphs"] >= 1


def test_cli_compiled_throughput_is_recorded_and_reused(cli, tmp_path, monkeypatch):
    real = compilation.compiled
    monkeypatch.setattr(timed_forward, "compiled",
                        lambda model, mode: torch.compile(model, backend="eager", dynamic=False) if mode
                        else real(model, mode))
    name = register_tiny_timm("tiny_compile_vit", depth=4)  # topk's three sites, a third of the graph
    args = ["throughput", name, "--method", "topk", "--compile", "-b", "2", "--min-run-time", "0.05",
            "--threads", "1", "--results", str(tmp_path), "--json"]
    code, out, err = cli(*args)
    assert code == 0, err
    first = json.loads(out)
    assert first["compile"] == "default" and first["compile_s"] > 0
    assert first["compile_note"] == "static token counts: fullgraph" and first["env"]["compile"] == "default"
    assert first["graph_breaks"] == 0 and first["graphs"] >= 1  # one graph, really compiled
    assert first["reused"] is False and first["recorded_in"] == str(tmp_path)
    calls, timed = [], timing.throughput
    monkeypatch.setattr(timing, "throughput", lambda *a, **k: calls.append(1) or timed(*a, **k))
    code, out, err = cli(*args)
    assert code == 0 and not calls, err                         # nothing timed: read from the store
    again = json.loads(out)
    assert again["reused"] is True and again["key"] == first["key"] and again["img_per_s"] == first["img_per_s"]
    code, out, err = cli(*[a for a in args if a not in ("--results", str(tmp_path))])
    assert code == 0 and calls and json.loads(out)["recorded_in"] is None    # no --results: measured, not kept
    code, out, err = cli(*args[:-1], "--compile-mode", "fastest")
    assert code == 2 and "unknown compile mode" in err
    code, out, err = cli(*[a for a in args if a != "--compile"], "--compile-mode", "default")   # implies --compile
    assert code == 0 and json.loads(out)["key"] == first["key"], err


def test_sweep_compile_setting():
    from tokenbench import sweep as S

    base = {"name": "t", "models": ["vit_tiny_patch16_224"], "measure": ["throughput"], "methods": {"none": {}}}
    assert S.parse_sweep(base).settings().compile is None
    assert S.parse_sweep({**base, "throughput": {"compile": True}}).settings().compile == "default"
    assert S.parse_sweep({**base, "throughput": {"compile": "max-autotune"}}).compile == "max-autotune"
    for bad in ("fastest", 3):
        with pytest.raises(Exception, match="compile"):
            S.parse_sweep({**base, "throughput": {"compile": bad}})


def test_a_retry_reuses_the_first_attempts_compilation(monkeypatch):
    flags = []

    def fake(net, **kw):
        flags.append(kw["fresh_compile"])
        return {"img_per_s": 1.0, "spread": 0.0, "spread_flag": False, "compile_s": 9.0 if kw["fresh_compile"] else 0.1,
                "env": {"busy": True}}  # busy: taken again

    monkeypatch.setattr(timing, "throughput", fake)
    from tokenbench.measure import busy

    monkeypatch.setattr(busy, "still_busy", lambda: None)   # the load dropped: each retry is taken
    spec = runner.spec_dict("tiny_retry_vit", "none", {}, False, None, None)
    register_tiny_timm("tiny_retry_vit")
    rec, _ = runner.measure_run("throughput", spec, runner.Settings(device="cpu", compile="default", retries=2))
    assert flags == [True, False, False] and rec["metrics"]["compile_s"] == 9.0
