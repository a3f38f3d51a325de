"""`make bench-gpu`'s plan, run whole on the CPU (BENCH_GPU_DRYRUN=1) with the embedded model."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_times_by_priority_and_says_what_was_not_reached(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import bench_gpu

    out = tmp_path / "gpu"
    env = {"BENCH_GPU_DRYRUN": "1", "BENCH_GPU_OUT": str(out), "BENCH_GPU_BUDGET_S": "45",
           "BENCH_GPU_METHODS": "none,topk:keep_rate=0.7"}
    assert bench_gpu.main(env) == 0
    text = (out / "bench-gpu.md").read_text()
    plan = {ln.split("|")[1].strip(): ln.split("|")[3].strip() for ln in text.split("\n## ", 1)[0].splitlines()
            if ln.startswith("| ") and ln.split("|")[1].strip() in ("eager", "graphs", "large", "compiled")}
    assert plan["eager"] == "done"                                  # the first priority is timed
    assert "CUDA device" in plan["graphs"] and "CUDA device" in plan["large"]   # refused on a CPU, and why
    assert plan["compiled"].startswith(("not started", "done"))     # only if time remains
    eager = (out / "eager" / "bench.md").read_text()
    assert "| none " in eager and "aten_ops" in eager and "host_ms" in eager
    not_reached = text.split("## Not reached", 1)[1]
    assert "| graphs |" in not_reached and "| large |" in not_reached
    # top-k timed, or listed with the time it would have needed (a slow machine)
    assert "| topk " in eager or "| eager | default | topk | " in not_reached
    assert sys.modules["bench"].OVERHEAD  # the plan ran bench.py itself, in this process


def test_the_official_code_is_timed_in_every_step_where_its_clones_are_named(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import bench_gpu

    cfg = bench_gpu.config({"BENCH_GPU_DRYRUN": "1", "BENCH_GPU_OFFICIAL": str(tmp_path)})
    for step in bench_gpu.steps(cfg):
        assert step["args"][step["args"].index("--official") + 1] == str(tmp_path), step["name"]
    plain = bench_gpu.steps(bench_gpu.config({"BENCH_GPU_DRYRUN": "1"}))
    assert not any("--official" in step["args"] for step in plain)
