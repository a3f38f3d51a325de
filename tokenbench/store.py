"""Atomic file writes and file hashes.  (The results store builds on these.)"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_texts(texts: dict[Path, str]) -> list[Path]:
    """Write each text to its path atomically, in order; a path that cannot be written is one
    user error line naming it. Returns the paths written."""
    from .errors import UserError, cannot_write

    for path, text in texts.items():
        try:
            atomic_write_text(path, text)
        except OSError as e:
            raise UserError(cannot_write(path, e)) from None
    return list(texts)


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- records

import json
import subprocess
import socket
import time as _time
import warnings
from typing import Any, Optional

SCHEMA_VERSION = 1


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def record_key(key_fields: dict) -> str:
    """A short hash of everything that determines a result."""
    return hashlib.sha256(canonical(key_fields).encode()).hexdigest()[:20]


OUTPUT_DIRS = ("results", "runs")  # what the tool writes: a run changing them leaves the code clean


def git_commit(changed: bool = False) -> dict:
    """The checkout's commit and whether tracked files other than the tool's outputs
    (:data:`OUTPUT_DIRS`) differ from it (``changed``: also which)."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                 ".", *(f":(exclude){d}" for d in OUTPUT_DIRS)],
                                capture_output=True, text=True, timeout=5).stdout.splitlines()
        out = {"commit": sha or None, "dirty": bool(status) if sha else None}
        if changed:
            out["changed"] = sorted(line[3:] for line in status) if sha else None
        return out
    except Exception:
        return {"commit": None, "dirty": None, **({"changed": None} if changed else {})}


def code_line(code: dict) -> str:
    """``code 80e147c`` or ``code 80e147c + uncommitted changes to a.py, b.py``: what made a table."""
    if not code.get("commit"):
        return "code: not a git checkout"
    line = f"code {code['commit'][:7]}"
    if code.get("dirty"):
        files = code.get("changed") or []
        named = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        line += " + uncommitted changes" + (f" to {named}" if files else "")
    return line


def make_record(kind: str, key_fields: dict, spec: dict, metrics: dict, env: Optional[dict] = None,
                extra: Optional[dict] = None) -> dict:
    """A record: what was measured (spec), the result (metrics), provenance; keyed by ``key_fields``."""
    rec = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "key": record_key({"kind": kind, **key_fields}),
        "key_fields": key_fields,
        "spec": spec,
        "metrics": metrics,
        "env": env or {},
        "meta": {"host": socket.gethostname(), "time": _time.strftime("%Y-%m-%dT%H:%M:%S%z"), **git_commit()},
    }
    if extra:
        rec.update(extra)
    return rec


def _checksum(rec: dict) -> str:
    body = {k: v for k, v in rec.items() if k != "checksum"}
    return hashlib.sha256(canonical(body).encode()).hexdigest()


def ensure_writable_dir(path: str | os.PathLike, what: str = "output directory") -> None:
    """Refuse (``UserError``), before anything is measured, a directory that files could not be written in.

    The directory, or its nearest existing ancestor when it is still to be created, must be a
    directory that a file can be created in.  ``os.access`` answers from the permission bits
    (and says yes to root), while read-only mounts, ACLs and network or FUSE file systems
    may still refuse, so a temporary file is created there and removed at once: a refused
    command leaves the file system as it was.
    """
    from .errors import UserError

    path = Path(path)
    d = path
    while not d.exists():
        if d.is_symlink():  # a dangling link
            raise UserError(f"cannot create {what} {path}: {d} is a broken link")
        if d.parent == d:
            break
        d = d.parent
    if not d.is_dir():
        raise UserError(f"cannot create {what} {path}: {d} is not a directory")
    where = "is not writable" if d == path else f"cannot be created ({d} is not writable)"
    if not os.access(d, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} {where}")
    try:
        fd, probe = tempfile.mkstemp(dir=d, prefix=".tokenbench-write-test.")
    except OSError as e:
        raise UserError(f"{what} {path} {where}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(probe)


class Store:
    """One JSON file per record under ``<root>/records/``, written atomically.

    The file name is the record's key, so two writers measuring the same run write
    the same file (the last complete one wins; neither is ever half-written) and a
    reader never sees a duplicate.  A damaged file is moved to ``<root>/quarantine/``
    with a warning naming it, never mixed into a table.
    """

    def __init__(self, root: str | os.PathLike, read_only: bool = False):
        self.root = Path(root)
        self.dir = self.root / "records"
        self.read_only = read_only  # a reference store: read, never written (not even to set a file aside)

    def ensure_writable(self) -> None:
        """Refuse, before anything is measured, a results directory whose records could not be written."""
        ensure_writable_dir(self.dir, "results directory")

    def claim(self, key: str, **options) -> "Claim":
        """An exclusive claim on measuring ``key`` (see :class:`Claim`); use as a context manager."""
        return Claim(self.root / "claims", key, **options)

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def put(self, rec: dict) -> Path:
        rec = dict(rec)
        rec["checksum"] = _checksum(rec)
        return self._write(rec)

    def put_copy(self, rec: dict) -> Path:
        """Write a record read from another store, unchanged (its checksum and provenance kept)."""
        if rec.get("checksum") != _checksum(rec):
            raise ValueError(f"record {rec.get('key')} does not match its checksum")
        return self._write(rec)

    def _write(self, rec: dict) -> Path:
        from .errors import UserError

        self.ensure_writable()
        p = self.path(rec["key"])
        try:
            atomic_write_text(p, json.dumps(rec, indent=1, default=str) + "\n")
        except OSError as e:
            raise UserError(f"cannot write record {p}: {e.strerror or e}") from None
        return p

    def has(self, key: str) -> bool:
        return self.get(key) is not None

    def get(self, key: str) -> Optional[dict]:
        p = self.path(key)
        if not p.is_file():
            return None
        return self._load(p)

    def _load(self, p: Path) -> Optional[dict]:
        try:
            rec = json.loads(p.read_text())
            ok = isinstance(rec, dict) and rec.get("checksum") == _checksum(rec) and \
                rec.get("schema_version") == SCHEMA_VERSION and rec.get("key") == p.stem
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            ok, rec = False, None
        if not ok:
            self._quarantine(p)
            return None
        return rec

    def _quarantine(self, p: Path) -> None:
        if self.read_only:
            warnings.warn(f"damaged record {p} ignored", stacklevel=3)
            return
        q = self.root / "quarantine"
        try:
            q.mkdir(parents=True, exist_ok=True)
            dest = q / f"{p.name}.{int(_time.time())}"
            os.replace(p, dest)
            warnings.warn(f"damaged record {p} set aside as {dest}", stacklevel=3)
        except OSError:
            warnings.warn(f"damaged record {p} ignored", stacklevel=3)

    def records(self, kind: Optional[str] = None) -> list[dict]:
        if not self.dir.is_dir():
            return []
        out = []
        for p in sorted(self.dir.glob("*.json")):
            rec = self._load(p)
            if rec is not None and (kind is None or rec.get("kind") == kind):
                out.append(rec)
        return out


# --------------------------------------------------------------------------- claims

class Claim:
    """An exclusive claim on measuring one record: ``<claims>/<key>.claim``, made with O_CREAT|O_EXCL.

    Two runners of one sweep on one directory then measure each run once: the one that
    holds the claim measures, the other goes on with other runs and waits for the
    record at the end.  The file says who holds it (host, pid, start time); the holder
    refreshes its time stamp every ``heartbeat`` seconds and removes it when done, also
    on an error or Ctrl-C.  A claim is stale, and taken over at once, when its owner is known
    dead: its file names no host and pid (damaged; a claim file is written whole, by a link),
    its process is gone (same host), or the SLURM job it names has ended (``squeue``).
    Otherwise it is stale once its time stamp is older than ``stale_after`` seconds (a
    runner killed on another host, outside SLURM).

        with store.claim(key) as claim:
            if claim.held:
                ...measure and store the record...
    """

    def __init__(self, directory: str | os.PathLike, key: str, stale_after: float = 900.0,
                 heartbeat: float = 30.0):
        self.key = key
        self.path = Path(directory) / f"{key}.claim"
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self.held = False
        self.holder: Optional[dict] = None  # who holds it, when another runner does
        self._mine = b""
        self._stop = None
        self._jobs_ended: dict[str, tuple[float, Optional[bool]]] = {}  # job id -> (asked at, ended?)

    # ----------------------------------------------------------- taking and giving back
    def acquire(self) -> bool:
        """Take the claim if it is free or stale; ``held`` says whether it is ours."""
        import threading

        for _ in range(3):  # a stale claim is moved aside, then taken afresh
            if self._create():
                self.held = True
                self._stop = threading.Event()
                threading.Thread(target=self._beat, args=(self._stop,), daemon=True).start()
                return True
            seen = self._read()
            if seen is None:
                continue  # released meanwhile
            self.holder = self._info(seen)
            if not self._stale(seen):
                return False
            self._take_over(seen)
        return False

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._read() == self._mine:  # not taken over meanwhile
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "Claim":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def is_free(self) -> bool:
        """Whether nobody (alive) holds the claim now."""
        seen = self._read()
        return seen is None or self._stale(seen)

    # ----------------------------------------------------------- the file
    def _create(self) -> bool:
        """Write the claim whole to a private file, then link it in place: the link fails if a
        claim is there, and nobody ever reads a half-written claim."""
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": _time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "nonce": os.urandom(8).hex()}
        job = slurm_job_id()
        if job:
            me["job"] = job
        data = (json.dumps(me) + "\n").encode()
        tmp = self.path.with_name(f".{self.path.name}.{me['nonce']}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links: create exclusively, then write
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
        except FileExistsError:
            return False
        except OSError as e:
            from .errors import UserError

            raise UserError(f"cannot claim {self.path}: {e.strerror or e}") from None
        finally:
            tmp.unlink(missing_ok=True)
        self._mine = data
        return True

    def _read(self) -> Optional[bytes]:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    @staticmethod
    def _info(seen: bytes) -> dict:
        try:
            info = json.loads(seen)
            return info if isinstance(info, dict) else {}
        except ValueError:
            return {}  # being written, or damaged

    def _age(self) -> float:
        try:
            return _time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _stale(self, seen: bytes) -> bool:
        info = self._info(seen)
        if not info.get("host") or not isinstance(info.get("pid"), int):
            return True  # names no owner: nobody can be waiting on it
        if info["host"] == socket.gethostname():
            try:
                os.kill(info["pid"], 0)
            except ProcessLookupError:
                return True  # its process is gone
            except PermissionError:
                pass  # alive, another user's
        job = info.get("job")
        if isinstance(job, str) and job and job != slurm_job_id() and self._job_ended(job):
            return True
        return self._age() > self.stale_after

    def _job_ended(self, job: str) -> bool:
        """Whether SLURM says job ``job`` has ended (asked at most every 30 s; False when unknown)."""
        asked, ended = self._jobs_ended.get(job, (0.0, None))
        if _time.time() - asked > 30.0:
            ended = slurm_job_ended(job)
            self._jobs_ended[job] = (_time.time(), ended)
        return bool(ended)

    def _take_over(self, seen: bytes) -> None:
        """Move a stale claim aside; put it back if it changed meanwhile (someone else took it over)."""
        aside = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}.{os.urandom(4).hex()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if aside.read_bytes() != seen:
                os.link(aside, self.path)  # fails, rather than overwrite, if a claim is there again
        except OSError:
            pass
        finally:
            os.unlink(aside)

    def _beat(self, stop) -> None:
        while not stop.wait(self.heartbeat):
            if self._read() != self._mine:
                return
            try:
                os.utime(self.path)
            except OSError:
                return


# --------------------------------------------------------------------------- SLURM jobs of claims

SLURM_LIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING",
                     "STAGE_OUT", "SIGNALING", "STOPPED", "PREEMPTED", "RESV_DEL_HOLD", "REQUEUE_HOLD",
                     "REQUEUE_FED", "SPECIAL_EXIT"}


def slurm_job_id() -> Optional[str]:
    """This process's SLURM job (``ARRAY_TASK`` form inside an array), or None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def slurm_job_ended(job: str) -> Optional[bool]:
    """Whether SLURM's ``squeue`` reports job ``job`` ended: True (no longer queued, or in a final
    state), False (queued or running), None (no squeue here, or no clear answer)."""
    import shutil
    import subprocess

    if shutil.which("squeue") is None:
        return None
    try:
        proc = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    states = {ln.strip().upper() for ln in proc.stdout.splitlines() if ln.strip()}
    if proc.returncode == 0:
        return not (states & SLURM_LIVE_STATES)
    return True if "invalid job id" in proc.stderr.lower() else None
