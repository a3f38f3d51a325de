"""Evaluation across the processes ``torchrun`` starts: one process group, shards, gathers.

``torchrun --nproc-per-node N -m tokenbench eval ...`` starts N copies of the command with
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set.
:func:`init_from_env` joins them into one process group (NCCL on CUDA, gloo on CPU).  The
evaluation set is cut into contiguous shards of whole batches (:func:`shard`), so that
every image is evaluated once, in the very batch it would be in one process, and the
per-image results are gathered back in dataset order (:func:`gather_in_rank_order`).
FLOPs and throughput run on rank 0 alone while the others wait (:func:`on_main`), and
only rank 0 prints and writes records.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys
from typing import Any, Callable, Optional

# Rank 0's timed measurements may take a while; the waiting ranks must not give up.
WAIT = datetime.timedelta(hours=2)

_control = None  # a gloo group for control messages: waiting on it keeps no GPU or CPU busy


def launched() -> bool:
    """Whether this process is one of several started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def _torch_dist():
    import torch.distributed as dist

    return dist if dist.is_available() else None


def active() -> bool:
    """Whether a process group of more than one process is running."""
    if not launched():
        return False
    dist = _torch_dist()
    return dist is not None and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _torch_dist().get_rank() if active() else 0


def world_size() -> int:
    return _torch_dist().get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> bool:
    """Join torchrun's process group (a no-op outside torchrun).  True when distributed.

    NCCL when CUDA is available (each process on the GPU ``LOCAL_RANK``), gloo otherwise.
    Every rank but 0 prints nothing on stdout and shows no progress bar.
    """
    global _control
    if not launched():
        return False
    dist = _torch_dist()
    if dist is None:
        from .errors import UserError

        raise UserError("torchrun started several processes but this torch has no torch.distributed")
    if dist.is_initialized():
        return True
    import torch

    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            from .errors import UserError

            raise UserError(f"torchrun started process {local} on this node but it has only "
                            f"{torch.cuda.device_count()} GPU(s): use --nproc-per-node {torch.cuda.device_count()}")
        torch.cuda.set_device(local)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=WAIT)
    _control = dist.new_group(backend="gloo", timeout=WAIT) if backend != "gloo" else None
    atexit.register(_shutdown)
    if dist.get_rank() != 0:
        _silence()
    return True


def _shutdown() -> None:
    dist = _torch_dist()
    if dist is not None and dist.is_initialized():
        dist.destroy_process_group()


class _NotATerminal:
    """A stream that says it is not a terminal (so no progress bar is drawn on it)."""

    def __init__(self, stream):
        self._stream = stream

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _silence() -> None:
    """Rank 0 speaks for all: the others write nothing on stdout and draw no progress bars.

    Their warnings and errors still reach stderr.
    """
    sys.stdout = open(os.devnull, "w")
    sys.stderr = _NotATerminal(sys.stderr)


# --------------------------------------------------------------------------- shards and gathers

def shard(n: int, batch_size: int, rank: int, world: int) -> range:
    """This rank's images: a contiguous run of whole batches of ``range(n)``.

    The batches ``[0, b), [b, 2b), ...`` are dealt out in contiguous blocks, so the shards
    cover ``range(n)`` exactly (none dropped, none twice), in order, and every image sits in
    the same batch as in a one-process evaluation (the same logits, bit for bit).
    """
    batches = -(-n // batch_size)
    first = batches * rank // world
    last = batches * (rank + 1) // world
    return range(min(n, first * batch_size), min(n, last * batch_size))


def gather_in_rank_order(items: list) -> list:
    """Every rank's ``items``, concatenated in rank order (identity in one process)."""
    if not active():
        return list(items)
    dist = _torch_dist()
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items), group=_control)
    return [x for part in parts for x in part]


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (identity in one process)."""
    if not active():
        return obj
    box = [obj]
    _torch_dist().broadcast_object_list(box, src=0, group=_control)
    return box[0]


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 alone, the others waiting; every rank returns rank 0's result.

    For what must not share the device (throughput) or need not be repeated (FLOPs).
    When ``fn`` fails on rank 0, it raises there and the other ranks exit quietly.
    """
    if not active():
        return fn()
    result: Optional[tuple] = None
    error: Optional[BaseException] = None
    if is_main():
        try:
            result = ("ok", fn())
        except BaseException as e:  # tell the others before raising
            error = e
            result = ("failed", 2 if e.__class__.__name__ == "UserError" else 1)
    result = broadcast_from_main(result)
    if error is not None:
        raise error
    if result[0] == "failed":
        raise SystemExit(result[1])
    return result[1]


class _HeldByAll:
    """A claim every rank holds: under torchrun the ranks measure each record together."""

    held = True
    holder = None

    def __init__(self, key: str):
        self.key = key

    def __enter__(self) -> "_HeldByAll":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def is_free(self) -> bool:
        return True


_WORK_SPLIT_ELSEWHERE = False


@contextlib.contextmanager
def work_split_elsewhere():
    """Within: another engine (a submitit job array) has already split the work among its
    jobs, so :func:`claim` takes no claim files (no file, no heartbeat)."""
    global _WORK_SPLIT_ELSEWHERE
    old, _WORK_SPLIT_ELSEWHERE = _WORK_SPLIT_ELSEWHERE, True
    try:
        yield
    finally:
        _WORK_SPLIT_ELSEWHERE = old


def claims_bypassed() -> bool:
    """Whether :func:`claim` takes no claim files here (torchrun, or work split elsewhere)."""
    return active() or _WORK_SPLIT_ELSEWHERE


def claim(store, key: str):
    """``store.claim(key)`` (one runner measures each record), except under torchrun or where
    another engine split the work (:func:`work_split_elsewhere`).

    Under torchrun the ranks are one runner: a claim taken by one rank and not by the others
    would leave the others out of a collective evaluation, so none is taken (the store's atomic
    per-key writes still keep every record whole and single).
    """
    return _HeldByAll(key) if claims_bypassed() else store.claim(key)
