"""``tokenbench run`` (a sweep: measure what is not yet recorded, then tables and plots) and
``tokenbench report`` (tables and plots from the records alone)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UserError


def _numbers(text: Optional[str], what: str, kind: type = float) -> Optional[list]:
    """A comma-separated option (``0.5,0.7`` or ``[0.5, 0.7]``) as a list of ``kind``."""
    if text is None:
        return None
    try:
        return [kind(x) for x in text.replace(" ", "").strip("[]").split(",") if x]
    except ValueError:
        noun = "integers" if kind is int else "numbers"
        raise UserError(f"{what} takes comma-separated {noun}, got {text!r}") from None


def _words(text: Optional[str]) -> Optional[list[str]]:
    if text is None:
        return None
    return [w for w in text.replace(" ", "").split(",") if w]


def _public_row(r) -> dict:
    """A report row as ``--json`` prints it (the flags as in the CSV: comma-separated)."""
    from ..report.tables import flags_text

    keep = ("row_type", "model", "label", "method", "params", "seed", "n_seeds", "target", "gflops", "flops_rel",
            "img_per_s", "img_per_s_q1", "img_per_s_q3", "speedup", "top1", "top1_std", "top1_lo", "top1_hi",
            "top5", "n", "params_m", "device", "learned", "checkpoint", "mcnemar_p", "only_dense", "only_run",
            "warnings", "task", "miou", "miou_lo", "miou_hi", "pixel_accuracy", "gflops_backbone",
            "gflops_decoder", "iou_diff", "iou_diff_lo", "iou_diff_hi", "iou_p")
    return {**{k: getattr(r, k) for k in keep}, "flags": flags_text(r)}


def _search_progress(console):
    """The matched-FLOPs search's bar: what is searched, searches done of all, fvcore counts made."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Column

    return Progress(SpinnerColumn(), TextColumn("{task.description}", table_column=Column(ratio=1, no_wrap=True,
                                                                                             overflow="ellipsis")),
                    BarColumn(bar_width=10), MofNCompleteColumn(), TextColumn("searches ({task.fields[counts]} "
                                                                              "fvcore counts)"),
                    TimeElapsedColumn(), console=console, transient=True, expand=True)


def _execute_with_progress(sw_mod, spec, runs, keys, store, force, console, retime=None, lines: bool = False):
    """``sweep.execute`` under a bar of the measurements still to make (``console``; reused ones
    are not counted, so the time left is that of the measuring), with the run being measured;
    ``lines``: one line on stdout per measurement made (for a log).  The time left is estimated
    from the measured durations of each kind alone (:class:`tokenbench.sweep.progress.StepTimer`)."""
    from ..runner import TIMED
    from ..sweep.plan import recorded, reference_store, timing_reference
    from ..sweep.progress import StepTimer, duration_text, step_line

    reference = reference_store(spec)
    tref = timing_reference(spec, reference)
    # recorded here, or in the reference results (copied, not measured), as the start lines count them
    todo_keys = {k for kk in keys for kind, k in kk.items()
                 if force or k in (retime or ())
                 or not recorded(k, store, *((tref, spec.min_run_time) if kind in TIMED else (reference,)))}
    n_copied = len({k for kk in keys for kind, k in kk.items() if k not in todo_keys and not store.has(k)})
    left: dict[str, int] = {}
    for kk in keys:
        for kind, k in kk.items():
            if k in todo_keys:
                left[kind] = left.get(kind, 0) + 1
    timer = StepTimer(left)
    index = {id(r): i for i, r in enumerate(runs)}
    seen: set[str] = set()
    if lines:
        typer.echo(f"{len(runs)} runs: {len(todo_keys)} measurements to make"
                   + (f", {n_copied} copied from the reference results {reference.root}" if n_copied else "")
                   + ", the others recorded")

    def on_step(i, total, run, kind):
        key = None
        if run is not None and id(run) in index:
            key = keys[index[id(run)]].get(kind.split(":")[0])
        measuring = key in todo_keys and key not in seen
        seen.add(key)
        ended = timer.start(f"{run.name}" if run is not None else "", kind.split(":")[0], measuring) \
            if run is not None else timer.finish()
        if lines and ended is not None:
            typer.echo(step_line(timer, ended))
        return run is None

    if console is None:
        return sw_mod.execute(spec, runs, store, force=force, on_step=on_step, retime=retime)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Column

    with Progress(TextColumn("{task.description}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
                  BarColumn(bar_width=12), MofNCompleteColumn(), TextColumn("measurements"), TimeElapsedColumn(),
                  TextColumn("left {task.fields[eta]}"), console=console, expand=True) as prog:
        task = prog.add_task(f"{len(runs)} runs", total=len(todo_keys), eta="?")

        def on_step_bar(i, total, run, kind):
            if on_step(i, total, run, kind):
                prog.update(task, completed=len(todo_keys), description="writing tables and plots", eta="0 s")
                return
            prog.update(task, completed=timer.done, description=f"{run.name} [{kind}]",
                        eta=duration_text(timer.seconds_left()))

        return sw_mod.execute(spec, runs, store, force=force, on_step=on_step_bar, retime=retime,
                              on_note=lambda m: console.print(m, markup=False, highlight=False))


def _timing_choice(spec, all_timings: bool, reference_timings: bool):
    """``spec`` timing every setting (``--all-timings``) or without the reference's timings."""
    from dataclasses import replace

    return replace(spec, time_by_default=None if all_timings else spec.time_by_default,
                   reference_timings=reference_timings)


def _start_lines(spec, runs, keys, store, force: bool) -> list[str]:
    """What the sweep will time here and about how long, what it leaves untimed (:mod:`tokenbench.sweep.timing`)."""
    from ..sweep import baseline_spec
    from ..sweep.timing import start_lines

    def dense_net():
        from ..runner import Loaded
        from ..sweep.dense import is_dense

        first = next((r for r in runs if not r.line_of), runs[0])
        return Loaded(baseline_spec(first), dense=is_dense(spec)).net

    return start_lines(spec, runs, keys, store, force=force, dense_net=dense_net)


def _note_tie_seeds(runs) -> None:
    """Say which entries are measured at one seed because their seed only breaks ties."""
    from ..registry import get_method

    seeds: dict[str, set] = {}
    for r in runs:
        if r.seed_param and get_method(r.method).seed_breaks_ties:
            seeds.setdefault(r.label, set()).add(r.params.get(r.seed_param))
    for label, s in seeds.items():
        if len(s) == 1:
            typer.echo(f"note: {label}: its seed only breaks exact ties (the method's tie-breaking noise), so it "
                       f"is measured at seed {next(iter(s))} alone", err=True)


def _exit_if_jobs_failed(outcome) -> None:
    """Name each failed job and its log on stderr, and exit 1 (rerunning re-submits what is missing)."""
    if outcome is None or not outcome.failures:
        return
    from ..launch import failure_lines

    for line in failure_lines(outcome):
        typer.echo(line, err=True)
    raise typer.Exit(1)


class _PlanUndo:
    """What ``tokenbench run`` wrote before submitting, undone when the scheduler refuses the jobs:
    a new output directory goes, an existing one gets its previous plan back."""

    def __init__(self, out_dir: Path):
        from ..sweep.plan import PLAN_FILE

        self.out_dir = Path(out_dir)
        self.existed = self.out_dir.exists()
        self.plan = self.out_dir / PLAN_FILE
        self.old_plan = self.plan.read_bytes() if self.plan.is_file() else None

    def __call__(self) -> None:
        import shutil

        if not self.existed:
            shutil.rmtree(self.out_dir, ignore_errors=True)
        elif self.old_plan is not None:
            self.plan.write_bytes(self.old_plan)
        else:
            self.plan.unlink(missing_ok=True)


def register(app: typer.Typer) -> None:
    _register_run(app)
    _register_compare(app)
    _register_report(app)


def _register_run(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        sweep: Optional[str] = typer.Argument(None, help="A sweep file (TOML or YAML) or a packaged sweep's name "
                                                         "(default: `default`, unless --method is given)."),
        model: Optional[List[str]] = typer.Option(None, "--model", help="Model(s): timm names or `default`; "
                                                                        "repeatable."),
        method: Optional[List[str]] = typer.Option(None, "--method", "-m", help="Method(s) to sweep instead of a "
                                                                                "sweep file; repeatable."),
        set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="KEY=VALUE for the listed methods "
                                                 "(METHOD.KEY=VALUE for one): a list is a grid (r=[4,8]), a "
                                                 "nested list a per-block schedule (r=[[5,5,4]]); repeatable."),
        flops_targets: Optional[str] = typer.Option(None, "--flops-targets", help="Matched-FLOPs levels, fractions "
                                                    "of dense: 0.5,0.7,0.9."),
        tolerance: Optional[float] = typer.Option(None, "--tolerance", help="Flag runs landing further than this "
                                                  "from their FLOPs target (fraction of dense; default 0.01)."),
        seeds: Optional[str] = typer.Option(None, "--seeds", help="Seeds of non-deterministic methods: 0,1,2."),
        measure: Optional[str] = typer.Option(None, "--measure", help="What to measure: flops,throughput,accuracy "
                                                                      "(FLOPs always)."),
        data: Optional[str] = typer.Option(None, "--data", help="fashion-mnist, imagenet, folder or synthetic; "
                                            "dense: fashion-mnist-scenes, voc or ade20k."),
        data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where the dataset lives."),
        split: Optional[str] = typer.Option(None, "--split", help="train, val or test (Fashion-MNIST's val: "
                                                                  "5,000 held-out train images)."),
        limit: Optional[int] = typer.Option(None, "--limit", help="A seeded, class-stratified subset of N images "
                                                                  "(the same for every run)."),
        data_seed: Optional[int] = typer.Option(None, "--data-seed", help="Seed of the --limit subset."),
        device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda."),
        precision: Optional[str] = typer.Option(None, "--precision", help="fp32, fp16 or bf16."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Throughput batch size."),
        eval_batch_size: Optional[int] = typer.Option(None, "--eval-batch-size", help="Accuracy batch size."),
        threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for timing (default: all)."),
        min_run_time: Optional[float] = typer.Option(None, "--min-run-time", help="Seconds of timing per run."),
        img_size: Optional[int] = typer.Option(None, "--img-size", help="Input resolution (timm models)."),
        pretrained: Optional[bool] = typer.Option(None, "--pretrained/--no-pretrained",
                                                  help="timm's pretrained weights (needs a network)."),
        name: Optional[str] = typer.Option(None, "--name", help="Sweep name (output runs/NAME/)."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default runs/NAME/)."),
        force: bool = typer.Option(False, "--force", help="Measure again what is already recorded."),
        retime_flagged: bool = typer.Option(False, "--retime-flagged", help="Time again the throughput and "
                                            "speedup records flagged busy or noisy (nothing else)."),
        all_timings: bool = typer.Option(False, "--all-timings", help="Time every setting, not only the sweep's "
                                         "time_by_default (those whose timings are not recorded yet)."),
        reference_timings: bool = typer.Option(True, "--reference-timings/--no-reference-timings",
                                               help="Reuse the reference's throughput and speedup records (FLOPs "
                                                    "and accuracy are reused either way)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Expand the sweep (and run the FLOPs search), list "
                                                              "the runs, measure nothing."),
        plots: bool = typer.Option(True, "--plots/--no-plots", help="Draw the plots after the sweep."),
        json_: bool = typer.Option(False, "--json", help="Print exactly one JSON object on stdout."),
        launcher: str = typer.Option("local", "--launcher", help="local (this process) or submitit (cluster "
                                                                 "jobs; pip install 'tokenbench\\[cluster]')."),
        cluster: Optional[str] = typer.Option(None, "--cluster", help="submitit: slurm, local or debug "
                                                                      "(default: slurm where sbatch exists)."),
        partition: Optional[str] = typer.Option(None, "--partition", help="submitit: the SLURM partition."),
        account: Optional[str] = typer.Option(None, "--account", help="submitit: the SLURM account to charge."),
        qos: Optional[str] = typer.Option(None, "--qos", help="submitit: the SLURM quality of service."),
        mem: Optional[str] = typer.Option(None, "--mem", help="submitit: SLURM memory per node (16G, 64000M)."),
        cpus_per_task: Optional[int] = typer.Option(None, "--cpus-per-task", help="submitit: CPUs per job."),
        constraint: Optional[str] = typer.Option(None, "--constraint", help="submitit: SLURM node features "
                                                                            "(e.g. 'a100|h100')."),
        gpus_per_job: Optional[int] = typer.Option(None, "--gpus-per-job", help="submitit: GPUs per job (default "
                                                                                "1 on SLURM, 0 with --device cpu)."),
        timeout: int = typer.Option(120, "--timeout", help="submitit: minutes a job may run."),
        runs_per_job: int = typer.Option(1, "--runs-per-job", help="submitit: runs packed into one job."),
    ):
        """Run a sweep: measure every run not yet recorded, then write tables and plots to its directory.

        With no arguments: the default sweep (the embedded model on Fashion-MNIST, every built-in method at matched FLOPs).

        A sweep file (format: `python -c "import tokenbench.sweep.format as f; help(f)"`), or flags:
        `tokenbench run --method tome --set r=[4,8] --data fashion-mnist`.

        Completed runs are reused: an interrupted or extended sweep measures only what is missing.
        """
        from rich.console import Console

        from .. import sweep as sw_mod
        from ..launch import job_options
        from ..report.write import ensure_report_writable, write_report
        from ..store import Store

        job_opts = job_options(launcher, cluster, partition, gpus_per_job, timeout, runs_per_job, account=account,
                               qos=qos, mem=mem, cpus_per_task=cpus_per_task, constraint=constraint)
        if method and sweep:
            raise UserError("give a sweep file or --method, not both")
        if set_ and not method:
            raise UserError("--set needs --method (parameters of a sweep file go in the file)")
        overrides = {
            "flops_targets": _numbers(flops_targets, "--flops-targets"),
            "flops_tolerance": tolerance,
            "seeds": _numbers(seeds, "--seeds", int),
            "measure": _words(measure),
            "device": device, "precision": precision, "img_size": img_size, "pretrained": pretrained,
            "name": name, "out": str(out) if out else None,
            "data": {"name": data, "dir": str(data_dir) if data_dir else None, "split": split, "limit": limit,
                     "seed": data_seed, "batch_size": eval_batch_size},
            "throughput": {"batch_size": batch_size, "threads": threads, "min_run_time": min_run_time},
        }
        spec = _sweep_spec(sw_mod, sweep, model, method, set_, name, overrides, data)
        spec = _timing_choice(spec, all_timings, reference_timings)
        err = Console(stderr=True)
        quiet = json_ or not sys.stderr.isatty()
        undo = _PlanUndo(spec.out_dir()) if job_opts is not None else None
        out_dir, runs, keys, searcher = _prepare(sw_mod, spec, force, None if quiet else err, write=not dry_run)
        store = Store(out_dir)
        if not json_:  # what will be timed here, about how long, what is left untimed (a dry run too)
            for line in _start_lines(spec, runs, keys, store, force):
                typer.echo(line, err=True)
        if dry_run:
            return _print_dry_run(sw_mod, spec, runs, out_dir, json_)
        ensure_report_writable(out_dir, plots)
        retime = sw_mod.flagged_timing_keys(store, keys) if retime_flagged else None
        steps, outcome = _measure(sw_mod, spec, runs, keys, out_dir, store, job_opts, undo, force, retime,
                                  None if quiet else err, lines=not json_ and not sys.stdout.isatty())
        from ..distributed import is_main

        if not is_main():  # under torchrun, rank 0 writes the tables
            return
        try:
            res = write_report(out_dir, plots=plots, html="if-available")
        except UserError:
            _exit_if_jobs_failed(outcome)  # every job failed: name them and their logs, not "no records"
            raise
        _print_outcome(res, runs, steps, out_dir, searcher, plots, json_)
        _exit_if_jobs_failed(outcome)


def _register_compare(app: typer.Typer) -> None:
    @app.command("compare")
    def compare_cmd(
        directory: Path = typer.Argument(..., help="A results directory (a sweep's output)."),
        a: str = typer.Argument(..., help="One setting: METHOD or METHOD:KEY=VALUE,... (e.g. dynamicvit:keep_rate=0.7)."),
        b: Optional[List[str]] = typer.Argument(None, help="One or more settings to compare A with (e.g. "
                                                "topk:keep_rate=0.7)."),
        json_: bool = typer.Option(False, "--json", help="Print exactly one JSON object on stdout."),
        model: Optional[str] = typer.Option(None, "--model", help="The model compared, where DIRECTORY holds "
                                                                  "several (e.g. a sweep of two models)."),
    ):
        """McNemar's paired test of A against each B, on the images both were measured on.

        Reads the records only.  A seeded method (random) gives one comparison per seed.  In a
        directory of dense records only: the paired test on per-image IoU (mean difference, its 95%
        bootstrap interval, Wilcoxon signed-rank p)."""
        from ..report.paired import paired
        from ..report.paired_dense import dense_records, paired_dense
        from ..report.write import check_results_dir
        from ..store import Store

        check_results_dir(directory)
        if not b:
            raise UserError(f"compare needs a second setting to compare {a} with: tokenbench compare DIR A B "
                            f"[B ...], e.g. {directory} dynamicvit:keep_rate=0.7 topk:keep_rate=0.7")
        if dense_records(directory) and not any(r.get("kind") == "accuracy"
                                                for r in Store(directory, read_only=True).records()):
            dense = [paired_dense(directory, a, x, model) for x in b]
            if json_:
                typer.echo(json.dumps({"out": str(directory), "a": a, "comparisons": dense}, default=str))
                return
            for d in dense:
                lo, hi = d["diff_ci95"]
                typer.echo(f"{d['a']['method']} mIoU {d['a']['miou']:.2f}% vs {d['b']['method']} "
                           f"{d['b']['miou']:.2f}%: per-image IoU diff {d['mean_diff']:+.4f} [95% CI {lo:+.4f}, "
                           f"{hi:+.4f}] on n={d['n']}; Wilcoxon p = {d['p_value']:.2g}")
            return
        results = [paired(directory, a, x, model) for x in b]
        if json_:
            typer.echo(json.dumps({"out": str(directory), "a": a, "comparisons": results}, default=str))
            return
        for res in results:
            for p in res["pairs"]:
                pa, pb = p["a"], p["b"]

                def name(sd, other):
                    """The sweep's label (the method's name unless an entry named it), its parameters,
                    and its model where the two sides' models differ."""
                    extra = ", ".join(f"{k}={v}" for k, v in sd["params"].items())
                    who = sd.get("label") or sd["method"]
                    if sd.get("model") != other.get("model") and who != sd.get("model"):
                        who = f"{sd['model']} {who}"
                    return who + (f"({extra})" if extra else "") + \
                        (" [fine-tuned]" if sd.get("learned") == "fine-tuned" else "")

                typer.echo(f"{name(pa, pb)} {pa['top1']:.2f}% vs {name(pb, pa)} {pb['top1']:.2f}%  "
                           f"diff {p['diff']:+.2f} pts on n={pa['n']}; only A right {p['only_a']}, "
                           f"only B right {p['only_b']}; McNemar p = {p['p_value']:.2g}")


def _register_report(app: typer.Typer) -> None:
    @app.command("report")
    def report_cmd(
        directory: Path = typer.Argument(..., help="A results directory (a sweep's output)."),
        plots: bool = typer.Option(True, "--plots/--no-plots", help="Draw the plots too."),
        html_: bool = typer.Option(False, "--html", help="Write DIRECTORY/report.html too: the plots with hover, "
                                                         "a family filter and a sortable table, in one offline page."),
        json_: bool = typer.Option(False, "--json", help="Print exactly one JSON object on stdout."),
    ):
        """Redraw the tables (Markdown, CSV, LaTeX) and plots of DIRECTORY from its records; measures nothing."""
        from rich.console import Console

        from ..report.tables import summary_table
        from ..report.write import write_report

        res = write_report(directory, plots=plots, html=html_)
        if json_:
            typer.echo(json.dumps({"out": str(directory), "files": [str(f) for f in res["files"]],
                                   "notes": res["notes"], "rows": [_public_row(r) for r in res["display"]]},
                                  default=str))
            return
        Console(width=None if sys.stdout.isatty() else 200).print(summary_table(res))
        for n in res["notes"]:
            typer.echo(f"warning: {n}", err=True)
        typer.echo(f"the full table is {directory / 'results.md'}" +
                   _plots_text(res, directory) +
                   (f", the interactive page {directory / 'report.html'}" if html_ else ""))


def _sweep_spec(sw_mod, sweep: Optional[str], model, method, set_, name, overrides: dict, data: Optional[str]):
    """The sweep to run: a file (or packaged sweep) or the --method flags, with the command line's options."""
    if model:
        overrides["models"] = list(model)
    if not any(v is not None for v in overrides["data"].values()):
        overrides.pop("data")
    elif data is None and method:
        raise UserError("data options need --data (fashion-mnist, imagenet, folder or synthetic)")
    if method:
        raw = sw_mod.sweep_from_flags(list(model or []), list(method), list(set_ or []), name)
        sw_mod.merge_overrides(raw, overrides)
        return sw_mod.parse_sweep(raw, "command line")
    return sw_mod.load_sweep(sweep or "default", overrides)


def _prepare(sw_mod, spec, force: bool, console, write: bool = True) -> tuple:
    """The runs expanded (the FLOPs search with a progress bar on a terminal) and, unless ``write``
    is off (a dry run), the plan written; the search's explained misses and the tie-breaking seeds said."""
    if console is None:
        out_dir, runs, keys, searcher = sw_mod.prepare(spec, force=force, write=write)
    else:
        with _search_progress(console) as prog:
            task = prog.add_task("checking models, methods, data", total=None, counts=0)

            def on_search(done, total, what, counts):
                prog.update(task, completed=done, total=total or None, counts=counts,
                            description=what or "writing the plan")

            out_dir, runs, keys, searcher = sw_mod.prepare(spec, force=force, on_search=on_search, write=write)
    # a missed FLOPs target the search can explain (a declared schedule the forward does not keep)
    for why in dict.fromkeys(f"{r.label}: {r.search['warning']}" for r in runs
                             if r.search and r.search.get("miss") and r.search.get("warning")):
        typer.echo(f"warning: {why}", err=True)
    _note_tie_seeds(runs)
    from ..sweep.dense import skipped_entries

    for skipped in skipped_entries(spec):  # a dense sweep's methods that cannot restore the grid
        typer.echo(f"note: {skipped['why']}", err=True)
    return out_dir, runs, keys, searcher


def _print_dry_run(sw_mod, spec, runs, out_dir, json_: bool) -> None:
    """The runs a sweep would make, their FLOPs targets and what each measures."""
    from rich.console import Console
    from rich.table import Table

    if json_:
        plan = [{"name": r.name, "model": r.model, "method": r.method, "params": r.params,
                 "checkpoint": r.checkpoint, "targets": r.targets, "search": r.search,
                 "measure": sw_mod.kinds_for(r, spec)} for r in runs]
        typer.echo(json.dumps({"out": str(out_dir), "runs": plan}, default=str))
        return
    t = Table(title=f"{spec.name}: {len(runs)} runs -> {out_dir}")
    for c in ("run", "checkpoint", "FLOPs target -> achieved", "measure"):
        t.add_column(c, overflow="fold")
    for r in runs:
        s = r.search
        hit = "" if not s else f"{s['target']:g} -> {s['ratio']:.3f}" + (" MISS" if s["miss"] else "")
        t.add_row(r.name, r.checkpoint or "", hit, ",".join(sw_mod.kinds_for(r, spec)))
    Console(width=None if sys.stdout.isatty() else 160).print(t)


def _measure(sw_mod, spec, runs, keys, out_dir, store, job_opts, undo, force: bool, retime, console,
             lines: bool) -> tuple:
    """(the steps, the cluster outcome or None): the runs submitted as cluster jobs, or measured
    here (a bar on a terminal's stderr; a line per measurement where stdout is a log)."""
    if job_opts is not None:
        from ..launch import SubmissionRefused, submit_sweep

        try:
            outcome = submit_sweep(spec, runs, keys, out_dir, store, job_opts, force=force, console=console,
                                   retime=retime)
        except SubmissionRefused:
            undo()  # nothing was submitted: the plan goes back to what it was
            raise
        return outcome.steps, outcome
    if console is None and not lines:
        return sw_mod.execute(spec, runs, store, force=force, retime=retime), None
    return _execute_with_progress(sw_mod, spec, runs, keys, store, force, console, retime, lines=lines), None


def _plots_text(res: dict, out_dir: Path) -> str:
    """Where the plots are, where any were drawn (a FLOPs-only sweep draws none)."""
    drawn = [Path(f) for f in res.get("files", ()) if Path(f).parent.name == "plots"]
    return f", plots in {out_dir / 'plots'}/" if drawn else ""


def _print_outcome(res: dict, runs, steps, out_dir: Path, searcher, plots: bool, json_: bool) -> None:
    """What was measured and reused, the summary table and where the files are (or one JSON object)."""
    from rich.console import Console

    from ..report.tables import summary_table

    measured = sum(1 for s in steps if not s.reused)
    reused = len(steps) - measured
    if json_:
        typer.echo(json.dumps({"out": str(out_dir), "runs": len(runs), "measured": measured, "reused": reused,
                               "flops_counts": searcher.counts, "files": [str(f) for f in res["files"]],
                               "notes": res["notes"],
                               "rows": [_public_row(r) for r in res["display"]]}, default=str))
        return
    Console(width=None if sys.stdout.isatty() else 200).print(summary_table(res))
    for n in res["notes"]:
        typer.echo(f"warning: {n}", err=True)
    typer.echo(f"{len(runs)} runs, {len(steps)} measurements: {measured} made, {reused} reused; "
               f"the full table is {out_dir / 'results.md'}" + _plots_text(res, out_dir) +
               (f", the interactive page {out_dir / 'report.html'}" if (out_dir / "report.html").exists() else ""))
    untimed = sum(1 for r in runs if r.untimed)
    if untimed:
        typer.echo(f"{untimed} setting(s) not timed on this CPU (flag `untimed`, no speed shown): --all-timings "
                   "times them too")
