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

import contextlib
import io
import re
import shutil
import subprocess
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
    account: Optional[str] = None        # SLURM account to charge
    qos: Optional[str] = None            # SLURM quality of service
    mem: Optional[str] = None            # SLURM memory per node, e.g. 16G
    cpus_per_task: Optional[int] = None
    constraint: Optional[str] = None     # SLURM node features, e.g. "a100|h100"


# JobOptions field -> submitit's SLURM parameter (ignored by the local and debug executors)
SLURM_PARAMS = {"partition": "slurm_partition", "account": "slurm_account", "qos": "slurm_qos", "mem": "slurm_mem",
                "constraint": "slurm_constraint"}


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


def run_share(sw, runs: list, out: str, force: bool, indices: list[int],
              retime: Optional[list[str]] = None) -> list[tuple[int, str, str, bool]]:
    """One job's work: measure ``runs`` (the sweep's runs ``indices``) into the store at ``out``.

    What the store already holds is skipped, except the timings ``retime`` names (``--retime-flagged``).
    Returns (run index, kind, key, reused) per step.
    """
    from . import sweep as sw_mod
    from .distributed import work_split_elsewhere
    from .store import Store

    with work_split_elsewhere():  # the array gave each job its own runs: no claim files needed
        steps = sw_mod.execute(sw, runs, Store(out), force=force, retime=set(retime) if retime else None)
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
    if opts.cpus_per_task is not None and opts.cpus_per_task < 1:
        raise UserError(f"--cpus-per-task must be at least 1, got {opts.cpus_per_task}")
    if opts.mem is not None and not re.fullmatch(r"\d+[KMGTkmgt]?", opts.mem):
        raise UserError(f"--mem takes SLURM's form, a number with an optional unit (16G, 64000M), got {opts.mem!r}")


def job_options(launcher: str, cluster: Optional[str] = None, partition: Optional[str] = None,
                gpus_per_job: Optional[int] = None, timeout_min: int = 120, runs_per_job: int = 1,
                **slurm) -> Optional[JobOptions]:
    """``tokenbench run``'s launcher flags: submitit's job options, or None to run in this process.

    ``slurm``: account, qos, mem, cpus_per_task, constraint (None: the cluster's default)."""
    if launcher not in ("local", "submitit"):
        raise UserError(f"unknown launcher {launcher!r}; choose local or submitit")
    opts = JobOptions(cluster=cluster, partition=partition, gpus_per_job=gpus_per_job, timeout_min=timeout_min,
                      runs_per_job=runs_per_job, **slurm)
    if launcher == "local":
        if opts != JobOptions():
            raise UserError("--cluster, --partition, --account, --qos, --mem, --cpus-per-task, --constraint, "
                            "--gpus-per-job, --timeout and --runs-per-job need --launcher submitit")
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


def pending_runs(runs: list, keys: list[dict], store, force: bool = False, retime=None,
                 min_run_time: Optional[float] = None) -> list[int]:
    """Indices of the runs that still miss a record or have a timing to measure again (``retime``,
    or one timed for less than ``min_run_time``), every run with ``force``."""
    from .runner import TIMED
    from .sweep.plan import recorded

    again = set(retime or ())
    return [i for i, ks in enumerate(keys)
            if force or not all(recorded(k, store, None, min_run_time if kind in TIMED else None) and k not in again
                                for kind, k in ks.items())]


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
    params: dict[str, Any] = {"timeout_min": opts.timeout_min, "nodes": 1, "tasks_per_node": 1,
                              "name": f"tokenbench-{sw.name}"}
    gpus = _gpus(opts, executor.cluster, sw.device)
    if gpus or executor.cluster != "slurm":  # no --gpus-per-node=0 line: some clusters reject it
        params["gpus_per_node"] = gpus
    if opts.cpus_per_task:
        params["cpus_per_task"] = opts.cpus_per_task
    for field_, param in SLURM_PARAMS.items():
        if getattr(opts, field_):
            params[param] = getattr(opts, field_)
    executor.update_parameters(**params)
    return executor


class SubmissionRefused(UserError):
    """The scheduler refused the jobs (e.g. sbatch: invalid partition); nothing was submitted."""


def _refusal(err: BaseException) -> str:
    """The scheduler's own words for a refused submission: the last line of its stderr naming an error."""
    cause = err.__cause__
    text = cause.stderr if isinstance(cause, subprocess.CalledProcessError) and cause.stderr else str(err)
    text = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or [err.__class__.__name__])[-1]


def _submit(executor, folder: Path, make_jobs) -> list:
    """Submit ``make_jobs()`` as one batch; a refused submission leaves none of its files in ``folder``
    and raises :class:`SubmissionRefused` in one line."""
    submitit = _submitit()
    before = set(folder.rglob("*")) if folder.exists() else set()
    refused = (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedSubmissionError,
               subprocess.CalledProcessError)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's stderr; said once below
            with executor.batch():
                jobs = make_jobs()
    except refused as e:
        for p in sorted(set(folder.rglob("*")) - before, key=lambda p: len(p.parts), reverse=True):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise SubmissionRefused(f"the scheduler refused the jobs, none was submitted: {_refusal(e)}") from None
    return jobs


def _state(job, cluster: str) -> tuple[str, Optional[BaseException]]:
    """(queued, running, done or failed; the job's error when failed)."""
    if cluster != "debug" and not job.done():  # a debug job runs in this process, when exception() asks
        return ("running" if str(job.state).upper() in RUNNING_STATES else "queued"), None
    err = job.exception()
    return ("failed" if err is not None else "done"), err


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _reason(job, err: Optional[BaseException]) -> str:
    """Why a job failed, in one line, from what submitit keeps of it: the job's result file (the
    traceback of the error it raised), else its state and the end of its stderr file."""
    if err is not None and not err.__class__.__module__.startswith("submitit"):
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
        if isinstance(err, UserError):
            return first or err.__class__.__name__
        return f"{err.__class__.__name__}: {first}"  # the debug executor hands back the job's own exception
    result = Path(job.paths.result_pickle)
    if result.is_file():
        try:
            outcome, payload = _submitit().core.utils.pickle_load(result)
        except Exception:  # a damaged result file: say what the state and the log say instead
            outcome, payload = None, None
        if outcome == "error":
            trace = [ln.strip() for ln in str(payload).splitlines() if ln.strip()]
            if trace:
                return trace[-1].removeprefix("tokenbench.errors.UserError: ")
    try:
        state = str(job.state)
    except Exception:  # the scheduler cannot be asked (gone, or no accounting)
        state = "unknown"
    tail = _last_line(job.paths.stderr)
    return (f"ended without a result (state {state}): killed, out of time or out of memory?"
            + (f" Its log ends: {tail}" if tail else ""))


def submit_sweep(sw, runs: list, keys: list[dict], out_dir: Path, store, opts: JobOptions, force: bool = False,
                 console=None, poll_s: float = 2.0, retime=None) -> Outcome:
    """Submit the sweep's missing runs (and those with a flagged timing in ``retime``) as jobs, wait for
    them, and say what each step became."""
    from .sweep import Step, kinds_for

    try:
        check_options(opts)
    except UserError as e:  # nothing submitted: the run puts its plan back (SubmissionRefused)
        raise SubmissionRefused(str(e)) from None
    todo = pending_runs(runs, keys, store, force, retime, sw.min_run_time)
    complete = [i for i in range(len(runs)) if i not in set(todo)]
    steps = [Step(runs[i], k, keys[i][k], True) for i in complete for k in kinds_for(runs[i], sw)]
    chunks = pack(todo, opts.runs_per_job)
    if not chunks:
        return Outcome(steps=steps)
    executor = make_executor(out_dir, opts, sw)
    if executor.cluster == "local" and len(chunks) > 1 and "throughput" in sw.measure:
        raise SubmissionRefused(f"the local executor runs its {len(chunks)} jobs at once on this machine, and "
                                "throughput is never timed while other jobs share it: use --runs-per-job "
                                f"{len(todo)} (one job) or --measure without throughput")
    store.ensure_writable()
    jobs = _submit(executor, Path(out_dir).resolve() / "jobs",
                   lambda: [executor.submit(run_share, sw, [runs[i] for i in chunk], str(Path(out_dir).resolve()),
                                            force, chunk, sorted(retime or ())) for chunk in chunks])
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
                                            reason=_reason(job, err), log=str(job.paths.stderr)))
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
