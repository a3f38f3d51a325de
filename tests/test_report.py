"""Reports: table contents against the records, seed aggregation, flags, plots, damaged records, `report`."""

import csv
import io
import json
import shutil
import statistics
import struct

import pytest

from tokenbench.report.tables import FLAG_HELP
from tokenbench.errors import UserError
from tokenbench.report.rows import Row, learned_status
from tokenbench.report.stats import parse_selector, select_rows
from tokenbench.report.collect import collect
from tokenbench.report.paired import paired
from tokenbench.report.plot import pareto
from tokenbench.report.write import write_report
from tokenbench.store import Store

from conftest import QUICK_THROUGHPUT, REPORT_METHODS, measured, register_tiny_timm, write_sweep  # noqa: E402

TINY = register_tiny_timm("tb_report_tiny_vit")
METHODS = REPORT_METHODS + """
[methods.dynamicvit]
keep_rate = 0.7
[methods.tome]
flops_targets = [0.05]
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A small sweep measured once (dense, top-k x2, random x2 seeds, DynamicViT untrained, a ToMe FLOPs miss)."""
    d = tmp_path_factory.mktemp("rep")
    return measured(write_sweep(d / "rep.toml", TINY, METHODS, name="rep", measure=None, top="seeds = [0, 1]",
                                limit=48, batch_size=48, tables=QUICK_THROUGHPUT), d / "out")


def _csv(out):
    return list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))


def _num(s):
    return None if s == "" else float(s)


@pytest.fixture(scope="module")
def reported(swept):
    return write_report(swept)


def test_table_values_equal_the_records(swept, reported):
    from tokenbench.measure.stats import mcnemar

    store = Store(swept)
    rows = _csv(swept)
    per_run = [r for r in rows if r["row_type"] in ("run", "seed")]
    assert len(per_run) == 7  # dense, topk x2, random x2, dynamicvit, tome
    dense = next(r for r in per_run if r["method"] == "none")
    d_f = store.get(dense["flops_key"])["metrics"]
    d_t = store.get(dense["throughput_key"])["metrics"]
    d_a = store.get(dense["accuracy_key"])["metrics"]
    for r in per_run:
        f = store.get(r["flops_key"])["metrics"]
        a = store.get(r["accuracy_key"])["metrics"]
        assert _num(r["gflops"]) == f["gflops"]
        assert _num(r["params_m"]) == f["params_m"]
        assert _num(r["flops_rel"]) == pytest.approx(f["gflops"] / d_f["gflops"], rel=1e-12)
        assert _num(r["top1"]) == a["top1"] and _num(r["top5"]) == a["top5"] and int(r["n"]) == a["n"] == 48
        assert [_num(r["top1_lo"]), _num(r["top1_hi"])] == a["top1_ci95"]
        if r["throughput_key"]:
            t = store.get(r["throughput_key"])["metrics"]
            assert (_num(r["img_per_s"]), _num(r["img_per_s_q1"]), _num(r["img_per_s_q3"])) == \
                (t["img_per_s"], t["img_per_s_q1"], t["img_per_s_q3"])
            if r["method"] == "none":
                assert _num(r["speedup"]) == 1.0
            else:  # the paired (interleaved) timing of the speedup record, not a ratio of two runs
                sp = store.get(r["speedup_key"])
                assert _num(r["speedup"]) == sp["metrics"]["speedup"]
                assert (_num(r["speedup_q1"]), _num(r["speedup_q3"])) == \
                    (sp["metrics"]["speedup_q1"], sp["metrics"]["speedup_q3"])
                assert sp["key_fields"]["baseline"]["method"] == "none"
        else:
            assert r["seed"] == "1"  # throughput is timed for the first seed only
        if r["method"] != "none":
            m = mcnemar([c == "1" for c in d_a["correct"]], [c == "1" for c in a["correct"]])
            assert (_num(r["mcnemar_p"]), int(r["only_dense"]), int(r["only_run"])) == \
                (m["p_value"], m["only_a"], m["only_b"])
        assert r["learned"] == ("untrained" if r["method"] == "dynamicvit" else "none")
        assert r["device"] == "cpu"


def test_seeds_become_one_mean_row(swept, reported):
    rows = _csv(swept)
    seeds = [r for r in rows if r["method"] == "random" and r["row_type"] == "seed"]
    mean = [r for r in rows if r["method"] == "random" and r["row_type"] == "mean"]
    assert [r["seed"] for r in seeds] == ["0", "1"] and len(mean) == 1
    top1 = [float(r["top1"]) for r in seeds]
    assert _num(mean[0]["top1"]) == pytest.approx(statistics.fmean(top1))
    assert _num(mean[0]["top1_std"]) == pytest.approx(statistics.stdev(top1))
    assert int(mean[0]["n_seeds"]) == 2
    disp = [r for r in reported["display"] if r.method == "random"]
    assert len(disp) == 1 and disp[0].row_type == "mean"
    md = (swept / "results.md").read_text()
    line = next(l for l in md.splitlines() if l.startswith("| random"))
    assert "2 seeds" in line and "±" in line
    # McNemar: the largest per-seed p, beside the counts of that seed (mean counts would give another p)
    worst = max(seeds, key=lambda r: float(r["mcnemar_p"]))
    assert (mean[0]["mcnemar_p"], mean[0]["only_dense"], mean[0]["only_run"]) == \
        (worst["mcnemar_p"], worst["only_dense"], worst["only_run"])
    assert "largest per-seed p, with that seed's counts" in md
    assert "img/s and speedup: the first seed's, the only one timed" in md


def test_flags_and_learned_status(reported):
    disp = {(r.label, json.dumps(r.params, sort_keys=True)): r for r in reported["display"]}
    tome = next(r for r in reported["display"] if r.method == "tome")
    assert "flops-miss" in tome.flags and tome.target == "0.05"
    topk = [r for r in reported["display"] if r.method == "topk"]
    assert all("flops-miss" not in r.flags for r in topk)
    dv = next(r for r in reported["display"] if r.method == "dynamicvit")
    assert dv.learned == "untrained"
    assert len(disp) == 6


def test_unpaired_img_per_s_that_contradicts_the_paired_speedup_is_flagged():
    from tokenbench.report.stats import closing_notes, compare_with_dense
    from tokenbench.report.rows import Row

    def row(method, img_per_s, speedup=None):
        q = {} if speedup is None else {"speedup": speedup, "speedup_q1": speedup * 0.97,
                                        "speedup_q3": speedup * 1.03}
        return Row(model="m", label=method, method=method, params={}, img_per_s=img_per_s,
                   keys={"throughput": method}, **q)

    # the dense model timed in a slow spell: 645 img/s against the method's 778, paired 0.84x
    dense, slow, agrees = row("none", 645.0), row("dynamicvit", 778.0, 0.84), row("topk", 700.0, 1.05)
    compare_with_dense([dense, slow, agrees])
    assert "unpaired" in slow.flags and "unpaired" not in agrees.flags
    assert "unpaired" not in dense.flags and dense.speedup == 1.0
    assert any("1 of 3 runs' img/s" in n and "`unpaired`" in n for n in closing_notes([dense, slow, agrees]))
    assert "unpaired" in FLAG_HELP


def test_learned_status_words():
    assert learned_status({"learned_parts": "trained", "checkpoint": "x.pt"}) == "fine-tuned"
    assert learned_status({"learned_parts": "trained", "checkpoint": None}) == "trained"
    assert learned_status({"learned_parts": "untrained"}) == "untrained"
    assert learned_status({"learned_parts": None}) == "none"
    assert learned_status({"learned_parts": "none", "checkpoint": "t.pt", "method": "topk"}) == "fine-tuned"
    assert learned_status({"learned_parts": "none", "checkpoint": "d.pt", "method": "none"}) == "none"


def test_markdown_and_latex(swept, reported):
    md = (swept / "results.md").read_text()
    table = [l for l in md.splitlines() if l.startswith("|")]
    assert len(table) == 2 + len(reported["display"])
    assert "Top-1 % [95% CI]" in table[0] and "McNemar" in table[0]
    assert "flops-miss" in md and "**flops-miss**" in md
    tex = (swept / "results.tex").read_text()
    assert "\\toprule" in tex and "keep\\_rate=0.5" in tex and "\\bottomrule" in tex
    assert tex.count("\\\\") == 1 + len(reported["display"])


def test_plots_png_and_pdf_at_column_width(swept, reported):
    for name in ("accuracy_vs_gflops", "accuracy_vs_throughput"):
        png = swept / "plots" / f"{name}.png"
        pdf = swept / "plots" / f"{name}.pdf"
        assert pdf.read_bytes()[:4] == b"%PDF"
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width = struct.unpack(">I", data[16:20])[0]
        assert 2.8 * 300 <= width <= 3.7 * 300  # ~3.4 in at 300 dpi


def test_pareto_frontier():
    pts = [(1, 50), (2, 60), (3, 55), (4, 70), (5, 65)]
    assert pareto(pts, lower_x_better=True) == [(1, 50), (2, 60), (4, 70)]
    assert pareto(pts, lower_x_better=False) == [(4, 70), (5, 65)]


def test_report_cli_never_measures(swept, cli, monkeypatch):
    from tokenbench import runner
    from tokenbench.measure import accuracy, flop_count, timing

    def boom(*a, **k):
        raise AssertionError("report measured something")

    for mod, name in ((runner, "measure_run"), (flop_count, "flops"), (timing, "throughput"), (accuracy, "evaluate")):
        monkeypatch.setattr(mod, name, boom)
    (swept / "results.md").unlink()
    code, out, err = cli("report", str(swept), "--no-plots")
    assert code == 0, err
    assert "topk" in out and (swept / "results.md").is_file()
    code, out, err = cli("report", str(swept), "--json", "--no-plots")
    assert code == 0 and len(json.loads(out)["rows"]) == 6


def test_damaged_record_is_skipped_with_a_warning(swept, tmp_path, cli):
    d = tmp_path / "copy"
    shutil.copytree(swept, d)
    plan = json.loads((d / "sweep.json").read_text())
    victim = plan["runs"][1]["keys"]["accuracy"]
    (d / "records" / f"{victim}.json").write_text('{"truncated": ')
    code, out, err = cli("report", str(d), "--no-plots", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert any("damaged record" in n for n in res["notes"])
    row = next(r for r in res["rows"] if r["label"] == plan["runs"][1]["label"] and r["top1"] is None)
    assert "incomplete" in row["flags"]
    assert list((d / "quarantine").iterdir())


def test_report_without_a_plan_groups_the_records(swept, tmp_path):
    d = tmp_path / "noplan"
    shutil.copytree(swept, d)
    (d / "sweep.json").unlink()
    res = write_report(d, plots=False)
    assert len(res["display"]) == 6 and len(res["rows"]) == 7
    assert res["display"][0].method == "none"
    rnd = [r for r in res["display"] if r.method == "random"]
    assert len(rnd) == 1 and rnd[0].n_seeds == 2


def test_report_of_an_empty_directory_is_a_user_error(tmp_path, cli):
    code, out, err = cli("report", str(tmp_path))
    assert code == 2 and "no records" in err and err.strip().count("\n") == 0
    code, out, err = cli("report", str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in err


def test_compare_is_mcnemar_on_the_stored_correctness(swept, cli):
    """`tokenbench compare`: one pair per seed of a seeded method, counts and p from the records."""
    from tokenbench.measure.stats import mcnemar

    res = paired(swept, "dynamicvit:keep_rate=0.7", "random")
    assert len(res["pairs"]) == 2                       # random: two seeds
    rows = collect(swept)["rows"]
    dv = next(r for r in rows if r.method == "dynamicvit")
    for p in res["pairs"]:
        rnd = next(r for r in rows if r.method == "random" and r.seed == p["b"]["params"]["seed"])
        want = mcnemar([c == "1" for c in dv.correct], [c == "1" for c in rnd.correct])
        assert (p["only_a"], p["only_b"], p["p_value"]) == (want["only_a"], want["only_b"], want["p_value"])
        assert p["diff"] == pytest.approx(dv.top1 - rnd.top1)
    code, out, err = cli("compare", str(swept), "dynamicvit:keep_rate=0.7", "topk:keep_rate=0.5", "random", "--json")
    assert code == 0 and len(json.loads(out)["comparisons"]) == 2


@pytest.mark.parametrize("sel,msg", [("topk", "matches 2 settings"), ("topk:keep_rate=0.9", "keep_rate=0.5"),
                                     ("evit", "methods here"), (":keep_rate=1", "names no method")])
def test_compare_selector_errors(swept, cli, sel, msg):
    code, out, err = cli("compare", str(swept), sel, "random")
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1


def test_compare_without_b_or_on_a_missing_directory_is_one_line(swept, cli, tmp_path):
    for args, msg in (((str(swept), "topk:keep_rate=0.5"), "compare needs a second setting"),
                      ((str(tmp_path / "gone"), "a", "b"), f"results directory {tmp_path / 'gone'} does not exist")):
        code, out, err = cli("compare", *args)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err


def test_compare_selector_keeps_list_values_whole():
    assert parse_selector("tome:r=[5,4,4],prop_attn=false") == ("tome", {"r": [5, 4, 4], "prop_attn": False})
    assert parse_selector("none") == ("none", {})


def test_compare_selects_sweep_entries_by_label():
    def row(label, ckpt=None, seed=None):
        return Row(model="m", method="topk", label=label, params={"keep_rate": 0.7, **({"seed": seed} if seed else {})},
                   seed_param="seed" if seed else None, checkpoint=ckpt)

    rows = [row("topk"), row("topk-finetuned", "ft.pt"), row("other", "o.pt")]
    assert [r.label for r in select_rows(rows, "topk:keep_rate=0.7")] == ["topk"]
    assert [r.label for r in select_rows(rows, "topk-finetuned")] == ["topk-finetuned"]
    with pytest.raises(UserError, match="matches 2 settings"):
        select_rows(rows[1:], "topk")


def test_a_report_without_a_plan_shows_one_timing_setting():
    # eager and compiled timings of one run in one folder: the report pairs the throughput with the
    # speedup of the same setting, never a newer speedup of another, and says what it left out
    from tokenbench.report.collect import _entries_from_records

    spec = {"model": "m", "method": "none", "params": {}, "img_size": 32}

    def rec(kind, time, **kf):
        return {"kind": kind, "spec": spec, "meta": {"time": time},
                "key_fields": {"device": "cpu", "batch_size": 2, **kf}, "metrics": {}}

    compiled = [rec("throughput", "2", compile="default"), rec("throughput", "2", compile="default"),
                rec("speedup", "2", compile="default")]
    eager = [rec("throughput", "1"), rec("speedup", "3")]   # the eager speedup is the newest record
    notes = []
    (entry,) = _entries_from_records(compiled + eager, notes)
    assert entry["recs"]["throughput"]["key_fields"].get("compile") == "default"   # the most common setting
    assert entry["recs"]["speedup"]["key_fields"].get("compile") == "default"      # and its own speedup
    assert notes == ["timing records of several settings: reporting device cpu, batch_size 2, compile default"]


def test_a_report_without_a_plan_takes_a_runs_records_on_real_images_first():
    # a method whose token count depends on the image is counted and timed on real images, the others
    # on the synthetic input: each run keeps its own (on images first), none is dropped for the others'
    from tokenbench.report.collect import _entries_from_records

    def rec(method, kind, time, **kf):
        spec = {"model": "m", "method": method, "params": {}, "img_size": 32}
        base = {"device": "cpu", "batch_size": 2} if kind != "flops" else {}
        return {"kind": kind, "spec": spec, "meta": {"time": time}, "metrics": {}, "key_fields": {**base, **kf}}

    images = {"data": "fashion-mnist", "split": "test", "images": 2, "data_seed": 0, "data_id": "x"}
    recs = [rec("none", "flops", "1"), rec("none", "throughput", "1"), rec("topk", "flops", "1"),
            rec("ats", "flops", "3"),                                      # newer, on the synthetic input
            rec("ats", "flops", "2", data="fashion-mnist", split="test", limit=64, data_seed=0),
            rec("pitome", "throughput", "1", input=images)]             # its only timing, on images
    notes = []
    got = {e["spec"]["method"]: e["recs"] for e in _entries_from_records(recs, notes)}
    assert sorted(got) == ["ats", "none", "pitome", "topk"] and notes == []
    assert got["ats"]["flops"]["key_fields"].get("data") == "fashion-mnist"
    assert got["pitome"]["throughput"]["key_fields"]["input"] == images


def test_the_settings_line_names_a_compiled_explicit_or_real_image_timing():
    # a table timed compiled, with explicit attention or on real images says so; eager fused says nothing more
    from tokenbench.report.rows import Row, tp_setting
    from tokenbench.report.tables import setting_line

    def line(**kf):
        rec = {"key_fields": {"device": "cpu", "precision": "fp32", "threads": 2, "batch_size": 16, **kf}}
        row = Row(model="m", label="none", method="none", params={}, img_per_s=10.0, device="cpu", threads=2,
                  batch_size=16, precision="fp32", tp_setting=tp_setting(rec))
        return setting_line({"display": [row]})

    assert line() == "Settings: throughput on cpu, 2 threads, batch 16, fp32."
    images = {"data": "fashion-mnist", "data_id": "x", "split": "test", "images": 16, "data_seed": 0}
    assert line(compile="max-autotune", attention="explicit", input=images) == (
        "Settings: throughput on cpu, 2 threads, batch 16, fp32, compiled (max-autotune), explicit attention, "
        "on fashion-mnist test images.")
    assert line(cuda_graphs=True).endswith("fp32, CUDA graphs.")


def test_a_plan_less_report_leaves_out_the_records_of_a_retrained_models_older_weights():
    from tokenbench.report.collect import _entries_from_records

    def rec(method, weights, time, checkpoint=None, pretrained=False):
        spec = {"model": "m", "method": method, "params": {}, "img_size": 32, "checkpoint": checkpoint,
                "pretrained": pretrained}
        return {"kind": "accuracy", "spec": spec, "meta": {"time": time}, "metrics": {},
                "key_fields": {"weights": weights, "data": "d", "split": "test"}}

    recs = [rec("none", "OLD", "1"), rec("topk", "OLD", "2"), rec("none", "NEW", "3"),
            rec("dynamicvit", "TRAINED", "0", checkpoint="ckpt.pt"),   # its own weights: kept
            rec("evit", "HUB", "0", pretrained=True),                  # another run's weights: kept
            rec("tome", None, "0")]                                     # names no weights: kept
    notes = []
    entries = _entries_from_records(recs, notes)
    assert sorted((e["spec"]["method"], e["recs"]["accuracy"]["key_fields"]["weights"]) for e in entries) == \
        [("dynamicvit", "TRAINED"), ("evit", "HUB"), ("none", "NEW"), ("tome", None)]
    assert notes == ["2 record(s) of older weights of m left out (a retrained model: compared with its older "
                     "numbers they would mix two models)"]


def test_a_dense_control_fine_tuned_from_a_checkpoint_is_compared_not_the_baseline():
    from tokenbench.report.rows import Row
    from tokenbench.report.stats import compare_with_dense

    tuned = Row(model="m", label="dense-tuned", method="none", params={}, gflops=2.0, checkpoint="tuned.pt")
    dense = Row(model="m", label="dense", method="none", params={}, gflops=4.0)
    run = Row(model="m", label="topk", method="topk", params={}, gflops=1.0)
    compare_with_dense([tuned, run, dense])
    assert (run.flops_rel, tuned.flops_rel, dense.flops_rel) == (0.25, 0.5, 1.0)


def test_compare_names_the_model_where_a_folder_holds_several():
    import pytest

    from tokenbench.errors import UserError
    from tokenbench.report.rows import Row
    from tokenbench.report.stats import one_model

    rows = [Row(model=m, label=l, method=l, params={}) for m in ("a", "b") for l in ("dense", "topk")]
    rows.append(Row(model="a-small", label="none", method="none", params={}, line_of="a"))
    with pytest.raises(UserError, match=r"holds 2 models \(a, b\): a comparison reads one; name it with --model"):
        one_model(rows, None, "DIR")
    assert [(r.model, r.label) for r in one_model(rows, "a", "DIR")] == [("a", "dense"), ("a", "topk"),
                                                                         ("a-small", "none")]
    with pytest.raises(UserError, match="no model 'c' in DIR; models here: a, b"):
        one_model(rows, "c", "DIR")


def test_a_dense_per_image_record_counted_on_the_scenes_comes_before_an_older_one_of_one_image():
    from tokenbench.report.collect import _latest

    kf = {"data": "fashion-mnist-scenes", "split": "test", "code": {}, "protocol": 1}
    scenes = {"kind": "segmentation", "meta": {"time": "1"}, "key_fields": {**kf, "flops_images": 64}}
    one_image = {"kind": "segmentation", "meta": {"time": "2"}, "key_fields": dict(kf)}  # newer, older code
    assert _latest([one_image, scenes]) is scenes
