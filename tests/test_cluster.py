"""Beyond one process: torchrun shards the evaluation, submitit runs a sweep's runs as jobs."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from tokenbench import distributed, launch

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def records(out: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in (Path(out) / "records").glob("*.json")}


def subprocess_env(embedded: Path, **extra) -> dict:
    """The tiny stand-in as `default`, this checkout first on the path, one thread per process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               TOKENBENCH_EMBEDDED_DIR=str(embedded), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def torchrun(args: list, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m tokenbench ARGS``; on a timeout, all its processes end."""
    import signal

    proc = subprocess.Popen([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "tokenbench", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# --------------------------------------------------------------------------- shards

@given(n=st.integers(0, 300), batch=st.integers(1, 40), world=st.integers(1, 5))
def test_shards_cover_every_image_once_in_order_in_whole_batches(n, batch, world):
    shards = [distributed.shard(n, batch, r, world) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    for s in shards[:-1]:
        assert len(s) % batch == 0  # only the last shard may end in a partial batch
    sizes = [-(-len(s) // batch) for s in shards]
    assert max(sizes) - min(sizes) <= 1  # batches dealt out evenly


def test_outside_torchrun_nothing_is_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.init_from_env() and not distributed.active()
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    assert distributed.on_main(lambda: 7) == 7 and distributed.gather_in_rank_order([1, 2]) == [1, 2]


# --------------------------------------------------------------------------- torchrun

def test_torchrun_two_processes_give_the_one_process_result(tiny_default, tmp_path, cli):
    """gloo, 2 CPU processes, 101 images in batches of 16: shards of 48 and 53 images."""
    args = ["eval", "default", "--data", "synthetic", "--limit", "101", "--batch-size", "16", "--device", "cpu",
            "--json"]
    proc = torchrun([*args, "--results", str(tmp_path / "two")], tmp_path, subprocess_env(tiny_default))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # rank 1 prints nothing
    two = json.loads(lines[0])
    code, out, err = cli(*args, "--results", str(tmp_path / "one"))
    assert code == 0, err
    one = json.loads(out)
    assert (two["n"], two["top1"], two["top5"], two["top1_ci95"]) == (one["n"], one["top1"], one["top5"],
                                                                       one["top1_ci95"])
    assert two["n"] == 101 and two["key"] == one["key"]
    (rec2,), (rec1,) = records(tmp_path / "two").values(), records(tmp_path / "one").values()  # rank 0 wrote one
    assert rec2["metrics"]["correct"] == rec1["metrics"]["correct"]
    assert rec2["metrics"]["predictions"] == rec1["metrics"]["predictions"]


# One short timing per record (no batch-1 latency, no retries of a busy timing, three speedup rounds):
# which rank times, and how often each record is written, do not depend on the timing's length.
TORCHRUN_SWEEP = """
name = "torchrun"
models = ["default"]
measure = ["flops", "throughput", "accuracy"]
device = "cpu"
[data]
name = "synthetic"
limit = 24
batch_size = 8
[throughput]
batch_size = 2
threads = 1
min_run_time = 0.05
latency = false
retries = 0
rounds = 3
[methods.none]
[methods.topk]
keep_rate = [0.5]
"""


def test_torchrun_sweep_times_throughput_on_rank_0_alone_and_writes_each_record_once(tiny_default, tmp_path, cli):
    sweep = tmp_path / "torchrun.toml"
    sweep.write_text(TORCHRUN_SWEEP)
    args = ["run", str(sweep), "--no-plots", "--json"]
    proc = torchrun([*args, "--out", str(tmp_path / "two")], tmp_path, subprocess_env(tiny_default))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.strip().splitlines()) == 1, proc.stdout  # one table, rank 0's
    two = json.loads(proc.stdout)
    assert (two["measured"], two["reused"]) == (7, 0)  # FLOPs, throughput and accuracy x2, top-k's speedup
    assert all(r["img_per_s"] for r in two["rows"])
    code, out, err = cli(*args, "--out", str(tmp_path / "one"))
    assert code == 0, err
    a, b = records(tmp_path / "one"), records(tmp_path / "two")
    assert sorted(a) == sorted(b) and len(b) == 7
    for k, r in a.items():
        if r["kind"] not in ("throughput", "speedup"):
            assert r["metrics"] == b[k]["metrics"], r["kind"]


# --------------------------------------------------------------------------- submitit

def sweep_args(keep_rates: str = "[0.5]") -> list:
    """A tiny sweep: the stand-in `default`, dense and top-k, FLOPs and accuracy on 24 synthetic images."""
    return ["run", "--model", "default", "--method", "topk", "--set", f"keep_rate={keep_rates}", "--data",
            "synthetic", "--limit", "24", "--measure", "flops,accuracy", "--device", "cpu", "--no-plots", "--json"]


SWEEP_ARGS = sweep_args()


@pytest.fixture
def quick_poll(monkeypatch):
    """Jobs polled every 0.2 s, not 2 s: a tiny job's result is seen as soon as it is there."""
    import functools

    monkeypatch.setattr(launch, "submit_sweep", functools.partial(launch.submit_sweep, poll_s=0.2))


def comparable(recs: dict) -> dict:
    """What must not depend on where a record was measured."""
    drop = {"env", "meta", "checksum"}
    return {k: {f: v for f, v in r.items() if f not in drop} for k, r in recs.items()}


def test_submitit_local_executor_gives_the_records_and_table_of_a_local_run(tiny_default, tmp_path, cli,
                                                                            monkeypatch, quick_poll):
    pytest.importorskip("submitit")
    monkeypatch.setenv("TOKENBENCH_EMBEDDED_DIR", str(tiny_default))  # the jobs are new processes
    monkeypatch.setenv("PYTHONPATH", subprocess_env(tiny_default)["PYTHONPATH"])
    code, out, err = cli(*SWEEP_ARGS, "--out", str(tmp_path / "here"))
    assert code == 0, err
    here = json.loads(out)
    code, out, err = cli(*SWEEP_ARGS, "--out", str(tmp_path / "jobs"), "--launcher", "submitit", "--cluster", "local",
                         "--runs-per-job", "2")
    assert code == 0, err
    there = json.loads(out)
    assert (there["measured"], there["reused"]) == (4, 0)
    a, b = records(tmp_path / "here"), records(tmp_path / "jobs")
    assert sorted(a) == sorted(b) and len(b) == 4
    # Each job ran in its own process: the records say which host and device measured them.
    assert all(r["meta"]["host"] and r["env"]["device"] == "cpu" for r in b.values())
    for k in a:
        ma, mb = a[k]["metrics"], b[k]["metrics"]
        for f in ("gflops", "tokens", "top1", "top5", "n", "correct", "predictions"):
            assert ma.get(f) == mb.get(f), (k, f)
    assert there["rows"] == here["rows"]
    assert (tmp_path / "jobs" / "results.md").read_text() == (tmp_path / "here" / "results.md").read_text()
    # The same command again submits nothing: every record is there.
    code, out, err = cli(*SWEEP_ARGS, "--out", str(tmp_path / "jobs"), "--launcher", "submitit", "--cluster", "local")
    assert code == 0 and json.loads(out)["reused"] == 4
    assert len(list((tmp_path / "jobs" / "jobs").glob("*_submitted.pkl"))) == 1


KILLER = """
import os, signal
if os.environ.get("SUBMITIT_LOCAL_JOB_ID"):  # inside a job: die right after recording the dense model's FLOPs
    from tokenbench import store
    _put = store.Store.put
    def put(self, rec):
        path = _put(self, rec)
        if rec["kind"] == "flops" and rec["spec"]["method"] == "none":
            os.kill(os.getpid(), signal.SIGKILL)
        return path
    store.Store.put = put
"""


def test_a_killed_job_is_reported_and_rerunning_completes_the_sweep(tiny_default, tmp_path, cli, monkeypatch,
                                                                   quick_poll):
    """Two jobs (dense + topk 0.5, then topk 0.7); the first is killed mid-run, after one record."""
    pytest.importorskip("submitit")
    killer = tmp_path / "killer"
    killer.mkdir()
    (killer / "sitecustomize.py").write_text(textwrap.dedent(KILLER))
    env = subprocess_env(tiny_default)
    monkeypatch.setenv("TOKENBENCH_EMBEDDED_DIR", str(tiny_default))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(killer), env["PYTHONPATH"]]))
    args = [*sweep_args("[0.5,0.7]"), "--out", str(tmp_path / "o"), "--launcher", "submitit", "--cluster", "local",
            "--runs-per-job", "2"]
    code, out, err = cli(*args)
    assert code == 1, err
    first = json.loads(out)  # the table of what was recorded is still written
    assert first["measured"] == 2  # what the second job says it recorded (the first one died first)
    failed = [ln for ln in err.splitlines() if ln.startswith("error: job")]
    assert len(failed) == 1 and "dense" in failed[0] and "ended without a result" in failed[0], err
    assert Path(failed[0].rsplit("log: ", 1)[1]).is_file()
    assert "run the same command again" in err
    assert len(records(tmp_path / "o")) == 3
    # Rerun, nobody killed: only the missing run pair is re-submitted, its recorded FLOPs reused.
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])
    code, out, err = cli(*args)
    assert code == 0, err
    second = json.loads(out)
    assert (second["measured"], second["reused"]) == (3, 3)
    recs = records(tmp_path / "o")
    assert len(recs) == 6 and len(list((tmp_path / "o" / "records").iterdir())) == 6  # no leftovers
    assert {(r["kind"], r["spec"]["method"], json.dumps(r["spec"]["params"])) for r in recs.values()} == {
        (k, m, p) for k in ("flops", "accuracy")
        for m, p in (("none", "{}"), ("topk", '{"keep_rate": 0.5}'), ("topk", '{"keep_rate": 0.7}'))}


def test_a_failed_job_names_its_log_and_only_missing_runs_are_resubmitted(tmp_path, cli, monkeypatch, tiny_default):
    """The debug executor runs jobs in this process, so a job can be made to fail here."""
    pytest.importorskip("submitit")
    from tokenbench import sweep

    real = sweep.execute

    def failing(sw, runs, store, **kw):
        if any(r.method == "topk" for r in runs):
            raise RuntimeError("node on fire")
        return real(sw, runs, store, **kw)

    args = [*SWEEP_ARGS, "--out", str(tmp_path / "o"), "--launcher", "submitit", "--cluster", "debug"]
    monkeypatch.setattr(sweep, "execute", failing)
    code, out, err = cli(*args)
    assert code == 1
    assert "failed: RuntimeError: node on fire; log: " in err and "1 of 2 jobs failed" in err, err
    assert json.loads(out)["measured"] == 2
    monkeypatch.setattr(sweep, "execute", real)
    submitted = []
    real_submit = launch.submit_sweep

    def spy(sw, runs, keys, out, store, opts, **kw):
        submitted.extend(launch.pending_runs(runs, keys, store))
        return real_submit(sw, runs, keys, out, store, opts, **kw)

    monkeypatch.setattr(launch, "submit_sweep", spy)
    code, out, err = cli(*args)
    assert code == 0, err
    assert submitted == [1] and (json.loads(out)["measured"], json.loads(out)["reused"]) == (2, 2)


@pytest.mark.parametrize("flags, message", [
    (["--launcher", "slurm"], "unknown launcher 'slurm'"),
    (["--cluster", "local"], "need --launcher submitit"),
    (["--launcher", "submitit", "--cluster", "slrum"], "unknown cluster 'slrum'"),
    (["--launcher", "submitit", "--runs-per-job", "0"], "--runs-per-job must be at least 1"),
    (["--launcher", "submitit", "--timeout", "0"], "--timeout must be at least 1 minute"),
    (["--launcher", "submitit", "--gpus-per-job", "-1"], "--gpus-per-job must be 0 or more"),
    (["--launcher", "submitit", "--cluster", "slurm"], "--cluster slurm needs SLURM's sbatch"),
])
def test_bad_launcher_flags_are_one_line_errors(cli, tmp_path, monkeypatch, flags, message):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    code, out, err = cli("run", "--method", "topk", "--out", str(tmp_path / "o"), *flags)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_submitting_from_every_torchrun_process_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(launch.UserError, match="run it without torchrun"):
        launch.job_options("submitit", cluster="local")


def test_local_executor_refuses_to_time_jobs_side_by_side(tmp_path):
    pytest.importorskip("submitit")
    from tokenbench.store import Store
    from tokenbench.sweep import Run, Sweep

    sw = Sweep(name="t", methods=[], measure=["flops", "throughput"])
    runs = [Run("a", "m", "none", {}), Run("b", "m", "none", {})]
    keys = [{"flops": "k1"}, {"flops": "k2"}]
    opts = launch.JobOptions(cluster="local")
    with pytest.raises(launch.UserError, match="throughput is never timed while other jobs share"):
        launch.submit_sweep(sw, runs, keys, tmp_path, Store(tmp_path), opts)


def test_under_torchrun_every_rank_holds_the_claim(monkeypatch):
    """Claims are per runner; the ranks of one torchrun are one runner and must all measure."""
    class Store:
        def claim(self, key):
            return ("file claim", key)

    assert distributed.claim(Store(), "k") == ("file claim", "k")
    monkeypatch.setattr(distributed, "active", lambda: True)
    with distributed.claim(Store(), "k") as c:
        assert c.held and c.key == "k"


def test_a_flagged_timing_makes_its_run_pending_for_the_cluster():
    # --retime-flagged with --launcher submitit: a run whose every record is stored but whose timing is
    # flagged is submitted again (before, nothing was submitted and the flagged timing stayed)
    from tokenbench import launch

    class Stored:
        def get(self, key):  # every record there, each timing timed for 1 s
            return {"metrics": {"min_run_time": 1.0} if key in ("b", "d") else {}}

        def has(self, key):
            return True

    keys = [{"flops": "a", "throughput": "b"}, {"flops": "c", "throughput": "d"}]
    assert launch.pending_runs([None, None], keys, Stored()) == []
    assert launch.pending_runs([None, None], keys, Stored(), retime={"d"}) == [1]
    # timings asked for longer than they ran are pending too; FLOPs records have no length
    assert launch.pending_runs([None, None], keys, Stored(), min_run_time=1.0) == []
    assert launch.pending_runs([None, None], keys, Stored(), min_run_time=2.0) == [0, 1]


def test_a_dry_run_or_a_refused_submission_leaves_the_folders_plan_as_it_was(tiny_default, tmp_path, cli,
                                                                             monkeypatch):
    """The plan names the runs a report reads and `prune --unplanned` keeps: a dry run of another
    sweep, or a submission refused before any job, must not replace it."""
    pytest.importorskip("submitit")
    monkeypatch.setenv("TOKENBENCH_EMBEDDED_DIR", str(tiny_default))
    out = tmp_path / "o"
    flops_only = [a if a != "flops,accuracy" else "flops" for a in SWEEP_ARGS]
    code, _, err = cli(*flops_only, "--out", str(out))
    assert code == 0, err
    plan = (out / "sweep.json").read_bytes()
    other = [a if a != "keep_rate=[0.5]" else "keep_rate=[0.3]" for a in flops_only]
    code, _, err = cli(*other, "--out", str(out), "--dry-run")
    assert code == 0, err
    assert (out / "sweep.json").read_bytes() == plan
    code, _, err = cli(*[a if a != "flops" else "flops,throughput" for a in other], "--out", str(out),
                       "--launcher", "submitit", "--cluster", "local")
    assert code == 2 and "the local executor runs its" in err, err
    assert (out / "sweep.json").read_bytes() == plan
    code, text, err = cli("prune", str(out), "--unplanned", "--dry-run")
    assert code == 0 and ".json" not in text, text               # nothing measured is taken for unplanned
