"""Every command's default output lands under runs/ (git-ignored); committed results/ folders are
written only when named with --out."""

import json
from pathlib import Path

from tokenbench.figures.plan import FigureOptions
from tokenbench.figures.run import build_plan

from conftest import register_tiny_timm, write_sweep

TINY = register_tiny_timm("tiny_vit_default_outputs")


def _files(d: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}


def test_analyze_of_a_committed_sweep_writes_under_runs(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = write_sweep(tmp_path / "s.toml", TINY, "[methods.topk]\nkeep_rate = 0.5\n", out="results/t", batch_size=16)
    code, out, err = cli("run", str(sweep), "--no-plots", "--json")
    assert code == 0, err
    before = _files(tmp_path / "results")
    code, out, err = cli("analyze", "results/t", "--no-plots", "--limit", "8", "--json")
    assert code == 0, err
    assert _files(tmp_path / "results") == before                     # nothing committed touched
    assert Path(json.loads(out)["out"]).resolve() == (tmp_path / "runs" / "analysis" / "t").resolve()
    assert (tmp_path / "runs" / "analysis" / "t" / "errors_kappa.md").is_file()
    # an explicit --out into results/ is honoured
    code, out, err = cli("analyze", "results/t", "--no-plots", "--limit", "8", "--out", "results/t/analysis")
    assert code == 0, err
    assert (tmp_path / "results" / "t" / "analysis" / "errors_kappa.md").is_file()


def test_figure_defaults_to_runs_and_reuses_the_committed_records(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = build_plan("tome-deit-s")
    assert plan.out == Path("runs") / "figures" / "tome-deit-s"
    assert plan.sweep.reference is None                               # no committed copy here
    (tmp_path / "results" / "figures" / "tome-deit-s").mkdir(parents=True)
    plan = build_plan("tome-deit-s")
    assert plan.sweep.reference == str(Path("results") / "figures" / "tome-deit-s")
    plan = build_plan("tome-deit-s", FigureOptions(out="results/figures/tome-deit-s"))
    assert plan.out == Path("results/figures/tome-deit-s") and plan.sweep.reference is None


def test_visualize_defaults_to_runs_and_warns_of_untrained_predictors(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("visualize", TINY, "--method", "topk", "--set", "keep_rate=0.5", "--data", "synthetic",
                         "--n", "1", "--dpi", "30", "--json")
    assert code == 0, err
    assert (tmp_path / "runs" / "visuals" / "tokens_topk.png").is_file()
    assert not list(tmp_path.glob("*.png"))
    assert "untrained" not in err
    code, out, err = cli("visualize", TINY, "--method", "dynamicvit", "--set", "keep_rate=0.7", "--data",
                         "synthetic", "--n", "1", "--dpi", "30", "--json")
    assert code == 0, err
    assert "warning: dynamicvit is learned and no --checkpoint was given" in err
    code, out, err = cli("visualize", TINY, "--compare", "dynamicvit,topk", "--set", "keep_rate=0.7", "--data",
                         "synthetic", "--n", "1", "--dpi", "30", "--json")
    assert code == 0, err
    assert err.count("untrained") == 1 and (tmp_path / "runs" / "visuals" / "compare.png").is_file()
