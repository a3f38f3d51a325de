"""Per-image token counts (``ats``) through the whole harness.

A method whose token count depends on the image (``expected_tokens`` None) has its
matched-FLOPs search counted on real images of the sweep's data (with the run's weights),
its FLOPs record counted on the same images, and its timings run on a batch of real images;
each record says which input made it, and a number made on the random input warns.  Methods
with a declared schedule keep the random input and their keys.
"""

from __future__ import annotations

import json

import pytest

from conftest import register_tiny_timm, write_sweep
from tokenbench import inputs, sweep as S
from tokenbench.registry import get_method
from tokenbench.runner import Settings, measure_run, record_key_of, spec_dict
from tokenbench.store import Store

TINY = register_tiny_timm("tb_tiny_per_image_vit")
IMAGES = 4  # images a search and a sweep's FLOPs record count here (64 in use: each is one fvcore trace)


@pytest.fixture
def few_images(monkeypatch):
    monkeypatch.setattr(inputs, "SEARCH_IMAGES", IMAGES)


def tiny_sweep(tmp_path, methods: str, data: bool = True, measure=("flops",)) -> S.Sweep:
    return S.load_sweep(write_sweep(tmp_path / "s.toml", TINY, methods, out=tmp_path / "out", measure=measure,
                                    top="flops_targets = [0.7]", limit=16 if data else None, tables="""
        [throughput]
        batch_size = 4
        min_run_time = 0.01
        rounds = 3
        retries = 0
        latency = false
        """))


# --------------------------------------------------------------------------- the search

def test_search_counts_a_per_image_method_on_data(few_images):
    data = S.SearchData("synthetic", images=IMAGES)
    on_data = S.FlopsSearch(data=data)
    res = on_data.search(TINY, None, get_method("ats"), {}, "keep_rate", 0.7)
    assert res.input == {"source": "data", "data": "synthetic", "split": "test", "images": IMAGES, "seed": 0}
    assert res.warning is None and not res.miss
    # every count of the method names its images and weights; the dense count does not
    keys = [json.loads(k) for k in on_data.cache]
    assert all(k.get("input", {}).get("images") == IMAGES for k in keys if k["method"] == "ats")
    assert all("input" not in k for k in keys if k["method"] == "none")
    # the answer's FLOPs are the mean over those images, as `tokenbench flops --data` counts them
    s = Settings(data="synthetic", flops_on_data=True, flops_images=IMAGES)
    rec, _ = measure_run("flops", spec_dict(TINY, "ats", {"keep_rate": res.value}, False, None, None), s)
    assert rec["metrics"]["gflops"] == pytest.approx(res.gflops, rel=1e-12)
    assert rec["metrics"]["flops_images"] == IMAGES


def test_search_on_the_random_input_warns(few_images):
    res = S.FlopsSearch().search(TINY, None, get_method("ats"), {}, "keep_rate", 0.7)
    assert res.input == {"source": "random-input", "images": 1} and res.warning == inputs.SYNTHETIC_FLOPS
    assert res.as_dict()["warning"] == inputs.SYNTHETIC_FLOPS


def test_fixed_count_methods_search_as_before(few_images):
    """Data or not, a declared schedule is searched on the random input: same answer, same cache keys."""
    plain, with_data = S.FlopsSearch(), S.FlopsSearch(data=S.SearchData("synthetic", images=IMAGES))
    a = plain.search(TINY, None, get_method("topk"), {}, "keep_rate", 0.7)
    b = with_data.search(TINY, None, get_method("topk"), {}, "keep_rate", 0.7)
    assert a.as_dict() == b.as_dict() and "input" not in a.as_dict() and "warning" not in a.as_dict()
    assert set(plain.cache) == set(with_data.cache)


# --------------------------------------------------------------------------- sweeps: keys and records

def test_sweep_keys_say_which_input(tmp_path, few_images):
    sw = tiny_sweep(tmp_path, """
        [methods.ats]
        [methods.topk]
        """, measure=("flops", "throughput"))
    runs = S.expand(sw, S.FlopsSearch(data=S.search_data(sw)))
    by = {r.method: r for r in runs}
    assert by["ats"].per_image and not by["topk"].per_image and not by["none"].per_image
    assert by["ats"].search["input"]["source"] == "data"
    # fixed-count runs: the keys of the sweep's settings, as before
    for m in ("none", "topk"):
        spec = by[m].spec()
        spec["params"] = get_method(m).validate(spec["params"])
        assert S.run_keys(by[m], sw)["flops"] == record_key_of("flops", spec, sw.settings())[0]
        assert S.run_keys(by[m], sw)["throughput"] == record_key_of("throughput", spec, sw.settings())[0]
    s = S.run_settings(by["ats"], sw)
    assert s.flops_on_data and s.timing_on_data and s.flops_images == IMAGES
    spec = by["ats"].spec()
    spec["params"] = get_method("ats").validate(spec["params"])
    flops_kf = record_key_of("flops", spec, s)[1]
    assert flops_kf["data"] == "synthetic" and flops_kf["limit"] == IMAGES
    assert record_key_of("throughput", spec, s)[1]["input"]["images"] == 4   # the timing batch


def test_sweep_flops_record_equals_its_search(tmp_path, few_images):
    sw = tiny_sweep(tmp_path, "[methods.ats]\n")
    out, runs, keys, searcher = S.prepare(sw)
    steps = S.execute(sw, runs, Store(out))
    ats = next(r for r in runs if r.method == "ats")
    rec = Store(out).get(next(st.key for st in steps if st.run is ats))
    m = rec["metrics"]
    assert m["gflops"] == pytest.approx(ats.search["gflops"], rel=1e-12)
    assert m["input"]["source"] == "data" and m["flops_images"] == IMAGES
    assert m["tokens_per_image"]["images"] == IMAGES and inputs.SYNTHETIC_FLOPS not in m["warnings"]


def test_sweep_without_data_warns(tmp_path, few_images):
    sw = tiny_sweep(tmp_path, "[methods.ats]\n", data=False)
    out, runs, keys, searcher = S.prepare(sw)
    steps = S.execute(sw, runs, Store(out))
    ats = next(r for r in runs if r.method == "ats")
    assert ats.search["warning"] == inputs.SYNTHETIC_FLOPS
    rec = Store(out).get(next(st.key for st in steps if st.run is ats))
    assert inputs.SYNTHETIC_FLOPS in rec["metrics"]["warnings"]
    assert rec["metrics"]["input"] == {"source": "random-input", "images": 1}


# --------------------------------------------------------------------------- timings

def timing(method: str, **kw) -> dict:
    s = Settings(batch_size=4, device="cpu", threads=1, min_run_time=0.01, latency=False, retries=0, **kw)
    return measure_run("throughput", spec_dict(TINY, method, {}, False, None, None), s)[0]


def test_timing_on_data_is_recorded_and_keyed():
    rec = timing("ats", data="synthetic", timing_on_data=True)
    assert rec["metrics"]["input"] == {"source": "data", "data": "synthetic", "split": "test", "images": 4,
                                       "seed": 0}
    assert rec["key_fields"]["input"]["data"] == "synthetic" and rec["key_fields"]["input"]["images"] == 4
    assert rec["key"] != timing("ats")["key"]                # the random input: another record
    assert inputs.RANDOM_TIMING not in rec["metrics"]["warnings"]


def test_timing_a_per_image_method_on_the_random_input_warns():
    rec = timing("ats")
    assert inputs.RANDOM_TIMING in rec["metrics"]["warnings"]
    assert rec["metrics"]["input"] == {"source": "random-input", "images": 4}
    fixed = timing("topk")                                   # a declared schedule: as before
    assert "input" not in fixed["metrics"] and inputs.RANDOM_TIMING not in fixed["metrics"]["warnings"]


def test_timing_input_is_the_given_batch():
    import torch

    from tokenbench.measure.timed_forward import timing_input

    x = torch.randn(4, 3, 32, 32)
    assert timing_input(None, 4, None, torch.device("cpu"), x) is x
    with pytest.raises(ValueError):
        timing_input(None, 8, None, torch.device("cpu"), x)


# --------------------------------------------------------------------------- the token distribution

def test_flops_on_data_records_the_token_distribution(cli, tmp_path):
    args = ("flops", TINY, "--method", "ats", "--set", "keep_rate=0.5", "--data", "synthetic", "--limit", "6",
            "--results", str(tmp_path))
    code, out, err = cli(*args, "--json")
    assert code == 0, err
    d = json.loads(out)["tokens_per_image"]
    assert d["images"] == 6 and len(d["blocks"]) == len(d["blocks_mlp"]) == 12
    for b in d["blocks"] + d["blocks_mlp"]:
        assert b["min"] <= b["q10"] <= b["q25"] <= b["q50"] <= b["q75"] <= b["q90"] <= b["max"]
        assert b["min"] <= b["mean"] <= b["max"]
    assert sum(d["final_histogram"].values()) == 6
    assert min(map(int, d["final_histogram"])) == d["blocks_mlp"][-1]["min"]
    assert json.loads(out)["input"]["images"] == 6
    code, out, err = cli(*args)                                # the same record, as text
    assert code == 0, err
    assert "tokens per image entering each block (min / median / max)" in out
    assert "final token count (tokens: images)" in out


def test_token_distribution_by_hand():
    from tokenbench.measure.flop_count import token_distribution

    d = token_distribution([[5, 3], [5, 4], [5, 2]], [[3, 2], [4, 2], [2, 1]])
    assert d["blocks"][0] == {"mean": 5, "min": 5, "max": 5, "q10": 5, "q25": 5, "q50": 5, "q75": 5, "q90": 5}
    assert d["blocks"][1]["min"] == 2 and d["blocks"][1]["max"] == 4 and d["blocks"][1]["q50"] == 3
    assert d["final_histogram"] == {"1": 1, "2": 2}


def test_paired_speedup_on_data_times_both_models_on_the_images(monkeypatch):
    import torch

    from tokenbench.measure import timed_forward, timing
    from tokenbench.api import load

    seen = []
    real = timed_forward.timing_input

    def spy(model, batch_size, img_size, dev, given):
        seen.append(real(model, batch_size, img_size, dev, given))
        return seen[-1]

    monkeypatch.setattr(timing, "timing_input", spy)
    s = Settings(batch_size=4, device="cpu", threads=1, min_run_time=0.01, rounds=3, retries=0,
                 data="synthetic", timing_on_data=True)
    spec = spec_dict(TINY, "ats", {}, False, None, None)
    rec = measure_run("speedup", spec, s, baseline=spec_dict(TINY, "none", {}, False, None, None))[0]
    assert rec["metrics"]["input"]["source"] == "data" and rec["key_fields"]["input"]["images"] == 4
    images = inputs.data_images(load(TINY, "none", {})[0], "synthetic", "test", None, 4, 0)[0]
    assert len(seen) == 1 and torch.equal(seen[0], images)          # one batch, both models on it
