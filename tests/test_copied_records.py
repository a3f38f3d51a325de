"""Records copied between machines and folders with damaged files: relative checkpoint paths, one
warning per damaged FLOPs cache, the FLOPs column kept, and analyze free of timing notes."""

import json
import warnings
from pathlib import Path

from rich.console import Console

from conftest import register_tiny_timm, write_sweep

TINY = register_tiny_timm("tiny_vit_copied_records")
REPO = Path(__file__).resolve().parent.parent


def test_checkpoint_provenance_is_relative_to_the_repository(tmp_path):
    from tokenbench.models import load_embedded
    from tokenbench.outputs import repository_relative

    assert repository_relative(REPO / "results" / "embedded" / "model.pt") == "results/embedded/model.pt"
    assert repository_relative(tmp_path / "x.pt") == str(tmp_path / "x.pt")
    _, prov = load_embedded()
    assert prov["checkpoint"] == "results/embedded/model.pt"


def test_a_damaged_flops_cache_warns_once(tmp_path):
    from tokenbench.sweep.search import FlopsSearch

    cache = tmp_path / "flops_cache.json"
    cache.write_text('{"gflops": garb')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = FlopsSearch(cache)
        s.cache["k"] = 1.0
        s.save()
    assert [str(w.message) for w in caught] == [f"FLOPs cache {cache} is damaged; counting again"]
    assert json.loads(cache.read_text())["gflops"] == {"k": 1.0}


def _sweep(tmp_path, measure=("flops", "accuracy")):
    return write_sweep(tmp_path / "s.toml", TINY, "[methods.topk]\nkeep_rate = 0.5\n", out=tmp_path / "out",
                       measure=measure)


def test_report_keeps_the_flops_column_when_the_dense_count_is_damaged(cli, tmp_path):
    from tokenbench.report.collect import collect
    from tokenbench.report.tables import summary_table

    code, out, err = cli("run", str(_sweep(tmp_path, ["flops"])), "--no-plots", "--json")
    assert code == 0, err
    for p in (tmp_path / "out" / "records").rglob("*.json"):
        rec = json.loads(p.read_text())
        if rec["spec"]["method"] == "none":
            p.write_text(p.read_text()[:80])                                    # the dense FLOPs record
    res = collect(tmp_path / "out")
    con = Console(width=80, record=True, file=open(tmp_path / "sink", "w"))
    con.print(summary_table(res))
    text = con.export_text()
    header = next(ln for ln in text.splitlines() if "Method" in ln)
    assert "FLOPs" in header and "G " in text
    assert any("no FLOPs count of the dense model" in n for n in res["notes"])


def test_analyze_leaves_out_the_reports_timing_notes(cli, tmp_path, monkeypatch):
    from tokenbench.report import collect as report_collect, stats as report_stats

    code, out, err = cli("run", str(_sweep(tmp_path)), "--no-plots", "--json")
    assert code == 0, err
    note = ["3 of 9 runs' img/s over the dense model's disagree with their paired speedup (marked `unpaired`)"]
    monkeypatch.setattr(report_stats, "timing_notes", lambda rows: list(note))
    monkeypatch.setattr(report_collect, "timing_notes", lambda rows: list(note))
    assert note[0] in report_collect.collect(tmp_path / "out")["notes"]        # the report keeps it
    code, out, err = cli("analyze", str(tmp_path / "out"), "--no-plots", "--limit", "8", "--json")
    assert code == 0, err
    assert not [n for n in json.loads(out)["notes"] if "unpaired" in n]
