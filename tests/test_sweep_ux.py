"""Issue 13, item 7: output directories checked before measuring."""

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
    from tokenbench import api, measure

    calls = []
    real_flops, real_eval = measure.flops, api.evaluate

    def flops(*a, **k):
        calls.append("flops")
        return real_flops(*a, **k)

    def evaluate(*a, **k):
        calls.append("accuracy")
        return real_eval(*a, **k)

    monkeypatch.setattr(measure, "flops", flops)
    monkeypatch.setattr(api, "evaluate", evaluate)
    return calls


def refused(cli, where: Path, *args, match: str):
    before = snapshot(where)
    code, out, err = cli(*args)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert snapshot(where) == before


# --------------------------------------------------------------------------- 7: writable before measuring

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

    from tokenbench.cli import app

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
