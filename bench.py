#!/usr/bin/env python
"""Speed of every method adapter against the dense model and against its FLOPs.

For each model and each method setting: GFLOPs, the FLOPs reduction (dense / method),
the measured throughput and the realised speedup, and their ratio: the share of the FLOPs
saving that turns into time.  An efficiency well below 1 means the adapter loses its
savings to overhead.  The speedup is a paired timing (:func:`tokenbench.measure.timing.speedup`):
the method and the dense model timed interleaved in rounds, in one process, on one input,
so that what else the machine does slows both alike; its interquartile range over rounds
is printed beside it.

Each figure is taken twice: eager, and under ``torch.compile`` (``--compile MODE``; the
dense model compiled the same way, so a compiled speedup is over compiled dense).  Compile
time is reported apart (``compile_s``), never inside a timing.

    python bench.py                              # DeiT-S and the embedded model, batch 1 and 16, CPU
    python bench.py --compile none               # eager columns only
    python bench.py --models deit_small_patch16_224 --batch-sizes 1,16,64,max --device cuda --precision fp16
    python bench.py --models convnext_tiny,swin_tiny_patch4_window7_224 --batch-sizes 16 --out results/bench-hierarchical
    python bench.py --models deit_small_patch16_224 --batch-sizes 16 --official ~/official   # and the authors' code

``--official DIR`` (DIR holds clones named ``owner+repo``, docs/verification.md): the official ToMe, EViT and DynamicViT built on the same weights as ours, their logits
checked equal to ours, then ours timed against them interleaved in every timing mode (eager, CUDA
graphs, compiled; a forward that cannot be captured is a line, not a failure; a table of its
own, ``vs_official`` = ours over the official); a missing clone is one line.

Hierarchical models (ConvNeXt, Swin) get :data:`SETTINGS_HIERARCHICAL` and one more row, the
gather / scatter overhead (:data:`OVERHEAD_OF`), also tabulated apart below the main table.

Never run it while something else computes: the machine's load is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# THE SETTINGS TIMED (data, not logic): (method, parameters) per model; the dense model ("none")
# first, since every other setting is timed against it.  The embedded model has 49 patch tokens,
# so ToMe merges fewer per block there, to span the same range of FLOPs.
# timed on every ViT (after its dense model and ToMe at two merge counts)
_PRUNING = [
    ("evit", {"keep_rate": 0.7}),
    ("evit", {"keep_rate": 0.5}),
    ("topk", {"keep_rate": 0.7}),
    ("random", {"keep_rate": 0.7}),
    ("dynamicvit", {"keep_rate": 0.7}),
    ("dynamicvit", {"keep_rate": 0.5}),
]
# the baselines: a lower input resolution, and the token grid average-pooled at one block
_BASELINES = [
    ("resize", {"scale": 0.7}),
    ("resize", {"scale": 0.5}),
    ("pool", {"half_block": 8}),
]
SETTINGS = [("none", {}), ("tome", {"r": 8}), ("tome", {"r": 13})] + _PRUNING + [
    # the field's other methods at their official DeiT-S defaults (see `tokenbench list`)
    ("ats", {}),
    ("ppt", {}),
    ("pitome", {}),
    ("tofu", {}),
    ("diffrate", {}),
    ("mctf", {}),
    ("zerotprune", {}),
    ("dct", {}),
    ("kmedoids", {}),
    ("dpcknn", {}),
] + _BASELINES
SETTINGS_EMBEDDED = [("none", {}), ("tome", {"r": 2}), ("tome", {"r": 3})] + _PRUNING + _BASELINES
SETTINGS_HIERARCHICAL = [
    ("none", {}),
    ("dynamicvit", {"keep_rate": 0.7}),
    ("dynamicvit", {"keep_rate": 0.9}),
    ("random", {"keep_rate": 0.7}),
    ("random", {"keep_rate": 0.9}),
]
SETTINGS_BY_MODEL = {"default": SETTINGS_EMBEDDED}               # by model name, first
SETTINGS_BY_FAMILY = {"convnext": SETTINGS_HIERARCHICAL, "swin": SETTINGS_HIERARCHICAL}  # then by backbone
# any other model: SETTINGS
# The gather / scatter overhead (hierarchical models; --no-overhead skips it): the blocks this
# setting splits into a slow and a fast path, run with EVERY position on the slow path and no
# fast path.  Same FLOPs as dense: its slowdown over dense is what the gather, the scatter and
# the bookkeeping cost alone (the slow path's; a real selection adds the complement and the fast
# path's gather and scatter).
OVERHEAD_OF = ("dynamicvit", {"keep_rate": 0.7})
OVERHEAD = "gather-scatter"   # its method column
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="deit_small_patch16_224,default")
    ap.add_argument("--batch-sizes", default="1,16", help="comma-separated; max: the largest power of two that fits")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", help="fp32, fp16 or bf16 (autocast)")
    ap.add_argument("--compile", default="default",
                    help="torch.compile mode of the compiled columns (default, max-autotune, ...), or none")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="CUDA only: add columns timed with the eager model captured as CUDA graphs and replayed")
    ap.add_argument("--no-eager", action="store_true",
                    help="time only the CUDA-graph and compiled columns (the eager ones were timed apart)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--min-run-time", type=float, default=2.0)
    ap.add_argument("--methods", default=None,
                    help="comma-separated subset of methods (and " + OVERHEAD + "); METHOD:KEY=VALUE[:KEY=VALUE] "
                         "times that one setting (e.g. tome:r=13)")
    ap.add_argument("--no-overhead", action="store_true",
                    help="hierarchical models: skip the gather/scatter overhead row")
    ap.add_argument("--deadline", type=float, default=None, metavar="EPOCH_S",
                    help="start no setting whose measured cost (the mean of the settings timed so far) would "
                         "end past this time (seconds since the epoch); such settings are listed as not reached")
    ap.add_argument("--setting-cost", type=float, default=None, metavar="S",
                    help="with --deadline: the seconds a setting is expected to take before any was timed here")
    ap.add_argument("--out", default=None, help="where to write bench.md / bench.csv / bench.json (default "
                                                "results/bench; with --redraw, the folder redrawn)")
    ap.add_argument("--official", default=None, metavar="DIR",
                    help="also time the official ToMe, EViT and DynamicViT cloned in DIR (as owner+repo) against ours")
    ap.add_argument("--redraw", default=None, metavar="DIR",
                    help="time nothing: write the tables again from DIR/bench.json (into DIR, or --out)")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.redraw:
        return redraw(Path(args.redraw), Path(args.out or args.redraw))
    args.out = args.out or "results/bench"
    args.models = ",".join(m.strip() for m in args.models.split(",") if m.strip())
    check_arguments(args)
    bench = _Bench(args)
    for model_name in args.models.split(","):
        bench.run_model(model_name)
    env = bench.env or _env(args, bench.threads, bench.code)
    head = _heading(env, args, bench.modes, bench.threads, bench.load0)
    print(head)
    print(write_tables(Path(args.out), head, env, bench.rows, bench.official, bench.missed))
    return 0


class _Bench:
    """One invocation: its settings, the rows timed so far, the settings missed and why."""

    def __init__(self, args) -> None:
        import torch

        from tokenbench.measure.env import default_threads
        from tokenbench.store import git_commit

        self.args = args
        self.threads = args.threads or default_threads()
        torch.set_num_threads(self.threads)
        self.modes = timing_modes(args)
        self.timing = dict(device=args.device, precision=args.precision, threads=self.threads)
        self.rows: list[dict] = []
        self.missed: list[dict] = []   # settings not timed, and why (the deadline, a refusal)
        self.official = {"rows": [], "notes": [], "root": official_root(args.official)}
        self.load0 = os.getloadavg()[0]
        self.env: dict = {}            # the machine, read once
        self.code = git_commit(changed=True)  # the code as it stood when the run began: what it imported
        self.costs: list[float] = [args.setting_cost] if args.setting_cost else []  # seconds per setting
        self.batch_sizes = parse_batch_sizes(args.batch_sizes)

    def jobs(self, model_name: str) -> list:
        """(method, parameters, model builder) of each setting timed on ``model_name``, dense first."""
        from tokenbench.api import load

        args = self.args
        family = model_family(model_name)
        settings = settings_for(model_name, family)
        if args.methods:
            settings, keep = chosen_settings(settings, args.methods)
        jobs = [(method, params, lambda m=method, p=params: load(model_name, m, p)[0]) for method, params in settings]
        if family in SETTINGS_BY_FAMILY and not args.no_overhead and (not args.methods or OVERHEAD in keep):
            jobs.append((OVERHEAD, {"of": OVERHEAD_OF[0], **OVERHEAD_OF[1], "slow": "all"},
                         lambda: all_positions_model(model_name, split_blocks(model_name, *OVERHEAD_OF))))
        return jobs

    def run_model(self, model_name: str) -> None:
        """Every setting of ``model_name`` at every batch size, then the official code if asked."""
        from tokenbench.measure.flop_count import flops
        from tokenbench.measure.memory import max_batch_size
        from tokenbench.measure.overhead import overhead
        from tokenbench.report.render import params_json

        args, jobs = self.args, self.jobs(model_name)
        dense: dict = {}
        dense_net = None
        batches: list[int] = []
        for method, params, build in jobs:
            late = past_deadline(args.deadline, self.costs)
            if late:
                self.missed.append({"model": model_name, "method": method, "params": params_json(params, compact=True),
                                    "columns": "all", "reason": late})
                print(f"skip {model_name}/{method}: {late}", file=sys.stderr)
                if method == "none":  # nothing to pair the model's other settings with
                    self.missed += [{"model": model_name, "method": m, "params": params_json(p, compact=True),
                                     "columns": "all", "reason": late} for m, p, _ in jobs if m != "none"]
                    break
                continue
            started = time.time()
            try:
                net = build()
            except Exception as e:  # e.g. the embedded checkpoint missing
                why = f"cannot build ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                print(f"skip {model_name}/{method}: {why}", file=sys.stderr)
                self.missed.append({"model": model_name, "method": method, "params": params_json(params, compact=True),
                                    "columns": "all", "reason": why})
                if method == "none":  # nothing to pair the model's other settings with
                    self.missed += [{"model": model_name, "method": m, "params": params_json(p, compact=True),
                                     "columns": "all", "reason": "the dense model " + why}
                                    for m, p, _ in jobs if m != "none"]
                    break
                continue
            f = flops(net)
            ops = overhead(net)  # per forward, whatever the batch: the host's share of the time
            if method == "none":
                batches = [max_batch_size(net, args.device, args.precision) if b == "max" else b
                           for b in self.batch_sizes]
            for b in batches:
                if method == "none":
                    dense[b] = f["gflops"]
                elif dense_net is None:
                    print(f"skip {model_name}/{method}: no dense model to pair with", file=sys.stderr)
                    continue
                self.rows.append(self.timed_row(model_name, method, params, net, dense_net, b, f["gflops"],
                                                dense.get(b), ops))
                print(_fmt_row(self.rows[-1]), file=sys.stderr, flush=True)
                # the tables so far, after every row: a run stopped part-way keeps what it timed
                self.env = self.env or _env(args, self.threads, self.code)
                write_tables(Path(args.out), _heading(self.env, args, self.modes, self.threads, self.load0,
                                                      partial=True), self.env, self.rows, self.official, self.missed)
            self.costs.append(time.time() - started)
            if method == "none":
                dense_net = net
            else:
                del net
        if self.official["root"] is not None and dense_net is not None:
            timed = {(r["method"], r["params"]) for r in self.rows if r["model"] == model_name}
            settings = [(m, p) for m, p, _ in jobs if m != OVERHEAD and (m, params_json(p, compact=True)) in timed]
            time_official(model_name, settings, batches, self.modes, self.timing, args, self.official,
                          lambda: past_deadline(args.deadline, self.costs))
            self.env = self.env or _env(args, self.threads, self.code)
            write_tables(Path(args.out), _heading(self.env, args, self.modes, self.threads, self.load0, partial=True),
                         self.env, self.rows, self.official, self.missed)

    def timed_row(self, model_name: str, method: str, params: dict, net, dense_net, b: int, gflops: float,
                  g0, ops: dict) -> dict:
        """One setting's row at batch size ``b``: FLOPs, operator count, and each timing mode's columns
        (the dense model's throughput, a method's speedup over it); a refused mode is listed as missed."""
        from tokenbench.errors import UserError
        from tokenbench.measure.timing import speedup, throughput
        from tokenbench.report.render import params_json
        from tokenbench.report.rows import Row, method_family

        args = self.args
        flops_x = g0 / gflops if g0 else float("nan")
        family_col = "overhead" if method == OVERHEAD else method_family(method)
        row = {"model": model_name, "method": method, "family": family_col,
               "params": params_json(params, compact=True),
               "batch": b, "precision": args.precision, "gflops": round(gflops, 3),
               "flops_reduction": round(flops_x, 3), "aten_ops": ops["aten_ops"],
               "host_ms": ops["host_ms"] if ops["host_ms"] is None else round(ops["host_ms"], 2)}
        r_env: dict = {}
        for sfx, how in self.modes:
            try:
                if method == "none":
                    r = throughput(net, batch_size=b, min_run_time=args.min_run_time, latency=False, **how,
                                   **self.timing)
                    speed_x, q1, q3 = 1.0, 1.0, 1.0
                else:
                    r = speedup(net, dense_net, batch_size=b, min_run_time=2 * args.min_run_time, **how, **self.timing)
                    speed_x, q1, q3 = r["speedup"], r["speedup_q1"], r["speedup_q3"]
            except Exception as e:  # e.g. a per-image method cannot be captured as a CUDA graph, out of memory
                why = str(e) if isinstance(e, UserError) else \
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                self.missed.append({"model": model_name, "method": method, "params": row["params"],
                                    "columns": f"batch {b} {sfx.strip('_') or 'eager'}", "reason": why})
                print(f"skip {model_name}/{method} {sfx.strip('_') or 'eager'}: {why}", file=sys.stderr)
                continue
            timed = Row(model=model_name, label=method, method=method, params=params, family=family_col,
                        gflops=gflops, flops_rel=1 / flops_x if g0 else None, img_per_s=r["img_per_s"],
                        speedup=speed_x, speedup_q1=q1, speedup_q3=q3, batch_size=b, precision=args.precision)
            row.update(timing_columns(timed, flops_x, r["spread"], sfx))
            # the dense model's img/s in the same run: a method's img/s over it is its paired speedup's
            # run (the dense row's own img/s is another run, timed apart)
            row[f"dense_img_per_s{sfx}"] = round(r.get("baseline_img_per_s", r["img_per_s"]), 1)
            if how.get("compile"):
                row["compile_s"] = round(r.get("compile_s", float("nan")), 1)
                row["graph_breaks"] = r.get("graph_breaks")  # 0: one graph; more: per-image counts
            if how.get("cuda_graphs"):
                row["capture_s"] = round(r.get("capture_s", float("nan")), 2)
            row["busy"] = bool(row.get("busy")) or bool(r["env"].get("busy"))
            row["other_cores"] = max(row.get("other_cores") or 0.0, r["env"].get("other_cores") or 0.0)
            row["attention"] = r["env"].get("attention")
            r_env = r["env"]
        for k in ("busy", "other_cores", "attention"):  # after the timing columns
            row[k] = row.pop(k, None)
        row["notes"] = "; ".join(self.notes(method, params, net, r_env))
        return row

    @staticmethod
    def notes(method: str, params: dict, net, env: dict) -> list[str]:
        """What makes a row's figures other than what they seem (as a sweep's record warns)."""
        from tokenbench.inputs import varies_per_image
        from tokenbench.registry import get_method

        out = []
        if method not in ("none", OVERHEAD) and varies_per_image(get_method(method), net, params):
            out.append("per-image token counts: FLOPs of one random image, timed on a random batch "
                       "(tokenbench flops/throughput --data for real images)")
        if env.get("precision_note"):
            out.append(env["precision_note"])
        return out


def official_root(value):
    """``--official DIR`` as a folder (one line and exit 2 where it is not one), or None."""
    if value is None:
        return None
    from tokenbench.errors import UserError

    root = Path(value).expanduser()
    if not root.is_dir():
        raise UserError(f"--official {value}: not a folder (clone the official repositories into it as owner+repo)")
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)  # official_code/ sits beside this script
    return root


def time_official(model_name: str, settings: list, batches: list, modes: list, timing: dict, args,
                  official: dict, late=lambda: None) -> None:
    """Ours against the official code for ``model_name``'s settings that have one (official_code/), those
    of ours that were timed; ``late()``: why the next one is not started (the deadline), or None."""
    from official_code.timing import official_rows

    rows, notes = official_rows(model_name, settings, batches, modes, timing, args.min_run_time, official["root"],
                                lambda line: print(line, file=sys.stderr, flush=True), late)
    official["rows"] += rows
    official["notes"] += [n for n in notes if n not in official["notes"]]  # a missing clone: one line per run


def check_arguments(args) -> None:
    """Refuse, in one line and before anything is built or timed, what cannot run: an unknown model,
    precision or device, a run time that is not positive, bad batch sizes."""
    from tokenbench.errors import UserError
    from tokenbench.measure.env import resolve_device
    from tokenbench.measure.forward import PRECISIONS
    from tokenbench.models import check_model_name

    for name in args.models.split(","):
        check_model_name(name.strip())
    if args.precision not in PRECISIONS:
        raise UserError(f"--precision {args.precision}: use {', '.join(PRECISIONS)}")
    resolve_device(args.device)
    if not args.min_run_time > 0:
        raise UserError(f"--min-run-time {args.min_run_time:g}: must be a positive number of seconds")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be at least 1")
    parse_batch_sizes(args.batch_sizes)


def parse_batch_sizes(value: str) -> list:
    """``--batch-sizes`` as a list of positive ints and ``"max"`` (one line where it is not)."""
    from tokenbench.errors import UserError

    out = []
    for b in value.split(","):
        b = b.strip()
        if b == "max":
            out.append(b)
        elif b.isdigit() and int(b) > 0:
            out.append(int(b))
        else:
            raise UserError(f"--batch-sizes {value}: {b!r} is neither a positive whole number nor max")
    return out


def past_deadline(deadline, costs: list[float]):
    """Why the next setting is not started (None: start it): its cost, the mean of the settings
    timed so far, would end past ``deadline``.  Nothing is refused before a cost was measured."""
    if deadline is None or not costs:
        return None
    need, left = sum(costs) / len(costs), deadline - time.time()
    if need <= left:
        return None
    return f"time: about {need:.0f} s needed, {max(left, 0):.0f} s left"


def timing_modes(args) -> list[tuple[str, dict]]:
    """The timing columns, in order: (column suffix, the timing's keyword arguments).  Eager
    first; ``--cuda-graphs`` adds ``_graphs`` (refused in one line off CUDA); ``--compile``
    adds ``_compiled``."""
    from tokenbench.errors import UserError
    from tokenbench.measure.compilation import compile_mode
    from tokenbench.measure.env import resolve_device

    modes = [] if getattr(args, "no_eager", False) else [("", {})]
    if args.cuda_graphs:
        from tokenbench.measure.graphs import check_device

        check_device(resolve_device(args.device))
        modes.append(("_graphs", {"cuda_graphs": True}))
    mode = compile_mode(args.compile)
    if mode:
        modes.append(("_compiled", {"compile": mode}))
    if not modes:
        raise UserError("--no-eager leaves no column to time: add --cuda-graphs or --compile MODE")
    return modes


def _env(args, threads: int, code: dict) -> dict:
    from tokenbench.measure.env import env_info, resolve_device

    return {**env_info(resolve_device(args.device), threads), "code": code}


def _heading(env: dict, args, modes, threads: int, load0: float, partial: bool = False) -> str:
    """The tables' first line: device, versions, precision, compile mode, the machine's load."""
    head = (f"device {env['device_name']} ({env['device']}), {threads} threads, torch {env['torch']}, "
            f"timm {env['timm']}, {args.precision}, compiled columns: torch.compile mode "
            f"{dict(modes).get('_compiled', {}).get('compile') or 'none'}"
            f"{', CUDA-graph columns: the eager forward replayed' if '_graphs' in dict(modes) else ''}; "
            f"aten_ops: operators per forward (batch 2), host_ms: a forward on an empty batch (CPU); "
            f"load average {load0:.2f} before, {os.getloadavg()[0]:.2f} after")
    if env.get("code"):
        from tokenbench.store import code_line

        head += f"; {code_line(env['code'])}"
    if env["device"] == "cuda":
        head += (f"; GPU {env.get('gpu')}, driver {_driver()}, CUDA {env.get('cuda')}, "
                 f"cudnn.benchmark on, TF32 matmul {env.get('tf32_matmul')}")
    return head + ("; PARTIAL: the run had not finished when this was written" if partial else "")


def model_family(model_name: str):
    """The backbone family of ``model_name`` (vit, convnext, swin), or None if it cannot be built."""
    from tokenbench.api import load
    from tokenbench.backbones import backbone_of

    try:
        return backbone_of(load(model_name)[0]).name
    except Exception:  # the timing loop says why it skips the model
        return None


def settings_for(model_name: str, family) -> list:
    return SETTINGS_BY_MODEL.get(model_name) or SETTINGS_BY_FAMILY.get(family) or SETTINGS


def chosen_settings(settings: list, methods: str) -> tuple[list, set]:
    """``--methods``: (the settings to time, dense first; the method names chosen).  A bare name
    keeps that method's listed settings; ``METHOD:KEY=VALUE[:KEY=VALUE]`` times that setting
    (values as ``--set`` reads them; no commas inside)."""
    from tokenbench.registry import get_method, parse_set

    out, keep = [s for s in settings if s[0] == "none"], {"none"}
    for item in filter(None, (m.strip() for m in methods.split(","))):
        name, *pairs = item.split(":")
        keep.add(name)
        if pairs:
            setting = (name, parse_set(pairs))
            get_method(name).validate(setting[1])  # an unknown method or parameter: one line
            chosen = [setting] if setting not in out else []
        else:  # its listed settings; a method the model's list lacks: its defaults
            chosen = [s for s in settings if s[0] == name and s not in out] or \
                ([(name, {})] if name != OVERHEAD and not any(s[0] == name for s in out) else [])
            if chosen == [(name, {})]:
                get_method(name)  # an unknown method: one line
        out += chosen
    return out, keep


def split_blocks(model_name: str, method: str, params: dict) -> list[int]:
    """The blocks ``method`` splits into a slow and a fast path on ``model_name``."""
    from tokenbench.api import load
    from tokenbench.backbones import plan_of

    return sorted(plan_of(load(model_name, method, params)[0]).subset)


def all_positions_model(model_name: str, blocks: list[int]):
    """The dense model with the slow / fast split installed at ``blocks`` and every position on
    the slow path, in a fixed shuffled order (as a method's selection arrives), no fast path:
    dense FLOPs and output, plus the gather, the scatter and the bookkeeping."""
    import torch

    from tokenbench import backbones
    from tokenbench.api import load

    net = load(model_name)[0]
    plan = backbones.prepare(net, OVERHEAD)
    orders: dict = {}

    def every_position(block, tokens, st):
        b, n = tokens.shape[0], tokens.shape[1]
        if (n, tokens.device) not in orders:
            orders[n, tokens.device] = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(tokens.device)
        return orders[n, tokens.device].expand(b, n), None

    for i in blocks:
        plan.subset[i] = every_position
    return net


def overhead_table(rows: list[dict]) -> str:
    """The gather / scatter overhead rows apart: the slowdown over dense in percent (and the
    paired speedup with its quartiles over rounds)."""
    lines = ["| model | batch | eager slowdown | compiled slowdown |", "|---|---|---|---|"]
    for r in rows:
        if r.get("method") != OVERHEAD:
            continue
        cells = [f"{100 * (1 / r[k] - 1):+.1f}% (x{r[k]:.3f} {r['speedup_iqr' + k[len('speedup'):]]})"
                 if r.get(k) else "-" for k in ("speedup", "speedup_compiled")]
        lines.append(f"| {r['model']} | {r['batch']} | {cells[0]} | {cells[1]} |")
    if len(lines) == 2:
        return ""
    return ("Gather / scatter overhead: the blocks " + OVERHEAD_OF[0] + " splits, every position on the slow path, "
            "no fast path (dense FLOPs); slowdown over dense\n\n" + "\n".join(lines))


def timing_columns(row, flops_x: float, spread: float, sfx: str) -> dict:
    """One timing's columns (eager: no suffix; compiled: ``_compiled``) from its typed row.

    Efficiency: the speedup over the FLOPs reduction ``flops_x`` (dense / method)."""
    from tokenbench.report.render import quartiles_text

    return {f"img_per_s{sfx}": round(row.img_per_s, 1), f"speedup{sfx}": round(row.speedup, 3),
            f"speedup_iqr{sfx}": quartiles_text(row.speedup_q1, row.speedup_q3),
            f"iqr_pct{sfx}": round(100 * spread, 1),
            f"efficiency{sfx}": round(row.speedup / flops_x, 3) if row.flops_rel else float("nan")}


def markdown(rows: list[dict]) -> str:
    import pandas as pd

    df = pd.DataFrame(rows)
    return df.to_markdown(index=False) if hasattr(df, "to_markdown") and _has_tabulate() else df.to_string(index=False)


def write_tables(out: Path, head: str, env: dict, rows: list[dict], official: dict | None = None,
                 missed: list[dict] = ()) -> str:
    """bench.md, bench.csv and bench.json in ``out``; returns the Markdown table (and the overhead's,
    the settings not timed with their reasons, and with ``--official`` the table of ours against
    the official code)."""
    import pandas as pd

    table = markdown(rows)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "bench.csv", index=False)
    extra = "\n\n".join(t for t in (overhead_table(rows),
                                      ("Not timed\n\n" + markdown(list(missed))) if missed else "") if t)
    data = {"env": env, "head": head, "rows": rows, "not_reached": list(missed)}
    if official and official.get("root") is not None:
        from official_code.timing import official_table

        extra = "\n\n".join(filter(None, [extra, official_table(official["rows"], official["notes"],
                                                                   official["root"])]))
        data["official"] = {"dir": str(official["root"]), "rows": official["rows"], "notes": official["notes"]}
    (out / "bench.md").write_text(f"{head}\n\n{table}\n" + (f"\n{extra}\n" if extra else ""))
    (out / "bench.json").write_text(json.dumps(data, indent=1))
    return f"{table}\n\n{extra}" if extra else table


def redraw(src: Path, out: Path) -> int:
    """The tables again from ``src``/bench.json, timing nothing (the heading from the json, or bench.md's)."""
    from tokenbench.errors import UserError

    if not (src / "bench.json").is_file():
        raise UserError(f"--redraw {src}: no bench.json there (pass the folder a bench.py run wrote)")
    try:
        data = json.loads((src / "bench.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"--redraw {src}: bench.json is not readable JSON ({e})")
    head = data.get("head") or (src / "bench.md").read_text().split("\n", 1)[0]
    from tokenbench.report.rows import method_family

    for r in data["rows"]:  # records written before the family column: the method's declaration
        r.setdefault("family", method_family(r["method"]))
    data["rows"] = [{k: r[k] for k in ["model", "method", "family"] + [k for k in r if k not in
                                                                        ("model", "method", "family")]}
                    for r in data["rows"]]
    official = data.get("official")
    if official:
        official = {"root": Path(official["dir"]), "rows": official["rows"], "notes": official["notes"]}
        here = str(Path(__file__).resolve().parent)
        if here not in sys.path:
            sys.path.insert(0, here)
    print(write_tables(out, head, data["env"], data["rows"], official, data.get("not_reached", [])))
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401

        return True
    except ImportError:
        return False


def _driver() -> str:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        return out.splitlines()[0] if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _fmt_row(r: dict) -> str:
    line = (f"{r['model']:<24} {r['method']:<10} {r['params']:<18} b={r['batch']:<3} {r['gflops']:7.3f} GFLOPs "
            f"x{r['flops_reduction']:.2f} FLOPs")
    if "img_per_s" in r:
        line += f"  eager {r['img_per_s']:8.1f} img/s  x{r['speedup']:.2f} speed  eff {r['efficiency']:.2f}"
    if r.get("aten_ops") is not None:
        line += f"  {r['aten_ops']} ops"
    if "img_per_s_graphs" in r:
        line += f"  graphs {r['img_per_s_graphs']:8.1f} img/s  x{r['speedup_graphs']:.2f} speed"
    if "img_per_s_compiled" in r:
        line += (f"  compiled {r['img_per_s_compiled']:8.1f} img/s  x{r['speedup_compiled']:.2f} speed  "
                 f"eff {r['efficiency_compiled']:.2f}  ({r['compile_s']:.0f} s to compile)")
    return line


def cli(argv=None) -> int:
    """:func:`main`, with bad input as one line and exit status 2 (``--debug``: the traceback)."""
    from tokenbench.cli.main import script_main

    return script_main(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
