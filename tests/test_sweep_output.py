"""A sweep's output: directories checked before measuring, the end-of-sweep
output (a summary that fits 80 columns, a progress bar in measurements with a time estimate, a
matched-FLOPs search bar), and runs claimed so that two runners measure each once."""

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from io import StringIO
from pathlib import Path

import pytest

from tokenbench import sweep as S
from tokenbench.store import Store

from conftest import register_tiny_timm  # noqa: E402

TINY = "tb_ux_tiny_vit"
register_tiny_timm(TINY)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (None if p.is_dir() else p.read_bytes()) for p in sorted(d.rglob("*"))
            if not p.name.startswith(".tokenbench-write-test.")}


@contextlib.contextmanager
def read_only(d: Path):
    """``d`` refuses new files: chmod for a user; root ignores permission bits, so chattr +i for root."""
    if not IS_ROOT:
        d.chmod(0o555)
        try:
            yield
        finally:
            d.chmod(0o755)
        return
    r = subprocess.run(["chattr", "+i", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("running as root where chattr +i is not available: no way to make a directory read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=True)


@pytest.fixture
def measured(monkeypatch):
    """Counts the measurements made (FLOPs counts, evaluations), by any command in this process."""
    from tokenbench import api
    from tokenbench.measure import flop_count

    calls = []
    real_flops, real_eval = flop_count.flops, api.evaluate

    def flops(*a, **k):
        calls.append("flops")
        return real_flops(*a, **k)

    def evaluate(*a, **k):
        calls.append("accuracy")
        return real_eval(*a, **k)

    monkeypatch.setattr(flop_count, "flops", flops)
    monkeypatch.setattr(api, "evaluate", evaluate)
    return calls


def refused(cli, where: Path, *args, match: str):
    before = snapshot(where)
    code, out, err = cli(*args)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert snapshot(where) == before


# --------------------------------------------------------------------------- writable before measuring

def test_sweep_out_that_refuses_files_is_refused_before_measuring(cli, tmp_path, measured):
    """records/ writable, the sweep directory itself not (where sweep.json, the FLOPs cache and the
    tables go): the sweep ended in an internal error after the FLOPs search."""
    out = tmp_path / "out"
    (out / "records").mkdir(parents=True)
    with read_only(out):
        refused(cli, out, "run", "--model", TINY, "-m", "tome", "--flops-targets", "0.7", "--measure", "flops",
                "--out", str(out), "--no-plots", match=f"output directory {out} is not writable")
    assert measured == []


def test_sweep_file_out_and_figure_out_refused_before_measuring(cli, tmp_path, measured):
    out = tmp_path / "out"
    (out / "records").mkdir(parents=True)
    sweep = tmp_path / "s.toml"
    sweep.write_text(f'name = "s"\nout = "{out}"\nmodels = ["{TINY}"]\nmeasure = ["flops"]\n[methods.topk]\n')
    with read_only(out):
        refused(cli, out, "run", str(sweep), "--no-plots", match=f"output directory {out} is not writable")
        refused(cli, out, "figure", "tome-deit-s", "--model", TINY, "--no-throughput", "--no-accuracy",
                "--out", str(out), match=f"output directory {out} is not writable")
    assert measured == []


def test_results_dir_refusing_files_though_os_access_allows_is_caught_before_the_evaluation(
        cli, tmp_path, measured, monkeypatch):
    """``os.access`` predicts from permission bits (and says yes to root; network and FUSE mounts
    may still refuse): the evaluation ran, then its record could not be written and was lost."""
    res = tmp_path / "res"
    (res / "records").mkdir(parents=True)
    monkeypatch.setattr(os, "access", lambda *a, **k: True)
    with read_only(res / "records"):
        for args in (["eval", TINY, "--data", "synthetic", "--limit", "8"], ["flops", TINY]):
            refused(cli, res, *args, "--results", str(res), match=f"results directory {res / 'records'} is not "
                                                                    "writable")
    assert measured == []


def test_results_path_that_is_a_file_refused_by_every_command(cli, tmp_path, measured):
    f = tmp_path / "plain.txt"
    f.write_text("x")
    for args in (["flops", TINY, "--results", str(f)], ["throughput", TINY, "--results", str(f)],
                 ["eval", TINY, "--data", "synthetic", "--results", str(f)],
                 ["run", "--model", TINY, "-m", "topk", "--measure", "flops", "--out", str(f)]):
        refused(cli, tmp_path, *args, match=f"{f} is not a directory")
    assert measured == []


@pytest.fixture(scope="module")
def flops_out(tmp_path_factory):
    """A finished FLOPs-only tiny sweep."""
    from typer.testing import CliRunner

    from tokenbench.cli.app import app

    out = tmp_path_factory.mktemp("flops") / "out"
    r = CliRunner().invoke(app, ["run", "--model", TINY, "-m", "topk", "--set", "keep_rate=0.5", "--measure",
                                 "flops", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    return out


def test_report_into_read_only_plots_or_directory_is_one_line(cli, flops_out):
    out = flops_out
    (out / "plots").mkdir(exist_ok=True)
    with read_only(out / "plots"):
        refused(cli, out, "report", str(out), match=f"plots directory {out / 'plots'} is not writable")
        code, _, err = cli("report", str(out), "--no-plots", "--json")  # the tables alone can be written
        assert code == 0, err
    with read_only(out):
        refused(cli, out, "report", str(out), "--no-plots", match=f"output directory {out} is not writable")


# --------------------------------------------------------------------------- end-of-sweep output

REFERENCE = Path(__file__).resolve().parent.parent / "results" / "default"


@pytest.mark.skipif(not (REFERENCE / "records").is_dir(), reason="no reference results in this checkout")
def test_summary_table_fits_80_columns_with_every_number_whole():
    """The default sweep's table (26 rows: schedules, seeds, fine-tuned runs, a flag) on an 80-column
    terminal: it was 14 columns, every cell folded into strips of 4 characters."""
    from rich.console import Console

    from tokenbench.report.collect import collect
    from tokenbench.report.tables import summary_table

    res = collect(REFERENCE)
    buf = StringIO()
    Console(file=buf, width=80, color_system=None).print(summary_table(res))
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    tokens = set(re.findall(r"[^\s│|]+", text))
    for r in res["display"]:
        assert f"{100 * r.flops_rel:.1f}%" in tokens, (r.label, text)
        assert r.speedup is None or f"{r.speedup:.2f}x" in tokens, (r.label, text)
        assert r.top1 is None or any(t.startswith(f"{r.top1:.2f}") for t in tokens), (r.label, text)
        assert r.top1_lo is None or f"{r.top1_hi:.1f}]" in text, (r.label, text)   # the interval whole
        assert all(f in tokens or f + "," in tokens for f in r.flags), (r.label, r.flags, text)
    assert any(r.row_type == "mean" for r in res["display"])  # a seed-averaged row is among them
    assert any(r.flags for r in res["display"])


def test_summary_points_to_the_full_table(cli, flops_out):
    code, out, err = cli("report", str(flops_out), "--no-plots")
    assert code == 0, err
    assert f"the full table is {flops_out / 'results.md'}" in out
    drawn = sorted((flops_out / "plots").glob("*.png"))   # none from FLOPs alone (other tests here add records)
    assert ("plots in" in out) == bool(drawn), (out, drawn)


class _Tty(StringIO):
    def isatty(self):
        return True


def _run_on_a_terminal(*args) -> tuple[int, str, str]:
    """The CLI in-process with stderr a terminal (so progress bars are drawn), 80 columns."""
    from conftest import run_cli

    out, err = StringIO(), _Tty()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"
    try:
        code = run_cli(args, out, err)
    finally:
        if old is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = old
    return code, out.getvalue(), re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", err.getvalue())  # colours out


def test_progress_counts_the_measurements_to_make_and_estimates_the_time_left(tmp_path):
    out = tmp_path / "out"
    base = ["run", "--model", TINY, "-m", "topk", "--measure", "flops", "--out", str(out), "--no-plots"]
    code, stdout, err = _run_on_a_terminal(*base, "--set", "keep_rate=[0.5,0.7]")
    assert code == 0, err
    assert "3/3 measurements" in err and " left " in err  # rich's TimeRemainingColumn
    assert "3 runs, 3 measurements: 3 made, 0 reused" in stdout
    # an extended sweep: the bar counts what is left to measure, the summary says the same
    code, stdout, err = _run_on_a_terminal(*base, "--set", "keep_rate=[0.5,0.7,0.9]")
    assert code == 0, err
    assert "1/1 measurements" in err and "3/4" not in err and "4/4" not in err
    assert "4 runs, 4 measurements: 1 made, 3 reused" in stdout


def test_matched_flops_search_reports_what_it_searches_and_its_counts(tmp_path):
    sw = S.parse_sweep({"name": "t", "models": [TINY], "measure": ["flops"], "flops_targets": [0.5],
                        "methods": {"topk": {}, "tome": {"prop_attn": [True, False]}}})
    seen = []
    S.expand(sw, S.FlopsSearch(tmp_path / "cache.json"), on_search=lambda *a: seen.append(a))
    assert S.count_searches(sw) == 3
    starts = [(done, what) for done, total, what, _ in seen if what]
    assert sorted({w for _, w in starts}) == ["tome: r for 0.5 x dense", "topk: keep_rate for 0.5 x dense"]
    assert all(total == 3 for _, total, _, _ in seen) and seen[-1][:3] == (3, 3, "")
    assert [d for d, _ in starts] == sorted(d for d, _ in starts) and {d for d, _ in starts} == set(range(3))
    counts = [c for *_, c in seen]
    assert counts == sorted(counts) and counts[-1] > 0  # fvcore counts made, reported as they are made


def test_cli_search_bar_on_a_terminal(tmp_path):
    code, _, err = _run_on_a_terminal("run", "--model", TINY, "-m", "topk", "--flops-targets", "0.6",
                                      "--measure", "flops", "--out", str(tmp_path / "o"), "--no-plots")
    assert code == 0, err
    assert re.search(r"1/1 searches \(\d+ fvcore counts\)", err), err[-2000:]


# --------------------------------------------------------------------------- claims

def test_claim_is_exclusive_names_its_holder_and_is_released_on_error(tmp_path):
    from tokenbench.store import Claim

    a, b = Claim(tmp_path, "k"), Claim(tmp_path, "k")
    with a:
        assert a.held and (tmp_path / "k.claim").is_file()
        with b:
            assert not b.held
            assert b.holder["pid"] == os.getpid() and b.holder["host"] and b.holder["since"]
        assert (tmp_path / "k.claim").is_file()  # b held nothing, so removed nothing
    assert not (tmp_path / "k.claim").exists()
    with pytest.raises(KeyboardInterrupt):
        with Claim(tmp_path, "k") as c:
            assert c.held
            raise KeyboardInterrupt
    assert not (tmp_path / "k.claim").exists()


def test_stale_claims_are_taken_over(tmp_path):
    import socket

    from tokenbench.store import Claim

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # a pid whose process is gone
    (tmp_path / "dead.claim").write_text(json.dumps({"host": socket.gethostname(), "pid": p.pid, "since": "x"}))
    with Claim(tmp_path, "dead") as c:
        assert c.held
    # another host's claim: alive unless its time stamp is older than the timeout
    (tmp_path / "far.claim").write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "x"}))
    with Claim(tmp_path, "far", stale_after=60) as c:
        assert not c.held
    old = time.time() - 120
    os.utime(tmp_path / "far.claim", (old, old))
    with Claim(tmp_path, "far", stale_after=60) as c:
        assert c.held
    assert not list(tmp_path.glob("*.claim*"))


def test_a_held_claim_keeps_its_time_stamp_fresh(tmp_path):
    from tokenbench.store import Claim

    with Claim(tmp_path, "k", heartbeat=0.05) as c:
        old = time.time() - 1000
        os.utime(c.path, (old, old))
        time.sleep(0.5)
        assert time.time() - c.path.stat().st_mtime < 100
        assert not Claim(tmp_path, "k", stale_after=100).acquire()


@pytest.fixture
def slow_flops(monkeypatch):
    """FLOPs "measurements" that take 0.2 s and are counted per run (the real count is not thread-safe)."""
    from tokenbench.measure import flop_count

    made = Counter()
    lock = threading.Lock()

    def flops(net, img_size=None, **k):
        time.sleep(0.2)
        with lock:
            made[id(net)] += 1
        return {"gflops": 0.01, "params_m": 0.01}

    monkeypatch.setattr(flop_count, "flops", flops)
    return made


def _flops_sweep(tmp_path):
    sw = S.parse_sweep({"name": "c", "out": str(tmp_path / "out"), "models": [TINY], "measure": ["flops"],
                        "methods": {"topk": {"keep_rate": [0.3, 0.5, 0.7]}, "tome": {"r": [1, 2]}}})
    out, runs, keys, _ = S.prepare(sw)
    return sw, out, runs, [k["flops"] for k in keys]


def test_two_runners_measure_every_run_exactly_once(tmp_path, slow_flops, monkeypatch):
    from tokenbench import runner

    sw, out, runs, planned = _flops_sweep(tmp_path)
    made = Counter()
    real = runner.measure_run

    def counting(kind, spec, *a, **k):
        rec, reused = real(kind, spec, *a, **k)
        if not reused:
            made[rec["key"]] += 1
        return rec, reused

    monkeypatch.setattr(runner, "measure_run", counting)
    results, notes = {}, []

    def runner_thread(name):
        results[name] = S.execute(sw, runs, Store(out), on_note=notes.append)

    threads = [threading.Thread(target=runner_thread, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a runner did not finish"
    assert sorted(made) == sorted(planned) and set(made.values()) == {1}, made
    for steps in results.values():  # each runner reports every run, measured by it or by the other
        assert sorted(s.key for s in steps) == sorted(planned)
    assert sum(not s.reused for steps in results.values() for s in steps) == len(planned)
    assert sorted(r["key"] for r in Store(out).records()) == sorted(planned)
    assert not list((out / "claims").iterdir())


def test_runner_waits_for_a_claimed_run_and_measures_it_if_the_holder_gives_up(tmp_path, slow_flops):
    sw, out, runs, planned = _flops_sweep(tmp_path)
    store = Store(out)
    other = store.claim(planned[2])
    assert other.acquire()  # another runner measuring run 2
    notes, result = [], {}
    t = threading.Thread(target=lambda: result.setdefault("steps", S.execute(sw, runs, store, on_note=notes.append)))
    t.start()
    deadline = time.monotonic() + 30
    while not notes and time.monotonic() < deadline:
        time.sleep(0.05)
    assert notes and "waiting for 1 measurement(s) another runner is making" in notes[0]
    assert f"pid {os.getpid()}" in notes[0]
    assert len(store.records()) == len(planned) - 1 and t.is_alive()  # all but the claimed one, then waits
    other.release()  # it gave up without a record
    t.join(30)
    assert not t.is_alive()
    steps = result["steps"]
    assert sorted(s.key for s in steps) == sorted(planned) and not any(s.reused for s in steps)
    assert sorted(r["key"] for r in store.records()) == sorted(planned)
