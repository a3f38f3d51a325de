#!/usr/bin/env python
"""The GPU check's plan (``make bench-gpu``): bench.py's steps by priority, within a time budget.

Steps, most important first (DeiT-S, fp16, batch 256 unless the variables below say otherwise):

1. ``eager``     dense and every method, eager;
2. ``graphs``    the same, the eager forward replayed as CUDA graphs (``--cuda-graphs``);
3. ``large``     ViT-B and ViT-L with ToMe r=8 (where ToMe published its 2x), eager and CUDA graphs;
4. ``compiled``  every setting under ``torch.compile`` if time remains.

Where ``BENCH_GPU_OFFICIAL`` names the folder of official clones, every step also times the
official ToMe, EViT and DynamicViT beside ours (``bench.py --official``) on the settings it has.

Each step runs bench.py in this process with ``--deadline`` at the budget's end: a setting whose
measured cost (the mean of the settings timed so far) would end past it is not started.  A step
whose cost (one setting's, measured in earlier steps; a compiled one's estimated at ten times an
eager one's) exceeds the time left is not started at all.  After every step ``OUT/bench-gpu.md`` is written
again: the plan with each step's status and seconds, every step's table, and one table of the
cells not reached and why (the time left, a refusal such as a method CUDA graphs cannot capture,
an error).

Variables: ``BENCH_GPU_OUT`` (default ``results/bench-gpu/DATE-TIME``), ``BENCH_GPU_BUDGET_S``
(600), ``BENCH_GPU_BATCH`` (256), ``BENCH_GPU_MIN_RUN_TIME`` (0.3), ``BENCH_GPU_COMPILE_MODE``
(default), ``BENCH_GPU_OFFICIAL`` (unset), ``BENCH_GPU_METHODS`` (bench.py ``--methods``: every
method).  ``BENCH_GPU_DRYRUN=1``: the whole plan on the CPU,
fp32, with the embedded model in every model's place, batch 2 and very short timings, to prove
the plan where no GPU is (the steps with CUDA graphs are refused there, and say so).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import bench

METHODS = ["none"] + [f"{m}:{':'.join(f'{k}={v}' for k, v in p.items())}" if p else m
                      for m, p in bench.SETTINGS if m != "none"]


# A compiled setting's cost against an eager one's before any was measured (inductor compiles
# for tens of seconds where an eager setting is timed in a few).
COMPILE_FACTOR = 10


def config(env=os.environ) -> dict:
    dry = env.get("BENCH_GPU_DRYRUN") == "1"
    out = env.get("BENCH_GPU_OUT") or f"results/bench-gpu/{time.strftime('%Y-%m-%d-%H%M', time.gmtime())}"
    return {
        "dry": dry, "out": Path(out), "budget_s": float(env.get("BENCH_GPU_BUDGET_S", 600)),
        "device": "cpu" if dry else "cuda", "precision": "fp32" if dry else "fp16",
        "batch": env.get("BENCH_GPU_BATCH", "2" if dry else "256"),
        "min_run_time": env.get("BENCH_GPU_MIN_RUN_TIME", "0.01" if dry else "0.3"),
        "compile_mode": env.get("BENCH_GPU_COMPILE_MODE", "default"),
        "official": env.get("BENCH_GPU_OFFICIAL"),
        "small": "default" if dry else "deit_small_patch16_224",
        "large": "default" if dry else "vit_base_patch16_224,vit_large_patch16_224",
        "methods": env.get("BENCH_GPU_METHODS") or ",".join(METHODS),
    }


def steps(cfg: dict) -> list[dict]:
    """The plan, most important first: (name, what it times, bench.py arguments, settings count)."""
    common = ["--device", cfg["device"], "--precision", cfg["precision"], "--batch-sizes", cfg["batch"],
              "--min-run-time", cfg["min_run_time"]]
    if cfg["official"] and offers_official():  # the official ToMe, EViT and DynamicViT beside ours, in every step
        common += ["--official", cfg["official"]]
    every = cfg["methods"]
    n = len(every.split(","))
    large = ["--models", cfg["large"], "--methods", "tome:r=8", "--cuda-graphs"]
    n_large = 2 * len(cfg["large"].split(","))
    return [
        {"name": "eager", "what": "dense and every method, eager", "settings": n,
         "args": ["--models", cfg["small"], "--methods", every, "--compile", "none"] + common},
        {"name": "graphs", "what": "dense and every method, CUDA graphs", "settings": n,
         "args": ["--models", cfg["small"], "--methods", every, "--compile", "none", "--cuda-graphs", "--no-eager"]
         + common},
        {"name": "large", "what": "ViT-B and ViT-L, ToMe r=8, eager and CUDA graphs", "settings": n_large,
         "args": large + ["--compile", "none"] + common},
        {"name": "compiled", "what": f"dense and every method, torch.compile {cfg['compile_mode']}",
         "settings": n, "cost_factor": COMPILE_FACTOR,
         "args": ["--models", cfg["small"], "--methods", every, "--compile", cfg["compile_mode"], "--no-eager"]
         + common},
    ]


def refusal(step: dict, cfg: dict):
    """Why a step cannot run on this machine at all (its columns need CUDA), or None."""
    import torch

    if "--cuda-graphs" in step["args"] and not (cfg["device"] == "cuda" and torch.cuda.is_available()):
        return f"not started: CUDA graphs need a CUDA device (this run is on {cfg['device']})"
    return None


def offers_official() -> bool:
    """Whether bench.py times the official implementations (``--official DIR``)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        bench.main(["--help"])
    return "--official" in buf.getvalue()


def run_step(step: dict, out: Path, deadline: float) -> tuple[str, list[dict]]:
    """Run one step's bench.py; (status, its cells not reached)."""
    argv = step["args"] + ["--deadline", f"{deadline:.1f}", "--out", str(out)]
    print(f"== {time.strftime('%H:%M:%S', time.gmtime())} {step['name']}: bench.py {' '.join(argv)}",
          file=sys.stderr, flush=True)
    log = _Tee(sys.stderr)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            code = bench.cli(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # a failed step leaves the others to run
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}", []
    data = json.loads((out / "bench.json").read_text()) if (out / "bench.json").is_file() else {}
    missed = [dict(m, step=step["name"]) for m in data.get("not_reached", [])]
    if code != 0:
        errors = [ln for ln in log.text().splitlines() if ln.startswith("error:")]
        return f"failed (exit {code}): {errors[-1][len('error: '):] if errors else 'see the log'}", missed
    return "done", missed


class _Tee(io.StringIO):
    """A stream that keeps what it is given and passes it on."""

    def __init__(self, to):
        super().__init__()
        self.to = to

    def write(self, s: str) -> int:
        self.to.write(s)
        return super().write(s)

    def text(self) -> str:
        return self.getvalue()


def write_summary(cfg: dict, plan: list[dict], missed: list[dict], started: float) -> str:
    """``OUT/bench-gpu.md``: the plan's status, every step's table, the cells not reached."""
    lines = [f"# bench-gpu: {'DRY RUN on the CPU, ' if cfg['dry'] else ''}{cfg['device']}, {cfg['precision']}, "
             f"batch {cfg['batch']}; budget {cfg['budget_s']:.0f} s, {time.time() - started:.0f} s used", "",
             "| step | what | status | seconds |", "|---|---|---|---|"]
    for s in plan:
        lines.append(f"| {s['name']} | {s['what']} | {s.get('status', 'not started yet')} | "
                     f"{s['seconds']:.0f} |" if "seconds" in s else
                     f"| {s['name']} | {s['what']} | {s.get('status', 'not started yet')} | - |")
    for s in plan:
        md = cfg["out"] / s["name"] / "bench.md"
        if md.is_file():
            lines += ["", f"## {s['name']}: {s['what']}", "", md.read_text().strip()]
    lines += ["", "## Not reached", ""]
    if missed:
        lines += ["| step | model | method | params | columns | reason |", "|---|---|---|---|---|---|"]
        lines += [f"| {m['step']} | {m['model']} | {m['method']} | {m['params']} | {m['columns']} | {m['reason']} |"
                  for m in missed]
    else:
        lines.append("Every cell of the plan was timed.")
    text = "\n".join(lines) + "\n"
    cfg["out"].mkdir(parents=True, exist_ok=True)
    (cfg["out"] / "bench-gpu.md").write_text(text)
    return text


def main(env=os.environ) -> int:
    cfg = config(env)
    started = time.time()
    deadline = started + cfg["budget_s"]
    plan = steps(cfg)
    missed: list[dict] = []
    per_setting: list[float] = []   # measured seconds per setting, over the steps run so far
    for step in plan:
        left = deadline - time.time()
        one = (sum(per_setting) / len(per_setting)) * step.get("cost_factor", 1) if per_setting else 0.0
        need = one  # a step starts if one setting fits; bench.py's --deadline stops it at the budget
        if one:
            step["args"] = step["args"] + ["--setting-cost", f"{one:.1f}"]
        refused = refusal(step, cfg)
        if refused or left <= 0 or need > left:
            step["status"] = refused or f"not started: about {need:.0f} s needed, {max(left, 0):.0f} s left"
            missed.append({"step": step["name"], "model": "all", "method": "all", "params": "", "columns": "all",
                           "reason": step["status"]})
        else:
            t0 = time.time()
            step["status"], cells = run_step(step, cfg["out"] / step["name"], deadline)
            step["seconds"] = time.time() - t0
            timed = step["settings"] - sum(1 for c in cells if c["columns"] == "all")
            if step["status"] == "done" and timed > 0:
                per_setting.append(step["seconds"] / timed)
            missed += cells
            if step["status"] != "done" and not cells:
                missed.append({"step": step["name"], "model": "all", "method": "all", "params": "",
                               "columns": "all", "reason": step["status"]})
        write_summary(cfg, plan, missed, started)
    print(write_summary(cfg, plan, missed, started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
