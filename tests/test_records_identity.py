"""Records know which code, data and settings made them.

An edited method gives a new key, two image folders give two accuracy records, a record
of an older protocol is stale in the report and measured again by the sweep, speedups
are paired timings, and the measurements leave models and the process as they found them.
"""

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import register_tiny_timm, tiny_vit

TINY = register_tiny_timm("tb_tiny_ident_vit")


@pytest.fixture
def plugins():
    """Methods registered by a test are unregistered after it (other tests list every method)."""
    from tokenbench import registry

    before = dict(registry.load_methods())
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)


def _plugin(tmp_path: Path, name: str, body: str):
    """Load a method file from ``tmp_path`` as a plugin package's module."""
    import importlib.util
    import sys

    from tokenbench import registry

    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    mod_name = f"tb_plugin_{name}"
    sys.modules.pop(mod_name, None)
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return registry.get_method(name)


PLUGIN = """
from tokenbench.backbones import prepare
from tokenbench.registry import Method, Param, register


@register
class Halve(Method):
    name = "tb_halve"
    version = "1"
    params = (Param("keep_rate", "float", 0.5, "fraction kept", min=0.0, max=1.0, min_exclusive=True),)

    def apply(self, model, keep_rate=0.5, **params):
        plan = prepare(model, self.name)

        def hook(block, x, st, info):
            k = max(1, int((x.shape[1] - st.n_prefix) * keep_rate))  # EDIT-ME
            idx = __import__("torch").arange(st.n_prefix + k, device=x.device).expand(x.shape[0], -1)
            return st.keep(x, idx)

        plan.mid[6] = hook
        return model
"""


def test_an_edited_method_file_gives_a_new_key_and_a_new_measurement(tmp_path, plugins):
    from tokenbench.runner import Settings, measure_run, spec_dict
    from tokenbench.store import Store

    store = Store(tmp_path / "res")
    spec = spec_dict(TINY, "tb_halve", {"keep_rate": 0.5}, False, None, None)
    _plugin(tmp_path, "tb_halve", PLUGIN)
    rec1, reused1 = measure_run("flops", spec, Settings(), store)
    again, reused_again = measure_run("flops", spec, Settings(), store)
    assert not reused1 and reused_again and again["key"] == rec1["key"]
    # the same method, its source edited (it now keeps a quarter): a new key, measured anew
    _plugin(tmp_path, "tb_halve", PLUGIN.replace("* keep_rate))  # EDIT-ME", "* keep_rate / 2))"))
    rec2, reused2 = measure_run("flops", spec, Settings(), store)
    assert not reused2 and rec2["key"] != rec1["key"]
    assert rec2["metrics"]["gflops"] < rec1["metrics"]["gflops"]
    assert rec2["key_fields"]["code"]["source"] != rec1["key_fields"]["code"]["source"]
    # a declared version bump alone changes the key too
    _plugin(tmp_path, "tb_halve", PLUGIN.replace('version = "1"', 'version = "2"'))
    rec3, reused3 = measure_run("flops", spec, Settings(), store)
    assert not reused3 and rec3["key"] not in (rec1["key"], rec2["key"])


def test_the_shared_surgery_is_part_of_every_methods_code(tmp_path):
    from tokenbench import identity
    from tokenbench.registry import get_method

    for name in ("none", "topk", "tome"):
        files = [p.name for p in identity.source_files(get_method(name))]
        assert f"{name}.py" in files and "vit.py" in files and "base.py" in files and "tokens.py" in files


def test_a_model_familys_backbone_file_enters_only_the_methods_that_declare_it():
    from tokenbench import identity
    from tokenbench.registry import get_method

    assert "convnext.py" not in [p.name for p in identity.source_files(get_method("tome"))]  # ViT only
    assert "convnext.py" in [p.name for p in identity.source_files(get_method("none"))]      # every family


def _keys_with(monkeypatch, copies: dict) -> dict:
    """Every built-in method's source hash, with the files named in ``copies`` (real path -> copy)
    read from their copies."""
    from tokenbench import identity
    from tokenbench.registry import load_methods

    own, shared = getattr(identity, "_own_file", lambda cls: None), identity._backbone_files

    def swap(p):
        return copies.get(Path(p).resolve(), p)

    monkeypatch.setattr(identity, "_own_file", lambda cls: swap(own(cls)), raising=False)
    monkeypatch.setattr(identity, "_backbone_files", lambda cls: [swap(f) for f in shared(cls)])
    return {name: identity.source_hash(cls) for name, cls in load_methods().items()}


def _copy_methods(tmp_path: Path) -> dict:
    """A copy of the method files (so that their imports of one another resolve among the copies)."""
    from tokenbench import identity
    from tokenbench.registry import load_methods

    out = {}
    folder = identity._own_file(load_methods()["tome"]).parent
    (tmp_path / "methods").mkdir()
    for real in folder.glob("*.py"):
        copy = tmp_path / "methods" / real.name
        copy.write_text(real.read_text())
        out[real.resolve()] = copy
    return out


def test_comments_and_docstrings_of_the_shared_surgery_change_no_key(tmp_path, monkeypatch):
    from tokenbench import identity

    real = (identity.SURGERY / "tokens.py").resolve()
    copy = tmp_path / "tokens.py"
    text = real.read_text()
    copy.write_text(text)
    before = _keys_with(monkeypatch, {real: copy})
    assert text.startswith('"""')
    copy.write_text('"""A docstring, reworded."""' + text[text.index('"""', 3) + 3:]
                    .replace("\ndef ", "\n# a comment, added\n\n\ndef ", 1) + "\n# trailing remark\n")
    assert _keys_with(monkeypatch, {real: copy}) == before
    copy.write_text(text + "\nSHARED_CONSTANT = 1\n")  # a change of code changes every method's key
    after = _keys_with(monkeypatch, {real: copy})
    assert all(after[n] != before[n] for n in before)


def test_editing_a_method_file_changes_its_key_and_no_other_methods(tmp_path, monkeypatch):
    from tokenbench.identity import source_files as identity_files
    from tokenbench.registry import load_methods

    copies = _copy_methods(tmp_path)
    before = _keys_with(monkeypatch, copies)
    assert len(set(before.values())) == len(before) == len(load_methods())
    topk = tmp_path / "methods" / "topk.py"
    text = topk.read_text()
    topk.write_text(text.replace('"""', '"""Reworded. ', 1) + "\n# a closing comment\n")  # docstring and comment
    assert _keys_with(monkeypatch, copies) == before
    topk.write_text(text + "\nEDITED = 1\n")  # code
    after = _keys_with(monkeypatch, copies)
    assert [n for n in before if after[n] != before[n]] == ["topk"]
    # a method whose functions others import changes their keys too, and only theirs
    tome = tmp_path / "methods" / "tome.py"
    tome.write_text(tome.read_text() + "\nEDITED = 1\n")
    changed = {n for n, k in _keys_with(monkeypatch, copies).items() if k != after[n]}
    importers = {n for n, cls in load_methods().items()
                 if n != "tome" and "tome.py" in [f.name for f in identity_files(cls)]}
    assert {"tofu", "ppt"} <= importers and len(importers) < len(before) - 1
    assert changed == {"tome"} | importers


def _folder(root: Path, classes: dict[str, int], size: int = 8, seed: int = 0) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for c, n in classes.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def test_two_image_folders_give_two_accuracy_records(tmp_path):
    from tokenbench.runner import Settings, measure_run, spec_dict
    from tokenbench.store import Store

    classes = {f"c{i}": 2 for i in range(10)}
    a = _folder(tmp_path / "A", classes, seed=0)
    b = _folder(tmp_path / "B", classes, seed=1)
    store = Store(tmp_path / "res")
    spec = spec_dict(TINY, "none", {}, False, None, None)
    ra, _ = measure_run("accuracy", spec, Settings(data="folder", data_dir=str(a), device="cpu"), store)
    rb, reused = measure_run("accuracy", spec, Settings(data="folder", data_dir=str(b), device="cpu"), store)
    assert not reused and ra["key"] != rb["key"]
    assert ra["key_fields"]["data_id"] != rb["key_fields"]["data_id"]
    # the same images elsewhere are the same data: reused
    import shutil

    shutil.copytree(a, tmp_path / "A2")
    rc, reused_c = measure_run("accuracy", spec, Settings(data="folder", data_dir=str(tmp_path / "A2"),
                                                          device="cpu"), store)
    assert reused_c and rc["key"] == ra["key"]


def test_fashion_mnist_identity_is_the_files_checksums(tmp_path):
    from tokenbench import identity

    src = Path("/usr/share/datasets/fashion-mnist")
    if not src.is_dir():
        pytest.skip("Fashion-MNIST not installed")
    d = tmp_path / "fm"
    d.mkdir()
    for p in src.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    a = identity.data_fingerprint("fashion-mnist", "test", str(d))
    assert a == identity.data_fingerprint("fashion-mnist", "test", str(src))
    labels = d / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes() + b"\0")
    assert identity.data_fingerprint("fashion-mnist", "test", str(d)) != a


# --------------------------------------------------------------------------- stale records

def _old_protocol(store, rec: dict) -> dict:
    """Rewrite ``rec`` as if an older protocol had written it (its key then differs too)."""
    from tokenbench.store import record_key

    old = json.loads(json.dumps(rec))
    store.path(rec["key"]).unlink()
    old["key_fields"]["protocol"] = 0
    old["key"] = record_key({"kind": old["kind"], **old["key_fields"]})
    old.pop("checksum", None)
    store.put(old)
    return old


def test_a_record_of_an_older_protocol_is_stale_in_the_report_and_measured_again(tmp_path, cli):
    from tokenbench.sweep import read_plan
    from tokenbench.store import Store

    out = tmp_path / "sw"
    args = ("run", "--model", TINY, "--method", "topk", "--set", "keep_rate=0.5", "--measure", "flops",
            "--out", str(out), "--json")
    code, stdout, err = cli(*args)
    assert code == 0, err
    store = Store(out)
    plan = read_plan(out)
    topk_key = next(r["keys"]["flops"] for r in plan["runs"] if r["method"] == "topk")
    old = _old_protocol(store, store.get(topk_key))
    # the plan now points at the old record (as after a checkout of older results)
    raw = json.loads((out / "sweep.json").read_text())
    for r in raw["runs"]:
        if r["method"] == "topk":
            r["keys"]["flops"] = old["key"]
    (out / "sweep.json").write_text(json.dumps(raw))

    code, stdout, err = cli("report", str(out), "--json")
    assert code == 0, err
    res = json.loads(stdout)
    topk = next(r for r in res["rows"] if r["method"] == "topk")
    assert "stale" in topk["flags"]
    assert any("1 of 2 runs are stale" in n and "protocol 0" in n for n in res["notes"]), res["notes"]
    assert "stale" in (out / "results.md").read_text()

    code, stdout, err = cli(*args)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["measured"] == 1 and summary["reused"] == 1
    assert not any("stale" in (r["flags"] or "") for r in summary["rows"])


def test_records_without_code_identity_are_stale():
    from tokenbench.identity import stale_reasons

    assert stale_reasons({"kind": "flops", "key_fields": {"method": "none"}})
    from tokenbench.identity import PROTOCOLS, method_code
    from tokenbench.registry import get_method

    current = {"kind": "flops", "key_fields": {"method": "none", "protocol": PROTOCOLS["flops"],
                                               "code": method_code(get_method("none"))}}
    assert stale_reasons(current) == []


def test_the_flops_search_cache_carries_the_code_identity(tmp_path):
    from tokenbench.sweep import FlopsSearch

    fs = FlopsSearch(tmp_path / "cache.json")
    fs.count(TINY, None, "topk", {"keep_rate": 0.5})
    key = next(iter(json.loads((tmp_path / "cache.json").read_text())["gflops"]))
    assert '"code"' in key and '"protocol"' in key


# --------------------------------------------------------------------------- the reference store

def test_records_of_a_reference_directory_are_copied_not_measured(tmp_path):
    from tokenbench.runner import Settings, measure_run, spec_dict
    from tokenbench.store import Store

    ref, mine = Store(tmp_path / "ref"), Store(tmp_path / "mine")
    spec = spec_dict(TINY, "topk", {"keep_rate": 0.5}, False, None, None)
    rec, _ = measure_run("flops", spec, Settings(), ref)
    before = sorted(p.read_bytes() for p in (tmp_path / "ref").rglob("*.json"))
    got, reused = measure_run("flops", spec, Settings(), mine, reference=ref)
    assert reused and got == ref.get(rec["key"]) == mine.get(rec["key"])
    assert {k: v for k, v in got.items() if k != "checksum"} == rec
    assert sorted(p.read_bytes() for p in (tmp_path / "ref").rglob("*.json")) == before


# --------------------------------------------------------------------------- timing

def test_speedup_is_a_paired_timing_against_the_dense_model():
    from tokenbench.measure import timing
    from tokenbench.registry import apply

    dense = tiny_vit()
    reduced = apply(tiny_vit(), "topk", keep_rate=0.5)
    res = timing.speedup(reduced, dense, batch_size=4, device="cpu", threads=1, min_run_time=0.2, rounds=4,
                          warmup_s=0.05)
    assert res["rounds"] == 4 and res["speedup_q1"] <= res["speedup"] <= res["speedup_q3"]
    assert res["img_per_s"] > 0 and res["baseline_img_per_s"] > 0
    assert "other_cores" in res["env"] or "load_avg" in res["env"]
    with pytest.raises(Exception, match="at least 3 rounds"):
        timing.speedup(reduced, dense, batch_size=2, device="cpu", threads=1, rounds=2)


def test_busy_or_noisy_timings_are_taken_again_and_the_calmest_kept():
    from tokenbench.runner import timed_with_retries

    results = iter([
        {"spread": 0.5, "spread_flag": True, "env": {"busy": True}},
        {"spread": 0.3, "spread_flag": True, "env": {"busy": False}},
        {"spread": 0.02, "spread_flag": False, "env": {"busy": False}},
    ])
    got = timed_with_retries(lambda: next(results), retries=5)
    assert got["attempts"] == 3 and got["spread"] == 0.02
    stays = iter([{"spread": s, "spread_flag": True, "env": {"busy": False}} for s in (0.4, 0.2, 0.3)])
    got = timed_with_retries(lambda: next(stays), retries=2)
    assert got["attempts"] == 3 and got["spread"] == 0.2 and got["spread_flag"]  # the flag is kept


def test_threads_default_to_the_cpus_this_process_may_use(monkeypatch):
    from tokenbench.measure import env
    from tokenbench.runner import Settings, key_fields, spec_dict

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert env.default_threads() == 1
    kf = key_fields("throughput", spec_dict(TINY, "none", {}, False, None, None), "w", Settings(device="cpu"))
    assert kf["threads"] == 1


def test_a_throughput_without_its_latency_is_not_reused_where_one_is_asked_for(tmp_path, monkeypatch):
    from tokenbench import runner
    from tokenbench.measure import timing
    from tokenbench.store import Store

    asked = []

    def fake(net, **kw):
        asked.append(kw["latency"])
        lat = {"latency_ms_p50": 1.0, "latency_ms_p90": 2.0} if kw["latency"] else {}
        return {"img_per_s": 10.0, "spread": 0.0, "spread_flag": False, "env": {"busy": False}, **lat}

    monkeypatch.setattr(timing, "throughput", fake)
    spec = runner.spec_dict(TINY, "none", {}, False, None, None)
    store = Store(tmp_path)
    quick = dict(device="cpu", threads=1, retries=0)
    without, _ = runner.measure_run("throughput", spec, runner.Settings(latency=False, **quick), store)
    with_, reused = runner.measure_run("throughput", spec, runner.Settings(latency=True, **quick), store)
    assert asked == [False, True] and not reused and with_["metrics"]["latency_ms_p50"] == 1.0
    assert without["key_fields"]["latency"] is False and "latency" not in with_["key_fields"]  # default keys unchanged
    _, reused = runner.measure_run("throughput", spec, runner.Settings(latency=False, **quick), store)
    assert reused and asked == [False, True]
    sp = runner.key_fields("speedup", spec, "w", runner.Settings(latency=False, **quick), baseline=spec)
    assert "latency" not in sp                                  # a speedup never times latency


def test_tf32_matmuls_key_an_fp32_cuda_timing_apart(monkeypatch):
    import torch

    from tokenbench import runner
    from tokenbench.measure import env

    monkeypatch.setattr(env, "resolve_device", lambda d="auto": torch.device(d if d != "auto" else "cpu"))
    monkeypatch.setattr(env, "env_info", lambda dev, *a: {"device_name": f"{dev.type} X"})
    spec = runner.spec_dict(TINY, "none", {}, False, None, None)
    key = lambda **kw: runner.key_fields("throughput", spec, "w", runner.Settings(**kw))
    assert not torch.backends.cuda.matmul.allow_tf32
    assert "tf32" not in key(device="cuda", precision="fp32")                # the default: keys unchanged
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert key(device="cuda", precision="fp32")["tf32"] is True
        assert "tf32" not in key(device="cuda", precision="fp16") and "tf32" not in key(device="cpu")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


def test_peak_memory_is_per_measurement_not_per_process():
    from tokenbench.measure import memory, timing

    if memory._status_kb("VmHWM") is None:
        pytest.skip("no /proc/self/status")
    big = torch.ones(64, 1024, 1024)  # 256 MiB held, then released before the measurement
    del big
    lifetime = memory._status_kb("VmHWM") / 1024  # the process's high-water mark, the big tensor in it
    res = timing.throughput(tiny_vit(), batch_size=2, device="cpu", threads=1, min_run_time=0.05,
                             warmup_s=0.01, latency=False)
    assert res["peak_mem_mb"] < lifetime - 100, (res["peak_mem_mb"], lifetime)
    assert "during the measurement" in res["peak_mem_kind"]


def test_gpu_settings_and_attention_kernel_are_recorded():
    from tokenbench.measure import env

    info = env.gpu_settings()
    assert {"float32_matmul_precision", "tf32_matmul", "cudnn_benchmark", "sdpa_enabled"} <= set(info)
    m = tiny_vit()
    assert env.attention_kernel(m) in ("sdpa", "explicit")
    for blk in m.blocks:
        blk.attn.fused_attn = False
    assert env.attention_kernel(m) == "explicit"


def test_flops_leaves_a_plain_timm_model_as_it_found_it():
    import tokenbench
    from timm.models.vision_transformer import Block, VisionTransformer

    m = tiny_vit()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    tokenbench.flops(m)
    assert type(m) is VisionTransformer and all(type(b) is Block for b in m.blocks)
    assert not [k for k in vars(m) if k.startswith("_tb")]
    assert all(not k.startswith("_tb") for b in m.blocks for k in vars(b))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


# --------------------------------------------------------------------------- a user's run beside the reference

def _tiny_sweep_file(tmp_path: Path, out: Path, reference: Path = None) -> Path:
    ref = f'reference = "{reference}"\n' if reference else ""
    p = tmp_path / f"sw-{out.name}.toml"
    p.write_text(f'name = "tiny"\nout = "{out}"\n{ref}models = ["{TINY}"]\nmeasure = ["flops", "throughput"]\n'
                 'device = "cpu"\n[throughput]\nbatch_size = 2\nthreads = 1\nmin_run_time = 0.05\nrounds = 3\n'
                 'latency = false\nretries = 0\n[methods.none]\n[methods.topk]\nkeep_rate = 0.5\n')
    return p


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_users_run_reuses_the_reference_and_leaves_it_untouched(tmp_path, cli, monkeypatch):
    from tokenbench.measure import env

    ref, mine, other = tmp_path / "ref", tmp_path / "mine", tmp_path / "other-cpu"
    code, out, err = cli("run", str(_tiny_sweep_file(tmp_path, ref)), "--json")
    assert code == 0, err
    before = _snapshot(ref)
    code, out, err = cli("run", str(_tiny_sweep_file(tmp_path, mine, ref)), "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["measured"] == 0 and res["reused"] == 5  # flops x2, throughput x2, speedup x1
    assert _snapshot(ref) == before
    assert len(list((mine / "records").glob("*.json"))) == 5
    code, out, err = cli("run", str(_tiny_sweep_file(tmp_path, tmp_path / "log", ref)))   # a log: no terminal
    assert code == 0, err
    assert f"0 measurements to make, 5 copied from the reference results {ref}" in out
    assert "[1/" not in out                                     # nothing is counted as made
    # another CPU: FLOPs still come from the reference, timings are measured anew, into `other` only
    monkeypatch.setattr(env, "cpu_model", lambda: "Another CPU 9000")
    code, out, err = cli("run", str(_tiny_sweep_file(tmp_path, other, ref)), "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["measured"] == 3 and res["reused"] == 2
    assert _snapshot(ref) == before
    # a damaged reference record is ignored (and measured here), never moved out of the reference
    victim = next((ref / "records").glob("*.json"))
    victim.write_text("{damaged")
    before = _snapshot(ref)
    code, out, err = cli("run", str(_tiny_sweep_file(tmp_path, tmp_path / "third", ref)), "--json")
    assert code == 0, err
    assert _snapshot(ref) == before


def test_flagged_timings_are_announced_and_retimed_alone(tmp_path, cli):
    from tokenbench.store import Store
    from tokenbench.sweep import read_plan

    out = tmp_path / "sw"
    sweep = _tiny_sweep_file(tmp_path, out)
    code, stdout, err = cli("run", str(sweep), "--json")
    assert code == 0, err
    store = Store(out)
    key = next(r["keys"]["speedup"] for r in read_plan(out)["runs"] if r["method"] == "topk")
    rec = store.get(key)
    rec["metrics"]["spread_flag"] = True  # as if the machine had been noisy through every retry
    rec.pop("checksum")
    store.put(rec)
    from tokenbench.sweep import flagged_timing_keys

    flagged = flagged_timing_keys(store, [r["keys"] for r in read_plan(out)["runs"]])
    assert key in flagged  # (on a busy machine the other timings may be flagged too)
    runs_flagged = len({r["method"] for r in read_plan(out)["runs"] if set(r["keys"].values()) & flagged})
    code, stdout, err = cli("report", str(out), "--json")
    res = json.loads(stdout)
    assert any(n.startswith(f"{runs_flagged} of 2 throughput runs flagged busy or noisy: their speedups are "
                            "unreliable") for n in res["notes"]), res["notes"]
    topk = next(r for r in res["rows"] if r["method"] == "topk")
    assert "noisy" in topk["flags"]
    code, stdout, err = cli("run", str(sweep), "--retime-flagged", "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["measured"] == len(flagged) and res["reused"] == 5 - len(flagged)
