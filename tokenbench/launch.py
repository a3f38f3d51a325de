"""A sweep's runs as cluster jobs, through submitit (``tokenbench run SWEEP --launcher submitit``).

The parent process expands the sweep (the matched-FLOPs search happens once, here), packs
the runs not yet recorded into jobs of ``runs_per_job`` runs, submits them as one array
(``executor.batch()``: a SLURM job array), and waits, showing how many jobs are queued,
running, done and failed.  Each job measures its runs into the sweep's own store with
:func:`run_share`; the store writes one file per record key atomically (a write to a
temporary file, then a rename), so jobs on any number of hosts sharing the results
directory never lose or duplicate a record.  Running the same command again submits only
the runs that still miss a record: a failed or killed job is re-submitted that way.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import UserError

CLUSTERS = ("slurm", "local", "debug")
# submitit's (SLURM's) job states that mean "started"; every other unfinished state is "queued".
RUNNING_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT"}


@dataclass
class JobOptions:
    cluster: Optional[str] = None        # None: submitit's guess (slurm where sbatch exists, else local)
    partition: Optional[str] = None
    gpus_per_job: Optional[int] = None   # None: 1 where there are GPUs to use (0 with --device cpu)
    timeout_min: int = 120
    runs_per_job: int = 1


@dataclass
class Failure:
    job_id: str
    runs: list[str]
    reason: str
    log: str


@dataclass
class Outcome:
    steps: list                           # sweep.Step of every run and kind, measured or reused
    submitted: int = 0                    # jobs
    failures: list[Failure] = field(default_factory=list)


def run_share(sw, runs: list, out: str, force: bool, indices: list[int]) -> list[tuple[int, str, str, bool]]:
    """One job's work: measure ``runs`` (the sweep's runs ``indices``) into the store at ``out``.

    What the store already holds is skipped.  Returns (run index, kind, key, reused) per step.
    """
    from . import sweep as sw_mod
    from .store import Store

    steps = sw_mod.execute(sw, runs, Store(out), force=force)
    index = {id(r): i for r, i in zip(runs, indices)}
    return [(index[id(s.run)], s.kind, s.key, s.reused) for s in steps]


def _submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("--launcher submitit needs submitit: pip install 'tokenbench[cluster]'") from None
    return submitit


def check_options(opts: JobOptions) -> None:
    from .errors import did_you_mean

    if opts.cluster is not None and opts.cluster not in CLUSTERS:
        raise UserError(f"unknown cluster {opts.cluster!r}{did_you_mean(opts.cluster, CLUSTERS)}; "
                        f"choose from {', '.join(CLUSTERS)}")
    if opts.runs_per_job < 1:
        raise UserError(f"--runs-per-job must be at least 1, got {opts.runs_per_job}")
    if opts.timeout_min < 1:
        raise UserError(f"--timeout must be at least 1 minute, got {opts.timeout_min}")
    if opts.gpus_per_job is not None and opts.gpus_per_job < 0:
        raise UserError(f"--gpus-per-job must be 0 or more, got {opts.gpus_per_job}")


def job_options(launcher: str, cluster: Optional[str] = None, partition: Optional[str] = None,
                gpus_per_job: Optional[int] = None, timeout_min: int = 120, runs_per_job: int = 1
                ) -> Optional[JobOptions]:
    """``tokenbench run``'s launcher flags: submitit's job options, or None to run in this process."""
    if launcher not in ("local", "submitit"):
        raise UserError(f"unknown launcher {launcher!r}; choose local or submitit")
    opts = JobOptions(cluster=cluster, partition=partition, gpus_per_job=gpus_per_job, timeout_min=timeout_min,
                      runs_per_job=runs_per_job)
    if launcher == "local":
        if opts != JobOptions():
            raise UserError("--cluster, --partition, --gpus-per-job, --timeout and --runs-per-job need "
                            "--launcher submitit")
        return None
    check_options(opts)
    from .distributed import launched

    if launched():
        raise UserError("--launcher submitit submits jobs from one process: run it without torchrun")
    _submitit()
    if opts.cluster == "slurm" and shutil.which("sbatch") is None:
        raise UserError("--cluster slurm needs SLURM's sbatch on this machine's PATH "
                        "(--cluster local runs the jobs here)")
    return opts


def pending_runs(runs: list, keys: list[dict], store, force: bool = False) -> list[int]:
    """Indices of the runs that still miss a record (every run with ``force``)."""
    return [i for i, ks in enumerate(keys) if force or not all(store.has(k) for k in ks.values())]


def pack(indices: list[int], runs_per_job: int) -> list[list[int]]:
    return [indices[i:i + runs_per_job] for i in range(0, len(indices), runs_per_job)]


def _gpus(opts: JobOptions, cluster: str, device: str) -> int:
    if opts.gpus_per_job is not None:
        return opts.gpus_per_job
    if device == "cpu":
        return 0
    if cluster == "slurm":
        return 1
    import torch

    # The local executor hides the GPUs a job did not ask for.
    return 1 if torch.cuda.is_available() else 0


def make_executor(out_dir: Path, opts: JobOptions, sw):
    submitit = _submitit()
    folder = Path(out_dir).resolve() / "jobs"
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=opts.cluster)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"cannot use cluster {opts.cluster or '(detected)'}: {str(e).splitlines()[0]}") from None
    params: dict[str, Any] = {"timeout_min": opts.timeout_min, "gpus_per_node": _gpus(opts, executor.cluster, sw.device),
                              "nodes": 1, "tasks_per_node": 1, "name": f"tokenbench-{sw.name}"}
    if opts.partition:
        params["slurm_partition"] = opts.partition
    executor.update_parameters(**params)
    return executor


def _state(job, cluster: str) -> tuple[str, Optional[BaseException]]:
    """(queued, running, done or failed; the job's error when failed)."""
    if cluster != "debug" and not job.done():  # a debug job runs in this process, when exception() asks
        return ("running" if str(job.state).upper() in RUNNING_STATES else "queued"), None
    err = job.exception()
    return ("failed" if err is not None else "done"), err


def _reason(err: BaseException) -> str:
    """Why a job failed, in one line."""
    text = str(err)
    if "with trace:" in text:  # submitit's FailedJobError: the traceback sits between two rules of dashes
        parts = text.split("----------------------")
        trace = [ln.strip() for ln in (parts[1] if len(parts) > 2 else "").splitlines() if ln.strip()]
        if trace:
            return trace[-1].removeprefix("tokenbench.errors.UserError: ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    if "has not produced any output" in text:  # ended without a result: killed, out of time or of memory
        state = text.split("(state: ", 1)[1].split(")", 1)[0] if "(state: " in text else "unknown"
        return f"ended without a result (state {state}): killed, out of time or out of memory?"
    if err.__class__.__module__.startswith("submitit") or isinstance(err, UserError):
        return first or err.__class__.__name__  # e.g. a job killed before it returned
    return f"{err.__class__.__name__}: {first}"  # the debug executor hands back the job's own exception


def submit_sweep(sw, runs: list, keys: list[dict], out_dir: Path, store, opts: JobOptions, force: bool = False,
                 console=None, poll_s: float = 2.0) -> Outcome:
    """Submit the sweep's missing runs as jobs, wait for them, and say what each step became."""
    from .sweep import Step, kinds_for

    check_options(opts)
    todo = pending_runs(runs, keys, store, force)
    complete = [i for i in range(len(runs)) if i not in set(todo)]
    steps = [Step(runs[i], k, keys[i][k], True) for i in complete for k in kinds_for(runs[i], sw)]
    chunks = pack(todo, opts.runs_per_job)
    if not chunks:
        return Outcome(steps=steps)
    executor = make_executor(out_dir, opts, sw)
    if executor.cluster == "local" and len(chunks) > 1 and "throughput" in sw.measure:
        raise UserError(f"the local executor runs its {len(chunks)} jobs at once on this machine, and throughput "
                        "is never timed while other jobs share it: use --runs-per-job "
                        f"{len(todo)} (one job) or --measure without throughput")
    store.ensure_writable()
    with executor.batch():
        jobs = [executor.submit(run_share, sw, [runs[i] for i in chunk], str(Path(out_dir).resolve()), force, chunk)
                for chunk in chunks]
    try:
        states, errors = _wait(jobs, executor.cluster, console, poll_s)
    except KeyboardInterrupt:
        for job in jobs:  # a later run of the command re-submits what they had not recorded
            job.cancel(check=False)
        raise
    outcome = Outcome(steps=steps, submitted=len(jobs))
    for job, chunk, state, err in zip(jobs, chunks, states, errors):
        if state == "done":
            outcome.steps += [Step(runs[i], kind, key, reused) for i, kind, key, reused in job.result()]
        else:
            outcome.failures.append(Failure(job_id=str(job.job_id), runs=[runs[i].name for i in chunk],
                                            reason=_reason(err) if err else "failed", log=str(job.paths.stderr)))
    order = {id(r): i for i, r in enumerate(runs)}
    outcome.steps.sort(key=lambda s: order[id(s.run)])
    return outcome


def _wait(jobs: list, cluster: str, console, poll_s: float) -> tuple[list[str], list]:
    """Poll until every job is done or failed; a progress bar of queued/running/done/failed jobs.

    Returns each job's state and error (None unless it failed)."""
    states = ["queued"] * len(jobs)
    errors: list = [None] * len(jobs)
    show = console is not None and console.is_terminal
    prog = None
    if show:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console)
        prog.start()
        task = prog.add_task("jobs", total=len(jobs))
    try:
        while True:
            for j, job in enumerate(jobs):
                if states[j] not in ("done", "failed"):
                    states[j], errors[j] = _state(job, cluster)
            counts = {s: states.count(s) for s in ("queued", "running", "done", "failed")}
            if prog:
                prog.update(task, completed=counts["done"] + counts["failed"],
                            description=", ".join(f"{v} {k}" for k, v in counts.items()))
            if counts["done"] + counts["failed"] == len(jobs):
                return states, errors
            time.sleep(poll_s)
    finally:
        if prog:
            prog.stop()


def failure_lines(outcome: Outcome) -> list[str]:
    """One line per failed job (its runs, why, its log), then what to do."""
    lines = []
    for f in outcome.failures:
        runs = f"{f.runs[0]}" + (f" and {len(f.runs) - 1} more" if len(f.runs) > 1 else "")
        lines.append(f"error: job {f.job_id} ({runs}) failed: {f.reason}; log: {f.log}")
    lines.append(f"{len(outcome.failures)} of {outcome.submitted} jobs failed; run the same command again to "
                 "re-submit the runs they did not record")
    return lines
