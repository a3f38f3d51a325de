"""What every timing shares: the device, threads and precision prepared, where and how it ran
recorded, the callable it times (eager, compiled, or replayed as CUDA graphs), the batch it
runs on, its first call kept out of the timed region, the warm-up, and the GPU settings a
timing runs under (cuDNN autotuning, ``channels_last`` for convolutional models)."""

from __future__ import annotations

import contextlib
import time
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..errors import UserError
from .compilation import compiled
from .env import attention_kernel, default_threads, env_info, resolve_device
from .forward import example_input, precision_context
from .memory import check_batch_fits


def prepare_timing(model: nn.Module, device, precision: str, threads: Optional[int], batch_size: int,
                   img_size: Optional[int]):
    """(device, threads, precision context, precision note) of a timing; a bad thread count or a
    batch that would not fit is refused."""
    dev = resolve_device(device) if isinstance(device, str) else device
    threads = threads or (torch.get_num_threads() if dev.type != "cpu" else default_threads())
    if threads < 1:
        raise UserError(f"threads must be at least 1, got {threads}")
    check_batch_fits(model, batch_size, dev, precision, img_size)
    ctx, note = precision_context(dev, precision)
    return dev, threads, ctx, note


def timing_env(model: nn.Module, dev: torch.device, threads: int, compile, note: Optional[str]) -> dict:
    """What a timing records of where and how it ran (device, threads, attention path, compile mode)."""
    info = env_info(dev, threads)
    info["attention"] = attention_kernel(model)
    info["compile"] = compile
    if note:
        info["precision_note"] = note
    return info


@contextlib.contextmanager
def on_device(nets: Sequence[nn.Module], dev: torch.device, threads: int):
    """``nets`` on ``dev`` and torch's thread count set to ``threads`` inside; both put back after."""
    homes = [next(n.parameters()).device for n in nets]
    for n, home in zip(nets, homes):
        if home != dev:
            n.to(dev)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(prev_threads)
        for n, home in zip(nets, homes):
            if home != dev:
                n.to(home)


def check_graphs(cuda_graphs: bool, compile: Optional[str], dev: torch.device) -> None:
    """CUDA graphs time the eager model on CUDA: anything else is refused in one line."""
    if not cuda_graphs:
        return
    from .graphs import check_device

    check_device(dev)
    if compile:
        raise UserError("--cuda-graphs times the eager model; compiled, CUDA graphs are "
                        "--compile-mode reduce-overhead")


def _runner(model: nn.Module, ctx):
    def run(inp):
        with ctx:
            return model(inp)
    return run


def timed_runner(model: nn.Module, ctx, compile: Optional[str], cuda_graphs: bool, dev: torch.device):
    """The callable a timing calls: eager, compiled, or the eager forward replayed as CUDA graphs."""
    run = _runner(compiled(model, compile), ctx)
    if cuda_graphs:
        from .graphs import replayer

        run = replayer(run, dev)
    return run


def timing_input(model: nn.Module, batch_size: int, img_size: Optional[int], dev: torch.device,
                 inputs: Optional[torch.Tensor]) -> torch.Tensor:
    """The batch a timing runs on: ``inputs`` (real images) when given, else the synthetic one."""
    if inputs is None:
        return example_input(model, batch_size, img_size, device=dev)
    if inputs.shape[0] != batch_size:
        raise ValueError(f"timing inputs hold {inputs.shape[0]} images, the batch size is {batch_size}")
    return inputs.to(dev)


def prime(model: nn.Module, x: torch.Tensor, ctx) -> None:
    """One eager forward before a model is compiled: a reduced model keeps its last token state
    after a forward, so a first compiled call made without one would be compiled again on the
    second call (dynamo guards on it), doubling the compile and splitting ``compile_s``."""
    with ctx:
        model(x)


def first_call_s(run, x: torch.Tensor, dev: torch.device) -> tuple[torch.Tensor, float]:
    """(output, seconds) of one synchronised call: under ``torch.compile`` the first call
    compiles, so this is the compile time (plus one forward), kept out of any timed region."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    out = run(x)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return out, time.perf_counter() - t0


def is_convolutional(model: nn.Module) -> bool:
    """Whether ``model`` has 2-d convolutions besides a patch embedding (a hybrid or CNN
    model): those run in ``channels_last`` on CUDA."""
    from ..backbones import backbone_of

    try:
        return backbone_of(model).convolutional
    except UserError:
        return any(isinstance(m, nn.Conv2d) for m in model.modules())


@contextlib.contextmanager
def cuda_timing_settings(dev: torch.device):
    """cuDNN autotuning (``cudnn.benchmark``) on while timing on CUDA, restored after; the
    timing's env records it (:func:`~tokenbench.measure.env.gpu_settings`).  Nothing changes on
    other devices."""
    if dev.type != "cuda":
        yield
        return
    prev = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = prev


@contextlib.contextmanager
def memory_format(model: nn.Module, dev: torch.device):
    """Yields the input memory format: ``channels_last`` for a convolutional model on CUDA
    (the model converted inside, back to contiguous after), else ``contiguous_format``."""
    if dev.type != "cuda" or not is_convolutional(model):
        yield torch.contiguous_format
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield torch.channels_last
    finally:
        model.to(memory_format=torch.contiguous_format)


def check_finite(out: torch.Tensor) -> None:
    if not torch.isfinite(out.float()).all():
        raise UserError("the model produced NaN or infinite logits; refusing to time it")


def warm(run, x, seconds: float) -> None:
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        run(x)
