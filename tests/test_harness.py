"""The harness: the three measurements, the JSON contract, the record store."""

import gzip
import json
import struct

import numpy as np
import pytest
import torch

from conftest import tiny_vit
from tokenbench.measure import accuracy, env, flop_count, stats, timing
from tokenbench.errors import UserError


# --------------------------------------------------------------------------- FLOPs

def test_deit_flops_match_the_papers():
    """DeiT-T/S/B: 1.3 / 4.6 / 17.6 GFLOPs, attention matmuls counted under fused attention."""
    import timm

    for name, want in (("deit_tiny_patch16_224", 1.3), ("deit_small_patch16_224", 4.6),
                       ("deit_base_patch16_224", 17.6)):
        m = timm.create_model(name)
        assert round(flop_count.flops(m)["gflops"], 1) == want, name


def test_flops_counts_attention_by_hand(tiny):
    """Total = linear layers + the two attention matmuls + patch conv + norms, by hand."""
    f = flop_count.flops(tiny)
    n, c, d, heads = 65, 32, 12, 2
    hidden = 4 * c
    linear = d * n * (3 * c * c + c * c + 2 * c * hidden) + c * 10
    attn = d * 2 * n * n * c
    conv = 64 * (3 * 16) * c
    by = f["flops_by_operator"]
    assert by["linear"] * 1e9 == pytest.approx(linear)
    assert by["scaled_dot_product_attention"] * 1e9 == pytest.approx(attn)
    assert by["conv"] * 1e9 == pytest.approx(conv)
    assert f["tokens"] == [n] * d and f["tokens_mlp"] == [n] * d


def test_flops_restores_mode_and_outputs(tiny):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = tiny(x)
    tiny.train()
    flop_count.flops(tiny)
    assert tiny.training, "counting must restore training mode"
    tiny.eval()
    with torch.no_grad():
        after = tiny(x)
    assert torch.equal(before, after)


# --------------------------------------------------------------------------- throughput

def test_throughput_reports_the_protocol(tiny):
    r = timing.throughput(tiny, batch_size=4, device="cpu", min_run_time=0.05, warmup_s=0.01,
                           latency_samples=5, threads=1)
    for k in ("img_per_s", "img_per_s_q1", "img_per_s_q3", "latency_ms_p50", "latency_ms_p90", "peak_mem_mb"):
        assert r[k] > 0, k
    assert r["img_per_s_q1"] <= r["img_per_s"] <= r["img_per_s_q3"]
    assert r["latency_ms_p50"] <= r["latency_ms_p90"]
    assert r["trials"] >= 5 and r["env"]["threads"] == 1
    assert r["batch_size"] == 4 and r["device"] == "cpu" and r["precision"] == "fp32"
    assert "busy" in r["env"] and "load_avg" in r["env"]
    assert not tiny.training


def test_throughput_refuses_batch_that_cannot_fit(tiny):
    with pytest.raises(UserError, match="try --batch-size"):
        timing.throughput(tiny, batch_size=10**9, device="cpu")


def test_cuda_refused_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("machine has CUDA")
    with pytest.raises(UserError, match="CUDA is not available"):
        env.resolve_device("cuda")


# --------------------------------------------------------------------------- accuracy

def test_wilson_interval_known_values():
    lo, hi = stats.wilson_interval(90, 100)
    assert lo == pytest.approx(0.8256, abs=1e-3) and hi == pytest.approx(0.9448, abs=1e-3)
    lo, hi = stats.wilson_interval(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-3)


def test_mcnemar_exact():
    a = [True] * 10 + [False] * 2 + [True] * 5
    b = [False] * 10 + [True] * 2 + [True] * 5
    r = stats.mcnemar(a, b)
    assert (r["only_a"], r["only_b"]) == (10, 2)
    from scipy.stats import binomtest

    assert r["p_value"] == pytest.approx(binomtest(2, 12, 0.5).pvalue)


def test_evaluate_counts_correct_top1_top5():
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            # class = first pixel's label encoded in channel 0
            logits = torch.zeros(x.shape[0], 10)
            logits[torch.arange(x.shape[0]), x[:, 0, 0, 0].long()] = 1.0
            return logits

    xs = torch.zeros(20, 1, 4, 4)
    ys = torch.arange(20) % 10
    xs[:, 0, 0, 0] = ys.float()
    xs[:5, 0, 0, 0] = (ys[:5] + 1) % 10  # five wrong
    ds = torch.utils.data.TensorDataset(xs, ys)
    r = accuracy.evaluate(Fixed(), ds, batch_size=7)
    assert r["n"] == 20 and r["top1"] == 75.0
    assert r["correct"] == "0" * 5 + "1" * 15
    lo, hi = r["top1_ci95"]
    assert lo < 75 < hi


def test_stratified_subset_is_seeded_and_proportional():
    from tokenbench.data import stratified_subset

    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    a = stratified_subset(labels, 100, seed=1)
    b = stratified_subset(labels, 100, seed=1)
    c = stratified_subset(labels, 100, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    counts = torch.bincount(labels[a])
    assert counts.tolist() == [60, 30, 10]
    assert a.tolist() != list(range(100)), "never the first N"


def _write_idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 8, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def _fake_fmnist(d, n=40):
    rng = np.random.default_rng(0)
    for split, k in (("train", n), ("t10k", n)):
        _write_idx(d / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (k, 28, 28)))
        _write_idx(d / f"{split}-labels-idx1-ubyte.gz", np.arange(k) % 10)


def test_fashion_mnist_reader_and_corruption(tmp_path):
    from tokenbench.data import load_fashion_mnist

    _fake_fmnist(tmp_path)
    x, y = load_fashion_mnist("test", tmp_path)
    assert x.shape == (40, 28, 28) and x.dtype == torch.uint8 and y.tolist()[:3] == [0, 1, 2]
    p = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(p.read_bytes())
    with gzip.open(p, "wb") as f:
        f.write(raw[:-100])  # truncated payload
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_fashion_mnist("test", tmp_path)
    p.write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="cannot read"):
        load_fashion_mnist("test", tmp_path)


def test_fashion_mnist_missing_dir_and_wrong_layout(tmp_path):
    from tokenbench.data import load_fashion_mnist

    with pytest.raises(UserError, match="does not exist"):
        load_fashion_mnist("test", tmp_path / "nope")
    with pytest.raises(UserError, match="missing"):
        load_fashion_mnist("test", tmp_path)


# --------------------------------------------------------------------------- store

def test_record_written_reloaded_recognised(tmp_path):
    from tokenbench.runner import Settings, measure_run, spec_dict
    from tokenbench.store import Store

    store = Store(tmp_path)
    spec = spec_dict("deit_tiny_patch16_224", "none", {}, False, None, 32)
    rec, reused = measure_run("flops", spec, Settings(), store)
    assert not reused and store.path(rec["key"]).is_file()
    rec2, reused2 = measure_run("flops", spec, Settings(), store)
    assert reused2 and rec2["metrics"]["gflops"] == rec["metrics"]["gflops"]
    assert rec["schema_version"] == 1 and "commit" in rec["meta"] and "host" in rec["meta"]
    # provenance outside the key: the key does not change with time or host
    assert "host" not in rec["key_fields"] and "weights" in rec["key_fields"]


def test_damaged_record_set_aside(tmp_path):
    from tokenbench.store import Store, make_record

    store = Store(tmp_path)
    rec = make_record("flops", {"a": 1}, {"model": "m"}, {"gflops": 1.0})
    p = store.put(rec)
    text = p.read_text()
    p.write_text(text.replace('"gflops": 1.0', '"gflops": 2.0'))  # parses, but tampered
    with pytest.warns(UserWarning, match="damaged record"):
        assert store.records() == []
    assert not p.exists() and any((tmp_path / "quarantine").iterdir())
    p2 = store.put(rec)
    p2.write_text(text[: len(text) // 2])  # half-written
    with pytest.warns(UserWarning):
        assert store.records() == []


# --------------------------------------------------------------------------- CLI JSON contract

def test_cli_flops_json(cli):
    code, out, err = cli("flops", "deit_tiny_patch16_224", "--img-size", "64", "--json")
    assert code == 0, err
    obj = json.loads(out)
    for k in ("gflops", "params_m", "tokens", "tokens_mlp", "model", "method", "params", "env"):
        assert k in obj
    assert obj["tokens"] == [17] * 12
    for k in ("device", "cpu", "torch", "timm", "threads", "load_avg"):
        assert k in obj["env"]


def test_cli_throughput_json(cli):
    code, out, err = cli("throughput", "deit_tiny_patch16_224", "--img-size", "32", "-b", "2",
                         "--min-run-time", "0.05", "--threads", "1", "--json")
    assert code == 0, err
    obj = json.loads(out)
    for k in ("img_per_s", "img_per_s_q1", "img_per_s_q3", "latency_ms_p50", "latency_ms_p90", "peak_mem_mb",
              "batch_size", "device", "precision", "model", "method", "params", "env"):
        assert k in obj, k
    code, out, err = cli("throughput", "deit_tiny_patch16_224", "--img-size", "32", "-b", "1,2",
                         "--min-run-time", "0.05", "--threads", "1", "--json")
    assert code == 0, err
    obj = json.loads(out)
    assert [r["batch_size"] for r in obj["results"]] == [1, 2]


def test_cli_eval_json_synthetic(cli, tmp_path):
    code, out, err = cli("eval", "deit_tiny_patch16_224", "--data", "synthetic", "--limit", "8", "--json",
                         "--results", str(tmp_path))
    assert code == 0, err
    obj = json.loads(out)
    for k in ("top1", "top1_ci95", "top5", "n", "model", "method", "params", "env"):
        assert k in obj
    assert obj["n"] == 8 and len(obj["top1_ci95"]) == 2
    assert len(list((tmp_path / "records").glob("*.json"))) == 1


def test_cli_bad_input_one_line(cli):
    code, out, err = cli("flops", "not_a_model_at_all")
    assert code == 2 and err.strip().count("\n") == 0 and "unknown model" in err
    code, out, err = cli("flops", "deit_tiny_patch16_224", "--method", "tomee")
    assert code == 2 and "did you mean 'tome'" in err
    code, out, err = cli("flops", "deit_tiny_patch16_224", "--set", "oops")
    assert code == 2 and "KEY=VALUE" in err


def test_set_values_are_json():
    from tokenbench.registry import parse_set

    assert parse_set(["r=[8,8,4]", "keep_rate=0.5", "fuse_token=false", "name=abc"]) == \
        {"r": [8, 8, 4], "keep_rate": 0.5, "fuse_token": False, "name": "abc"}


def test_small_slips_get_a_precise_line(cli, tmp_path):
    # a method's name in capitals, a selector without its value, a file given as a results folder,
    # --markdown with one method, a dense dataset with a classification command's hint
    a_file = tmp_path / "f"
    a_file.write_text("")
    cases = ((["flops", "default", "--method", "TOME"], "did you mean 'tome'"),
             (["compare", "results/default", "topk:keep_rate", "none"], "'keep_rate' is not KEY=VALUE"),
             (["report", str(a_file)], "is a file, not a directory"),
             (["list", "tome", "--markdown"], "takes no METHOD"),
             (["eval", "default", "--data", "fashion-mnist-scene"], "did you mean 'fashion-mnist-scenes'"))
    for args, said in cases:
        code, _, err = cli(*args)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and said in err, (args, err)


def test_an_embedded_model_at_its_own_size_is_the_same_spec_as_no_size(cli):
    from tokenbench.runner import spec_dict

    assert spec_dict("default", "none", {}, False, None, 28) == spec_dict("default", "none", {}, False, None, None)
    assert spec_dict("default", "none", {}, False, None, 56)["img_size"] == 56  # refused when measured, not hidden
    keys = []
    for extra in ([], ["--img-size", "28"]):
        code, out, err = cli("flops", "default", *extra, "--json")
        assert code == 0, err
        d = json.loads(out)
        keys.append((d[0] if isinstance(d, list) else d)["key"])
    assert keys[0] == keys[1]
