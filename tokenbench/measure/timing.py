"""The two timings: throughput (images per second over timed blocks, and batch-1 latency) and
the paired speedup of a reduced model over its dense model, timed interleaved.

Both time the model alone with ``torch.utils.benchmark`` (warm-up, synchronised, several
blocks of runs, thread count set explicitly), eager, compiled or replayed as CUDA graphs
(:mod:`tokenbench.measure.timed_forward`).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Optional

import torch
import torch.nn as nn

from ..errors import UserError
from ..quiet import cuda_runtime_notice
from .busy import load_watch
from .compilation import compile_mode, compile_stats, fresh_compile_state
from .env import resolve_device
from .forward import device_context, eval_mode
from .memory import PeakMemory
from .stats import percentile
from .timed_forward import (check_finite, check_graphs, cuda_timing_settings, first_call_s, memory_format, prime,
                            on_device, prepare_timing, timed_runner, timing_env, timing_input, warm)

with cuda_runtime_notice():  # its import logs "No CUDA runtime is found" on machines without CUDA
    from torch.utils import benchmark


def throughput(model: nn.Module, batch_size: int = 64, device: str | torch.device = "auto",
               precision: str = "fp32", threads: Optional[int] = None, min_run_time: float = 2.0,
               warmup_s: float = 0.5, latency: bool = True, latency_samples: int = 30,
               img_size: Optional[int] = None, max_spread: float = 0.10,
               compile: Optional[str] = None, fresh_compile: bool = True,
               inputs: Optional[torch.Tensor] = None, cuda_graphs: bool = False) -> dict[str, Any]:
    """Images per second (median and quartiles over timed blocks) and batch-1 latency.

    The model alone: eval and inference mode, synthetic input already on the device,
    warm-up, then ``torch.utils.benchmark.Timer.blocked_autorange`` (which synchronises
    the current CUDA device: the model's device is made current) with the thread count set
    explicitly (its default is one thread; ours, the CPUs this process may use).
    ``spread_flag`` is set where the interquartile range exceeds ``max_spread`` of the
    median; ``env.busy`` where other processes took CPU time while it ran.

    ``compile``: time ``torch.compile(model, mode=compile)`` instead
    (:func:`~tokenbench.measure.compilation.compiled`); the first, compiling call is timed on its
    own (``compile_s``; ``latency_compile_s`` for the batch-1 graph) and never enters the timed
    blocks.  ``fresh_compile=False`` (a retry of the same measurement) reuses what an earlier
    call compiled instead of compiling again.  On CUDA, ``cudnn.benchmark`` is on and a
    convolutional model runs ``channels_last`` (both recorded in ``env``).

    ``inputs``: the batch to time (``batch_size`` real images, for a method whose token count
    depends on the image) instead of the synthetic one; latency takes its first image.

    ``cuda_graphs``: time the eager forward captured as a CUDA graph once per static shape and
    replayed (:mod:`tokenbench.measure.graphs`; CUDA only; the capture is reported apart,
    ``capture_s``).
    """
    compile = compile_mode(compile)
    dev = resolve_device(device) if isinstance(device, str) else device
    check_graphs(cuda_graphs, compile, dev)
    with cuda_timing_settings(dev):
        return _throughput(model, batch_size, dev, precision, threads, min_run_time, warmup_s, latency,
                           latency_samples, img_size, max_spread, compile, fresh_compile, inputs, cuda_graphs)


def _throughput(model, batch_size, device, precision, threads, min_run_time, warmup_s, latency,
                latency_samples, img_size, max_spread, compile, fresh_compile, inputs=None,
                cuda_graphs=False) -> dict[str, Any]:
    dev, threads, ctx, note = prepare_timing(model, device, precision, threads, batch_size, img_size)
    res: dict[str, Any] = {}
    with on_device([model], dev, threads):
        info = timing_env(model, dev, threads, compile, note)
        if cuda_graphs:
            info["cuda_graphs"] = True
        with eval_mode(model), torch.inference_mode(), device_context(dev), memory_format(model, dev) as fmt, \
                PeakMemory(dev) as mem, load_watch(info, threads):
            info["channels_last"] = fmt == torch.channels_last
            x = timing_input(model, batch_size, img_size, dev, inputs).contiguous(memory_format=fmt)
            if compile and fresh_compile:
                fresh_compile_state()
            if compile:
                prime(model, x, ctx)
            run = timed_runner(model, ctx, compile, cuda_graphs, dev)
            out, first_s = first_call_s(run, x, dev)
            if compile:
                res["compile_s"] = first_s
                res.update(compile_stats())
            if cuda_graphs:
                res["capture_s"] = first_s
            check_finite(out)
            warm(run, x, warmup_s)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            res.update(_timed_blocks(run, x, threads, batch_size, min_run_time, max_spread))
            if latency:
                res.update(_latency(run, x, dev, threads, warmup_s, min_run_time, latency_samples, compile))
        res["peak_mem_mb"] = mem.mb()
        res["peak_mem_kind"] = mem.kind
    res.update({"batch_size": batch_size, "device": dev.type, "precision": precision, "compile": compile,
                "env": info})
    if cuda_graphs:
        res["cuda_graphs"] = True
    return res


def _timed_blocks(run, x: torch.Tensor, threads: int, batch_size: int, min_run_time: float,
                  max_spread: float) -> dict[str, Any]:
    """Images per second: median and quartiles over ``blocked_autorange``'s blocks (at least five),
    and whether their spread exceeds ``max_spread`` of the median."""
    timer = benchmark.Timer(stmt="run(x)", globals={"run": run, "x": x}, num_threads=threads)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)
    # blocked_autorange may return very few blocks for a slow model: take more.
    while len(times) < 5:
        times += list(timer.blocked_autorange(min_run_time=min_run_time / 2).times)
    rates = [batch_size / t for t in times]
    res = {
        "img_per_s": statistics.median(rates),
        "img_per_s_q1": percentile(rates, 0.25),
        "img_per_s_q3": percentile(rates, 0.75),
        "trials": len(rates),
        "runs_per_trial": m.number_per_run,
    }
    iqr = res["img_per_s_q3"] - res["img_per_s_q1"]
    res["spread"] = iqr / res["img_per_s"] if res["img_per_s"] else float("nan")
    res["spread_flag"] = bool(res["spread"] > max_spread)
    return res


def _latency(run, x: torch.Tensor, dev: torch.device, threads: int, warmup_s: float, min_run_time: float,
             samples: int, compile: Optional[str]) -> dict[str, Any]:
    """Batch-1 latency of ``x``'s first image: median and p90 of single calls, in milliseconds
    (compiled: batch 1 is a graph of its own, its compile time reported apart)."""
    res: dict[str, Any] = {}
    x1 = x[:1].contiguous()
    t1 = benchmark.Timer(stmt="run(x)", globals={"run": run, "x": x1}, num_threads=threads)
    _, first1_s = first_call_s(run, x1, dev)
    if compile:
        res["latency_compile_s"] = first1_s
    warm(run, x1, min(warmup_s, 0.2))
    lat = []
    deadline = time.perf_counter() + max(1.0, min_run_time)
    while len(lat) < samples and (len(lat) < 5 or time.perf_counter() < deadline):
        lat.append(t1.timeit(1).mean * 1000.0)
    res["latency_ms_p50"] = percentile(lat, 0.5)
    res["latency_ms_p90"] = percentile(lat, 0.9)
    res["latency_samples"] = len(lat)
    return res


def speedup(model: nn.Module, baseline: nn.Module, batch_size: int = 64, device: str | torch.device = "auto",
            precision: str = "fp32", threads: Optional[int] = None, min_run_time: float = 2.0,
            rounds: int = 10, warmup_s: float = 0.5, img_size: Optional[int] = None,
            max_spread: float = 0.10, compile: Optional[str] = None,
            fresh_compile: bool = True, inputs: Optional[torch.Tensor] = None,
            cuda_graphs: bool = False) -> dict[str, Any]:
    """``model``'s speed over ``baseline``'s (its dense model), timed interleaved in rounds.

    Both run on the same input, in the same process and settings.  Each round times a
    block of the baseline and a block of the model back to back (alternating which goes
    first), so that whatever else the machine does at that moment slows both: the ratio of
    the two blocks cancels the drift that separate runs minutes apart would not.  Blocks
    are sized to about ``min_run_time / (2 * rounds)`` seconds each.  Returns the median
    ratio and its quartiles over rounds, and each model's median images per second.

    ``compile``: both models are compiled the same way
    (:func:`~tokenbench.measure.compilation.compiled`), each one's
    compile time reported apart (``compile_s``, ``baseline_compile_s``), never timed;
    ``fresh_compile``, ``inputs`` (both models run on them) and ``cuda_graphs`` (both models
    replayed as CUDA graphs) as in :func:`throughput`.
    """
    compile = compile_mode(compile)
    dev = resolve_device(device) if isinstance(device, str) else device
    check_graphs(cuda_graphs, compile, dev)
    with cuda_timing_settings(dev):
        return _speedup(model, baseline, batch_size, dev, precision, threads, min_run_time, rounds, warmup_s,
                        img_size, max_spread, compile, fresh_compile, inputs, cuda_graphs)


def _speedup(model, baseline, batch_size, device, precision, threads, min_run_time, rounds, warmup_s,
             img_size, max_spread, compile, fresh_compile, inputs=None, cuda_graphs=False) -> dict[str, Any]:
    if rounds < 3:
        raise UserError(f"a paired timing needs at least 3 rounds, got {rounds}")
    dev, threads, ctx, note = prepare_timing(model, device, precision, threads, batch_size, img_size)
    nets = (baseline, model)
    first_s = [0.0, 0.0]
    block_s = max(min_run_time / (2 * rounds), 1e-3)
    with on_device(nets, dev, threads):
        info = timing_env(model, dev, threads, compile, note)
        with eval_mode(baseline), eval_mode(model), torch.inference_mode(), device_context(dev), \
                memory_format(baseline, dev), memory_format(model, dev) as fmt, load_watch(info, threads):
            info["channels_last"] = fmt == torch.channels_last
            x = timing_input(model, batch_size, img_size, dev, inputs).contiguous(memory_format=fmt)
            if compile and fresh_compile:
                fresh_compile_state()
            if compile:
                for n in nets:
                    prime(n, x, ctx)
            runs = [timed_runner(n, ctx, compile, cuda_graphs, dev) for n in nets]
            seen = []  # the compile counters after each model's first calls: the dense model's, then both
            for i, run in enumerate(runs):
                out, first_s[i] = first_call_s(run, x, dev)
                check_finite(out)
                warm(run, x, warmup_s / 2)
                seen.append(compile_stats() if compile else {})
            stats = {k: v - seen[0][k] for k, v in seen[1].items()}  # the method's own
            stats.update({f"baseline_{k}": v for k, v in seen[0].items()})
            timers = [benchmark.Timer(stmt="run(x)", globals={"run": r, "x": x}, num_threads=threads) for r in runs]
            numbers = [_calls_per_block(t, block_s) for t in timers]
            ratios, per_image = _interleaved_rounds(timers, numbers, rounds, batch_size)
    res = _paired_result(ratios, per_image, numbers, rounds)
    if compile:
        res["compile_s"], res["baseline_compile_s"] = first_s[1], first_s[0]
        res.update(stats)
    if cuda_graphs:
        res["cuda_graphs"] = True
        res["capture_s"], res["baseline_capture_s"] = first_s[1], first_s[0]
        info["cuda_graphs"] = True
    res["spread_flag"] = bool(res["spread"] > max_spread)
    res.update({"batch_size": batch_size, "device": dev.type, "precision": precision, "compile": compile,
                "env": info})
    return res


def _calls_per_block(timer: benchmark.Timer, block_s: float) -> int:
    """Calls that fill ``block_s``: guessed from the median of three calls, then corrected once
    by a calibration block of that size (one slow or fast call misleads the first guess)."""
    est = statistics.median(timer.timeit(1).mean for _ in range(3))
    n = max(1, int(round(block_s / max(est, 1e-6))))
    per_call = timer.timeit(n).mean
    return max(1, int(round(block_s / max(per_call, 1e-6))))


def _interleaved_rounds(timers, numbers: list[int], rounds: int, batch_size: int
                        ) -> tuple[list[float], list[list[float]]]:
    """Per round, a block of each model back to back (which goes first alternates): the ratio
    baseline / model of seconds per image, and each model's seconds per image per round."""
    per_image: list[list[float]] = [[], []]
    ratios = []
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        got = [0.0, 0.0]
        for i in order:
            got[i] = timers[i].timeit(numbers[i]).mean / batch_size
            per_image[i].append(got[i])
        ratios.append(got[0] / got[1])
    return ratios, per_image


def _paired_result(ratios: list[float], per_image: list[list[float]], numbers: list[int], rounds: int
                   ) -> dict[str, Any]:
    """The median ratio over rounds, its quartiles and spread, and each model's median images per second."""
    med = statistics.median(ratios)
    q1, q3 = percentile(ratios, 0.25), percentile(ratios, 0.75)
    return {
        "speedup": med, "speedup_q1": q1, "speedup_q3": q3,
        "spread": (q3 - q1) / med if med else float("nan"),
        "rounds": rounds, "calls_per_block": {"baseline": numbers[0], "method": numbers[1]},
        "img_per_s": 1.0 / statistics.median(per_image[1]),
        "baseline_img_per_s": 1.0 / statistics.median(per_image[0]),
    }
