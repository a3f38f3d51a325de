"""Claims on measurements: taken over at once when their owner is known dead, and not taken at all
where another engine already split the work."""

import json
import os

import pytest

from tokenbench import distributed, launch
from tokenbench.store import Claim


@pytest.mark.parametrize("content", [b"", b"garbage{", b'{"since": "x"}', b'{"host": "h", "pid": "?"}', b"[1, 2]"])
def test_a_claim_naming_no_owner_is_stale_at_once(tmp_path, content):
    (tmp_path / "k.claim").write_bytes(content)
    with Claim(tmp_path, "k", stale_after=3600) as c:
        assert c.held
    assert not list(tmp_path.iterdir())


def test_a_claim_is_written_whole_and_names_its_slurm_job(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "900")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    with Claim(tmp_path, "k") as c:
        info = json.loads((tmp_path / "k.claim").read_text())
        assert c.held and info["job"] == "900_3" and info["pid"] == os.getpid()
        assert [p.name for p in tmp_path.iterdir()] == ["k.claim"]  # no temporary file left


SQUEUE = """\
#!/bin/sh
# squeue -h -j JOB -o %T
case "$3" in
  77) echo RUNNING ;;
  78) echo COMPLETED ;;
  *) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1 ;;
esac
"""


def test_a_claim_of_an_ended_slurm_job_is_taken_over_at_once(tmp_path, monkeypatch):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "squeue").write_text(SQUEUE)
    (bin_ / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_), os.environ.get("PATH", "")]))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    d = tmp_path / "claims"
    d.mkdir()
    for job, taken in (("77", False), ("78", True), ("4242", True)):
        (d / f"k{job}.claim").write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "x", "job": job}))
        with Claim(d, f"k{job}", stale_after=3600) as c:
            assert c.held == taken, job
    # no squeue on this machine: the time stamp decides, as before
    monkeypatch.setenv("PATH", "/nonexistent")
    (d / "k4243.claim").write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "x", "job": "4243"}))
    with Claim(d, "k4243", stale_after=3600) as c:
        assert not c.held


def test_a_submitit_job_takes_no_claim_files(tmp_path, monkeypatch):
    from tokenbench import store as store_mod
    from tokenbench import sweep

    seen = []

    def execute(sw, runs, store, force=False, retime=None):
        with distributed.claim(store, "k") as c:
            seen.append(c.held)
        return []

    def no_claims(self, key, **kw):
        raise AssertionError("a claim file was taken inside a job of an array")

    monkeypatch.setattr(sweep, "execute", execute)
    monkeypatch.setattr(store_mod.Store, "claim", no_claims)
    assert launch.run_share(None, [], str(tmp_path), False, []) == []
    assert seen == [True] and not (tmp_path / "claims").exists()
    # outside a job, the same call claims as before
    with pytest.raises(AssertionError, match="claim file"):
        distributed.claim(store_mod.Store(tmp_path), "k")
