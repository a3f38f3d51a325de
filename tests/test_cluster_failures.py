"""Cluster jobs that fail or are refused: what the user is told, and what is left behind."""

import os
import pickle
import textwrap
from pathlib import Path

import pytest

from tokenbench import launch

from test_cluster import SWEEP_ARGS  # noqa: E402


def test_when_every_job_fails_the_jobs_and_logs_are_named(tmp_path, cli, monkeypatch, tiny_default):
    pytest.importorskip("submitit")
    from tokenbench import sweep

    def failing(sw, runs, store, **kw):
        raise RuntimeError("node on fire")

    monkeypatch.setattr(sweep, "execute", failing)
    code, out, err = cli(*SWEEP_ARGS, "--out", str(tmp_path / "o"), "--launcher", "submitit", "--cluster", "debug")
    assert code == 1, err
    failed = [ln for ln in err.splitlines() if ln.startswith("error: job")]
    assert len(failed) == 2 and all("node on fire" in ln and "log: " in ln for ln in failed), err
    assert "2 of 2 jobs failed" in err and "no records" not in err


FAKE_SBATCH = """\
#!/bin/sh
cp "$1" "{keep}"
echo "sbatch: error: invalid partition specified: nosuch" >&2
echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2
exit 1
"""


def _fake_slurm(tmp_path, monkeypatch) -> Path:
    """``sbatch`` (refuses, keeping the script it was given) and ``srun`` first on PATH."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    keep = tmp_path / "submitted.sh"
    (bin_ / "sbatch").write_text(FAKE_SBATCH.format(keep=keep))
    (bin_ / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_), os.environ.get("PATH", "")]))
    return keep


def test_a_refused_sbatch_is_one_line_and_leaves_nothing_behind(tmp_path, cli, monkeypatch, tiny_default):
    pytest.importorskip("submitit")
    keep = _fake_slurm(tmp_path, monkeypatch)
    out = tmp_path / "o"
    code, _, err = cli(*SWEEP_ARGS, "--out", str(out), "--launcher", "submitit", "--cluster", "slurm",
                       "--partition", "nosuch", "--account", "proj7", "--qos", "high", "--mem", "16G",
                       "--cpus-per-task", "4", "--constraint", "a100|h100")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error:") and "Invalid partition name specified" in err and "Traceback" not in err
    assert not list(out.glob("jobs/**/*.pkl")) and not (out / "sweep.json").exists()
    # what sbatch was given: every option asked for, and no GPU line for a CPU job
    script = keep.read_text()
    for line in ("#SBATCH --partition=nosuch", "#SBATCH --account=proj7", "#SBATCH --qos=high",
                 "#SBATCH --mem=16G", "#SBATCH --cpus-per-task=4", "#SBATCH --constraint='a100|h100'"):
        assert line in script, (line, script)
    assert "gpus-per-node" not in script


def test_a_refused_sbatch_gives_an_existing_directory_its_plan_back(tmp_path, cli, monkeypatch, tiny_default):
    pytest.importorskip("submitit")
    _fake_slurm(tmp_path, monkeypatch)
    out = tmp_path / "o"
    out.mkdir()
    (out / "sweep.json").write_text('{"runs": []}\n')
    (out / "mine.txt").write_text("kept")
    code, _, err = cli(*SWEEP_ARGS, "--out", str(out), "--launcher", "submitit", "--cluster", "slurm")
    assert code == 2, err
    assert (out / "sweep.json").read_text() == '{"runs": []}\n' and (out / "mine.txt").read_text() == "kept"
    assert not list(out.glob("jobs/**/*.pkl"))


@pytest.mark.parametrize("flags, message", [
    (["--mem", "lots"], "--mem takes SLURM's form"),
    (["--cpus-per-task", "0"], "--cpus-per-task must be at least 1"),
])
def test_bad_slurm_options_are_one_line_errors(cli, tmp_path, flags, message):
    pytest.importorskip("submitit")
    code, _, err = cli("run", "--method", "topk", "--out", str(tmp_path / "o"), "--launcher", "submitit",
                       "--cluster", "local", *flags)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, _, err = cli("run", "--method", "topk", "--out", str(tmp_path / "o"), "--account", "x")
    assert code == 2 and "need --launcher submitit" in err


class _Paths:
    def __init__(self, d: Path):
        self.result_pickle = d / "result.pkl"
        self.stderr = d / "log.err"


class _Job:
    def __init__(self, d: Path, state: str):
        self.paths = _Paths(d)
        self.state = state


def test_a_failure_reason_comes_from_the_job_state_and_its_files(tmp_path):
    pytest.importorskip("submitit")
    from submitit.core.utils import FailedJobError, UncompletedJobError

    job = _Job(tmp_path, "OUT_OF_MEMORY")
    job.paths.stderr.write_text("starting\nslurmstepd: error: Detected 1 oom-kill event(s)\n")
    vague = UncompletedJobError("some wording a submitit version chose")
    reason = launch._reason(job, vague)
    assert "state OUT_OF_MEMORY" in reason and "oom-kill" in reason and "wording" not in reason
    # a job that raised: the last line of the traceback submitit stored in its result file
    with open(job.paths.result_pickle, "wb") as f:
        pickle.dump(("error", textwrap.dedent("""\
            Traceback (most recent call last):
              File "x.py", line 1, in <module>
            tokenbench.errors.UserError: cannot read /data/x.png""")), f)
    assert launch._reason(job, FailedJobError("anything")) == "cannot read /data/x.png"
