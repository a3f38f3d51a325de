"""report.html: one point per setting in the embedded data and plots, offline, and (where
Chromium is installed) a page that loads without a console error and draws something."""

import json
import re
import shutil
import subprocess

import pytest

from tokenbench import sweep as S
from tokenbench.report.collect import collect
from tokenbench.report.stats import params_text
from tokenbench.store import Store

from conftest import QUICK_THROUGHPUT, REPORT_METHODS, measured, register_tiny_timm, write_sweep  # noqa: E402

pytest.importorskip("plotly")

TINY = register_tiny_timm("tb_html_tiny_vit")
METHODS = REPORT_METHODS + """
[methods.tome]
r = 2
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """Dense, top-k at two rates, random with two seeds (one setting), ToMe: 5 settings."""
    d = tmp_path_factory.mktemp("html")
    return measured(write_sweep(d / "html.toml", TINY, METHODS, name="html", measure=None, top="seeds = [0, 1]",
                                limit=32, batch_size=32, tables=QUICK_THROUGHPUT), d / "out")


def _scripts(page: str, attr: str) -> list:
    return [json.loads(m.replace("<\\/", "</")) for m in
            re.findall(r'<script type="application/json" ' + attr + r'[^>]*>(.*?)</script>', page, re.S)]


@pytest.fixture(scope="module")
def page(swept):
    from tokenbench.cli.main import main

    try:
        main(["report", str(swept), "--html", "--no-plots"])
    except SystemExit as e:
        assert e.code in (0, None)
    return (swept / "report.html").read_text()


def test_one_point_per_setting(swept, page):
    settings = [r for r in collect(swept)["display"] if r.top1 is not None]
    assert len(settings) == 5  # the two seeds of random are one setting
    points = _scripts(page, 'id="tb-points"')[0]
    assert len(points) == len(settings)
    assert sorted(p["setting"] for p in points) == sorted(params_text(r) for r in settings)
    figures = _scripts(page, 'class="tb-figure"')
    assert len(figures) == 2  # accuracy against GFLOPs and against speedup
    for fig in figures:
        drawn = [i for t in fig["data"] if t["meta"]["kind"] == "setting" for i in t["customdata"]]
        assert sorted(drawn) == list(range(len(points)))  # every setting once, none twice
    hover = " ".join(t for tr in figures[0]["data"] if tr["meta"]["kind"] == "setting" for t in tr["text"])
    for word in ("setting:", "FLOPs:", "speedup:", "top-1:", "McNemar p vs dense:"):
        assert word in hover


def test_families_group_the_legend_and_table(page):
    fig = _scripts(page, 'class="tb-figure"')[0]
    groups = {t["name"]: t["legendgroup"] for t in fig["data"] if t["meta"]["kind"] == "setting"}
    assert groups["topk"] == "pruning" and groups["tome"] == "merging" and groups["dense"] == "none"
    assert fig["layout"]["legend"]["groupclick"] == "togglegroup"
    assert re.findall(r'<tr data-family="([a-z]+)">', page).count("pruning") == 3  # topk x2, random


def test_offline_and_self_contained(page):
    assert not re.search(r"<script[^>]*\bsrc\s*=", page)  # plotly inlined, nothing fetched
    assert not re.search(r"<link[^>]*href\s*=\s*[\"']https?:", page)
    assert "Plotly.newPlot" in page


def test_run_writes_the_page(tmp_path, cli):
    p = tmp_path / "s.toml"
    p.write_text(f'name = "s"\nmodels = ["{TINY}"]\ndevice = "cpu"\nmeasure = ["flops"]\n'
                 f'[data]\nname = "synthetic"\nlimit = 8\n[methods.topk]\nkeep_rate = 0.7\n')
    code, out, err = cli("run", str(p), "--out", str(tmp_path / "o"), "--no-plots")
    assert code == 0, err
    assert (tmp_path / "o" / "report.html").is_file()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ERROR_COLLECTOR = (
    '<script>window.__errs=[];window.addEventListener("error",function(e){window.__errs.push(String(e.message))});'
    'var _ce=console.error;console.error=function(){window.__errs.push(Array.prototype.join.call(arguments," "));'
    '_ce.apply(console,arguments)};window.addEventListener("load",function(){setTimeout(function(){'
    'var p=document.createElement("pre");p.id="tb-errors";p.textContent=JSON.stringify(window.__errs);'
    'document.body.appendChild(p)},0)});</script>')


def _chromium(*args) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--hide-scrollbars",
                           "--virtual-time-budget=5000", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_chromium_loads_without_errors_and_draws(tmp_path, page):
    from PIL import Image, ImageStat

    # the page with an error collector in front of its scripts: every uncaught error and
    # console.error lands in <pre id="tb-errors"> once the page has loaded
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("<head>", "<head>" + ERROR_COLLECTOR, 1))
    dom = _chromium("--dump-dom", checked.as_uri()).stdout
    errors = re.search(r'<pre id="tb-errors">(.*?)</pre>', dom, re.S)
    assert errors is not None, "the page did not finish loading"
    assert json.loads(errors.group(1)) == []
    assert dom.count('class="main-svg"') >= 2 * 2  # both plots drawn by Plotly
    broken = tmp_path / "broken.html"  # the collector sees an error (so the check above can fail)
    broken.write_text(checked.read_text().replace("<script>(function", "<script>nosuch();(function", 1)
                      .replace("<script>\n(function", "<script>nosuch();\n(function", 1))
    assert "nosuch" in _chromium("--dump-dom", broken.as_uri()).stdout
    shown, shot = tmp_path / "page.html", tmp_path / "shot.png"
    shown.write_text(page)
    _chromium("--window-size=1200,900", f"--screenshot={shot}", shown.as_uri())
    img = Image.open(shot).convert("L")
    assert max(ImageStat.Stat(img).stddev) > 10  # not a blank page


def test_a_run_without_plotly_says_so_and_keeps_its_tables(swept, monkeypatch):
    from tokenbench.report import html as report_html
    from tokenbench.report.write import write_report

    (swept / "report.html").unlink(missing_ok=True)
    monkeypatch.setattr(report_html, "plotly_available", lambda: False)
    res = write_report(swept, plots=False, html="if-available")
    assert not (swept / "report.html").exists() and (swept / "results.md").is_file()
    assert any("report.html not written" in n for n in res["notes"])


def test_a_dense_model_of_another_size_is_one_point_on_its_models_plot(tmp_path):
    from tokenbench.report.write import write_report

    small = register_tiny_timm("tb_html_tinier_vit", embed_dim=16)
    p = tmp_path / "s.toml"
    p.write_text(f'name = "line"\nmodels = ["{TINY}"]\ndense_family = ["{small}"]\nmeasure = ["flops", "accuracy"]\n'
                 f'device = "cpu"\n[data]\nname = "synthetic"\nlimit = 16\nbatch_size = 16\n'
                 f'[methods.topk]\nkeep_rate = 0.5\n')
    sw = S.load_sweep(p, {"out": str(tmp_path / "out")})
    out, runs, _, _ = S.prepare(sw)
    S.execute(sw, runs, Store(out))
    page = (write_report(out, plots=False, html=True)["out"] / "report.html").read_text()
    points = _scripts(page, 'id="tb-points"')[0]
    assert len(points) == 3 and sum(1 for q in points if q["line_of"]) == 1  # dense, topk, the smaller model
    fig = _scripts(page, 'class="tb-figure"')[0]  # one model's plot holds all three
    assert sorted(i for t in fig["data"] if t["meta"]["kind"] == "setting" for i in t["customdata"]) == [0, 1, 2]
