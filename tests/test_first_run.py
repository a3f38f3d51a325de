"""A sweep on a CPU whose timings are not recorded times only its `time_by_default` settings,
says so before it starts (with an estimate from measured durations), and reports the others
as untimed: no speed shown, none borrowed from another CPU, none on the speed plot."""

import json
from pathlib import Path

import pytest

from conftest import register_tiny_timm

TINY = register_tiny_timm("tb_tiny_first_run_vit")


@pytest.fixture
def fake_timings(monkeypatch):
    """Timings that return at once (the runner and its records are the real ones); the kinds timed
    are collected in the list returned."""
    from tokenbench.measure import env, overhead, timing

    made = []

    def machine():
        return {**env.env_info("cpu"), "busy": False, "other_cores": 0.0}

    def throughput(model, batch_size=64, **kw):
        made.append("throughput")
        return {"img_per_s": 100.0, "img_per_s_q1": 99.0, "img_per_s_q3": 101.0, "spread": 0.02,
                "spread_flag": False, "trials": 5, "runs_per_trial": 1, "batch_size": batch_size, "device": "cpu",
                "precision": "fp32", "compile": None, "env": machine()}

    def speedup(model, baseline, batch_size=64, rounds=10, **kw):
        made.append("speedup")
        return {"speedup": 1.5, "speedup_q1": 1.4, "speedup_q3": 1.6, "spread": 0.13, "spread_flag": True,
                "rounds": rounds, "calls_per_block": {"baseline": 1, "method": 1}, "img_per_s": 150.0,
                "baseline_img_per_s": 100.0, "batch_size": batch_size, "device": "cpu", "precision": "fp32",
                "compile": None, "env": machine()}

    monkeypatch.setattr(timing, "throughput", throughput)
    monkeypatch.setattr(timing, "speedup", speedup)
    monkeypatch.setattr(overhead, "overhead", lambda *a, **k: {"aten_ops": 1, "host_ms": 0.1})
    return made


def _sweep(tmp_path: Path, out: Path, reference: Path = None, timed='["dense", "topk"]') -> Path:
    ref = f'reference = "{reference}"\n' if reference else ""
    p = tmp_path / f"sw-{out.name}.toml"
    p.write_text(f'name = "tiny"\nout = "{out}"\n{ref}models = ["{TINY}"]\nmeasure = ["flops", "throughput"]\n'
                 f'device = "cpu"\n[throughput]\nbatch_size = 2\nthreads = 1\nretries = 0\n'
                 f'time_by_default = {timed}\n'
                 '[methods.none]\n[methods.topk]\nkeep_rate = 0.5\n[methods.evit]\nkeep_rate = 0.5\n')
    return p


def _rows(out: str) -> dict:
    return {r["method"]: r for r in json.loads(out)["rows"]}


def _another_cpu(monkeypatch):
    from tokenbench.measure import env

    monkeypatch.setattr(env, "cpu_model", lambda: "Another CPU 9000")


def test_another_cpu_times_the_chosen_settings_and_marks_the_rest_untimed(tmp_path, cli, monkeypatch, fake_timings):
    ref, mine = tmp_path / "ref", tmp_path / "mine"
    code, out, err = cli("run", str(_sweep(tmp_path, ref)), "--all-timings", "--json", "--no-plots")
    assert code == 0, err
    assert sorted(fake_timings) == ["speedup"] * 2 + ["throughput"] * 3  # every setting, with --all-timings
    assert all("untimed" not in (r["flags"] or "") for r in _rows(out).values())
    fake_timings.clear()

    _another_cpu(monkeypatch)
    code, out, err = cli("run", str(_sweep(tmp_path, mine, ref)), "--no-plots")
    assert code == 0, err
    assert sorted(fake_timings) == ["speedup", "throughput", "throughput"]  # dense and topk only
    assert "timing on this CPU (Another CPU 9000): 2 throughputs and 1 paired speedup of 2 setting(s)" in err
    assert "about" in err and "the reference's durations on" in err      # an estimate, from measured durations
    assert "not timed here: 1 other setting(s)" in err and "--all-timings" in err
    assert "FLOPs and accuracy: 3 record(s) reused" in err
    assert "1 setting(s) not timed on this CPU" in out
    code, out, err = cli("report", str(mine), "--json")
    rows = _rows(out)
    assert "untimed" in rows["evit"]["flags"] and rows["evit"]["speedup"] is None
    assert rows["evit"]["img_per_s"] is None and rows["evit"]["gflops"] is not None
    assert "untimed" not in rows["topk"]["flags"] and rows["topk"]["speedup"] == 1.5
    assert "noisy" in rows["topk"]["flags"]  # a shortened run keeps the timing flags
    md = (mine / "results.md").read_text()
    assert "**untimed**" in md and "1 settings were not timed on this CPU" in md

    # a dry run says the same and measures nothing
    fresh = tmp_path / "dry"
    code, out, err = cli("run", str(_sweep(tmp_path, fresh, ref)), "--dry-run")
    assert code == 0 and "2 throughputs and 1 paired speedup of 2 setting(s)" in err and "not timed here: 1" in err
    assert not list(fresh.glob("records/*.json"))

    # a second run reuses the timings made here and still leaves evit untimed, saying nothing new
    fake_timings.clear()
    code, out, err = cli("run", str(_sweep(tmp_path, mine, ref)), "--no-plots")
    assert code == 0, err
    assert not fake_timings and "timing on this CPU" not in err and "not timed here: 1 other" in err
    # --all-timings times the rest, and the flag goes
    code, out, err = cli("run", str(_sweep(tmp_path, mine, ref)), "--all-timings", "--json", "--no-plots")
    assert code == 0, err
    assert sorted(fake_timings) == ["speedup", "throughput"]
    assert "untimed" not in (_rows(out)["evit"]["flags"] or "") and _rows(out)["evit"]["speedup"] == 1.5


def test_the_reference_cpu_reuses_every_timing_and_can_set_them_aside(tmp_path, cli, fake_timings):
    ref = tmp_path / "ref"
    assert cli("run", str(_sweep(tmp_path, ref)), "--all-timings", "--json", "--no-plots")[0] == 0
    fake_timings.clear()
    code, out, err = cli("run", str(_sweep(tmp_path, tmp_path / "same", ref)), "--no-plots")
    assert code == 0, err
    assert not fake_timings and "untimed" not in out and "timing on this CPU" not in err
    # the reference's timings set aside: the chosen settings are timed again, FLOPs still reused
    code, out, err = cli("run", str(_sweep(tmp_path, tmp_path / "aside", ref)), "--no-reference-timings", "--no-plots")
    assert code == 0, err
    assert sorted(fake_timings) == ["speedup", "throughput", "throughput"]
    assert "set aside by --no-reference-timings" in err and "3 record(s) reused" in err


def test_a_setting_outside_the_sweep_is_refused_in_one_line(tmp_path, cli):
    for timed, says in (('["dense", "topkk"]', "no entry 'topkk'"), ('["topk@1.5"]', "FLOPs target"),
                        ('["@0.7"]', "names no setting")):
        code, out, err = cli("run", str(_sweep(tmp_path, tmp_path / "x", timed=timed)), "--dry-run")
        assert code == 2 and says in err and "Traceback" not in err, err
    assert "did you mean 'topk'" in cli("run", str(_sweep(tmp_path, tmp_path / "x", timed='["topkk"]')))[2]


def test_durations_come_from_wall_s_or_the_gap_since_the_record_before():
    from tokenbench.sweep.timing import durations

    def rec(kind, t, wall=None):
        m = {"wall_s": wall} if wall is not None else {}
        return {"kind": kind, "meta": {"time": f"2026-01-01T00:{t // 60:02d}:{t % 60:02d}+0000"}, "metrics": m}

    got = durations([rec("flops", 0), rec("throughput", 3), rec("speedup", 9), rec("throughput", 500),
                     rec("speedup", 510, wall=4.5), rec("accuracy", 520)])
    assert got == {"throughput": [3.0], "speedup": [6.0, 4.5]}  # the 491 s pause is no measurement


def test_the_estimate_prefers_timings_made_on_this_cpu(tmp_path, cli, monkeypatch, fake_timings):
    from tokenbench.store import Store
    from tokenbench.sweep.timing import estimate
    from tokenbench.sweep import load_sweep

    mine = tmp_path / "mine"
    _another_cpu(monkeypatch)
    assert cli("run", str(_sweep(tmp_path, mine)), "--all-timings", "--json", "--no-plots")[0] == 0
    walls = [r["metrics"]["wall_s"] for r in Store(mine).records() if r["kind"] in ("throughput", "speedup")]
    assert len(walls) == 5 and all(w >= 0 for w in walls)
    est = estimate(load_sweep(str(_sweep(tmp_path, mine))), Store(mine), None)
    assert est is not None and "made here on Another CPU 9000" in est.source
    assert est.seconds({"throughput": 2}) == pytest.approx(2 * sorted(
        r["metrics"]["wall_s"] for r in Store(mine).records() if r["kind"] == "throughput")[1])


def test_the_reference_durations_grow_by_the_protocols_forwards_on_a_slower_cpu(tmp_path, monkeypatch):
    from tokenbench.store import Store
    from tokenbench.sweep import load_sweep, timing

    def rec(kind, t, model=TINY, **m):
        return {"kind": kind, "key_fields": {"model": model, "method": "none", "batch_size": 2,
                                             "device_name": "Ref CPU"},
                "spec": {}, "meta": {"time": f"2026-01-01T00:00:{t:02d}+0000"}, "metrics": m}

    class Ref:  # a smaller dense model first: its speed is not the sweep's model's
        def records(self):
            return [rec("flops", 0), rec("throughput", 3, model="small", img_per_s=80.0),
                    rec("throughput", 6, img_per_s=20.0), rec("speedup", 9, wall_s=6.0)]

    sw = load_sweep(str(_sweep(tmp_path, tmp_path / "x")))  # batch 2: the reference's forward takes 0.1 s
    for here, thr, sp in ((0.05, 3.0, 6.0), (0.1, 3.0, 6.0), (0.6, 3.0 + 7 * 0.5, 6.0 + 28 * 0.5)):
        monkeypatch.setattr(timing, "dense_forward_s", lambda *a, here=here, **k: here)
        est = timing.estimate(sw, Store(tmp_path / "empty"), Ref(), dense_net=object())
        assert est.per_kind == pytest.approx({"throughput": thr, "speedup": sp})  # 10 rounds: 8 + 20 forwards


@pytest.mark.parametrize("timed, says", [
    ('["topk@0.7"]', "it has no FLOPs targets: write 'topk'"),          # its knob is fixed in the grid
    ('["evit@0.6"]', "its FLOPs targets are 0.7, 0.9"),
    ('["dense@0.7"]', "it has no FLOPs targets: write 'dense'"),
])
def test_a_selector_whose_target_the_entry_never_meets_is_refused_in_one_line(tmp_path, cli, timed, says):
    p = tmp_path / "sw.toml"
    p.write_text(f'name = "tiny"\nout = "{tmp_path / "out"}"\nmodels = ["{TINY}"]\nmeasure = ["flops", "throughput"]\n'
                 f'flops_targets = [0.7, 0.9]\n[throughput]\ntime_by_default = {timed}\n'
                 '[methods.none]\n[methods.topk]\nkeep_rate = 0.5\n[methods.evit]\n')
    code, out, err = cli("run", str(p), "--dry-run")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "selects nothing" in err and says in err
    assert not (tmp_path / "out").exists()
