"""The three measurements: FLOPs, throughput, accuracy.

Each is a function of (model, settings) that leaves the model as it found it.

FLOPs are fvcore's (one multiply-add = one FLOP, as the papers count), with a handle
for fused attention, which fvcore would otherwise count as zero.  Throughput times the
model alone with ``torch.utils.benchmark`` (warm-up, synchronised, several blocks of
runs, thread count set explicitly).  Accuracy comes with its sample size, a Wilson
95% interval and per-image correctness for paired tests.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from .errors import UserError

# --------------------------------------------------------------------------- environment


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def default_threads() -> int:
    """The CPUs this process may use (its affinity; a container or `taskset` may allow fewer
    than ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} requested but CUDA is not available on this machine (use --device cpu)")
        return torch.device(device)
    if device == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise UserError("--device mps requested but MPS is not available on this machine")
        return torch.device("mps")
    if device == "cpu":
        return torch.device("cpu")
    raise UserError(f"unknown device {device!r} (use auto, cpu or cuda)")


def env_info(device: torch.device | str = "cpu", threads: Optional[int] = None) -> dict[str, Any]:
    """Where and with what a figure was measured."""
    import timm

    device = torch.device(device)
    info: dict[str, Any] = {
        "device": device.type,
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "threads": threads or torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpus_allowed": default_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["device_name"] = info["gpu"]
        info.update(gpu_settings())
    else:
        info["device_name"] = info["cpu"]
    try:
        info["load_avg"] = round(os.getloadavg()[0], 2)
    except OSError:
        info["load_avg"] = None
    return info


def gpu_settings() -> dict[str, Any]:
    """The CUDA settings that change a GPU figure: TF32 / float32 matmul precision, cuDNN
    benchmark mode, and which fused-attention kernels PyTorch may pick."""
    out: dict[str, Any] = {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
    }
    sdp = {}
    for name in ("flash", "mem_efficient", "math", "cudnn"):
        fn = getattr(torch.backends.cuda, f"{name}_sdp_enabled", None)
        if fn is not None:
            sdp[name] = bool(fn())
    out["sdpa_enabled"] = sdp
    return out


def attention_kernel(model: nn.Module) -> str:
    """Which attention the model's blocks run: ``"sdpa"`` (fused scaled-dot-product attention)
    or ``"explicit"`` (softmax of the full matrix), from timm's switch ``fused_attn``, which
    timm's own forward and the ViT backbone's surgery (``tokenbench.backbones.vit.attention``) both honour;
    ``"mixed"`` where blocks differ."""
    fused = {bool(getattr(m, "fused_attn")) for m in model.modules() if hasattr(m, "fused_attn")}
    if not fused:
        return "n/a"
    return "sdpa" if fused == {True} else ("explicit" if fused == {False} else "mixed")


def _cpu_jiffies() -> Optional[tuple[int, int]]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()[1:]
        vals = [int(v) for v in parts[:8]]
        idle = vals[3] + vals[4]  # idle + iowait
        return sum(vals) - idle, sum(vals)
    except (OSError, ValueError, IndexError):
        return None


def _self_jiffies() -> Optional[int]:
    """CPU time of this process (all its threads) and of its descendants, in jiffies.

    Descendants count as this measurement's own work, not as another process's: torch.compile's
    worker processes compile C++ kernels while a compiled measurement starts.  Each process's
    utime + stime, plus the time of the children it has reaped (cutime + cstime)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        own = sum(int(x) for x in fields[11:15])
    except (OSError, ValueError, IndexError):
        return None
    children: dict[int, list[int]] = {}
    times: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(d))
            times[int(d)] = sum(int(x) for x in fields[11:15])
        except (OSError, ValueError, IndexError):  # a process that ended while we read
            continue
    todo, seen = list(children.get(os.getpid(), [])), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        own += times.get(pid, 0)
        todo += children.get(pid, [])
    return own


@contextlib.contextmanager
def load_watch(info: dict, threads: int):
    """Measure what *other* processes ran during a measurement and flag a busy machine.

    The 1-minute load average lags by a minute and counts this process too, so it cannot
    tell a contended measurement from the one before it.  Instead the CPU time all
    processes used during the measurement (``/proc/stat``) minus this process's own
    (``/proc/self/stat``) gives the cores others took: ``other_cores``.  The machine is
    ``busy`` when others took more than a quarter of a core, or, where /proc is missing,
    when the load average exceeds the threads asked for.
    """
    sys0, self0 = _cpu_jiffies(), _self_jiffies()
    t0 = time.perf_counter()
    yield
    wall = time.perf_counter() - t0
    sys1, self1 = _cpu_jiffies(), _self_jiffies()
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    info["load_avg"] = load
    if None not in (sys0, sys1, self0, self1) and wall > 0:
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        other = max(0.0, ((sys1[0] - sys0[0]) - (self1 - self0)) / hz / wall)
        info["other_cores"] = round(other, 2)
        info["busy"] = bool(other > 0.25)
    elif load is not None:
        info["busy"] = bool(load > threads + 0.5)


class PeakMemory:
    """Peak memory of one measurement, not of the process's lifetime.

    CUDA: ``max_memory_allocated`` after a reset.  CPU (Linux): the resident high-water mark
    (VmHWM) after resetting it through ``/proc/self/clear_refs``; where that is refused, the
    peak is sampled every 5 ms on a thread.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = ""
        self._sampler = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kind = "peak RSS during the measurement"
        except OSError:
            import threading

            self.kind = "sampled RSS during the measurement"
            self._peak = _rss_bytes() or 0
            self._stop = threading.Event()

            def sample():
                while not self._stop.wait(0.005):
                    self._peak = max(self._peak, _rss_bytes() or 0)

            self._sampler = threading.Thread(target=sample, daemon=True)
            self._sampler.start()
        return self

    def __exit__(self, *exc):
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
        return False

    def mb(self) -> Optional[float]:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._sampler is not None:
            return self._peak / 2**20
        hwm = _status_kb("VmHWM")
        return hwm / 1024 if hwm is not None else None


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _rss_bytes() -> Optional[int]:
    kb = _status_kb("VmRSS")
    return kb * 1024 if kb is not None else None


def device_context(dev: torch.device):
    """Make ``dev`` the current CUDA device, so that the timer synchronises the device the model is on."""
    if dev.type == "cuda":
        return torch.cuda.device(dev)
    return contextlib.nullcontext()


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside, the previous mode restored after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def model_input(model: nn.Module) -> tuple[int, int]:
    """(in_chans, img_size) the model expects."""
    from .backbones import input_config

    cfg = input_config(model)
    return cfg["in_chans"], cfg["img_size"]


def example_input(model: nn.Module, batch: int = 1, img_size: Optional[int] = None, device="cpu",
                  seed: int = 0) -> torch.Tensor:
    c, s = model_input(model)
    s = img_size or s
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, c, s, s, generator=g).to(device)


# --------------------------------------------------------------------------- FLOPs

def _sdpa_flop(inputs, outputs):
    """fvcore handle for aten::scaled_dot_product_attention: Q@K^T plus A@V (MACs)."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(inputs[i]) for i in range(3))
    *batch, n, d = q
    m = k[-2]
    dv = v[-1]
    b = 1
    for s in batch:
        b *= s
    return b * n * m * d + b * n * m * dv


def _cdist_flop(inputs, outputs) -> int:
    """fvcore handle for aten::cdist, [B, P, M] x [B, R, M]: B * P * R * M multiply-adds (as a
    Gram matrix costs; fvcore would otherwise count the pairwise distances as free)."""
    from fvcore.nn.jit_handles import get_shape

    *batch, p, m = get_shape(inputs[0])
    r = get_shape(inputs[1])[-2]
    b = 1
    for s in batch:
        b *= s
    return b * p * r * m


_EXTRA_HANDLES = {"aten::scaled_dot_product_attention": _sdpa_flop, "aten::cdist": _cdist_flop}


def register_flop_handle(op: str, fn) -> None:
    """Count ``op`` with ``fn(inputs, outputs) -> MACs`` (fvcore's handle signature)."""
    _EXTRA_HANDLES[op] = fn


def _count(model: nn.Module, x: torch.Tensor) -> tuple[float, dict]:
    import logging

    from .quiet import torch_jit_deprecations

    with torch_jit_deprecations():  # fvcore's import and trace, not the user's model
        from fvcore.nn import FlopCountAnalysis

        logging.getLogger("fvcore").setLevel(logging.ERROR)
        fa = FlopCountAnalysis(model, x)
        fa.set_op_handle(**_EXTRA_HANDLES)
        fa.unsupported_ops_warnings(False)
        fa.uncalled_modules_warnings(False)
        fa.tracer_warnings("none")
        total = fa.total()
        return float(total), dict(fa.by_operator())


def _last_counts(model: nn.Module) -> tuple[list[float], list[float]]:
    from .backbones import last_state

    st = last_state(model)
    return [float(t) for t in st.tokens], [float(t) for t in st.tokens_mlp]


def _count_fast(model: nn.Module, x: torch.Tensor) -> Optional[tuple[float, dict]]:
    """:func:`_count`'s numbers from one forward on the dispatcher (:mod:`tokenbench.flops_dispatch`);
    None where an operator has no rule there."""
    from .flops_dispatch import count

    got = count(model, x)
    return None if got is None else (got[0], {k: v for k, v in got[1].items() if v})


def token_counts(model: nn.Module, img_size: Optional[int] = None, x: Optional[torch.Tensor] = None
                 ) -> tuple[list[float], list[float]]:
    """Sequence length entering each block and each block's MLP (prefix tokens included)."""
    from .backbones import last_state

    with _surgery_for_counting(model):
        dev = next(model.parameters()).device
        if x is None:
            x = example_input(model, 1, img_size, device=dev)
        with eval_mode(model), torch.inference_mode():
            model(x)
        st = last_state(model)
        return [float(t) for t in st.tokens], [float(t) for t in st.tokens_mlp]


@contextlib.contextmanager
def _surgery_for_counting(model: nn.Module):
    """A plain timm ViT gets the shared surgery (with no method) for its token bookkeeping
    while it is counted, and is restored to its own classes after, as it was found."""
    from . import backbones

    added = False
    if not backbones.is_prepared(model):
        try:
            backbones.prepare(model, "none")
            added = True
        except UserError:
            pass
    try:
        yield
    finally:
        if added:
            backbones.restore(model)


def flops(model: nn.Module, img_size: Optional[int] = None, inputs: Optional[torch.Tensor] = None,
          max_images: int = 8, on_image: Optional[Callable[[int, int], None]] = None) -> dict[str, Any]:
    """GFLOPs per image (fvcore, multiply-add = 1), parameters, tokens per block.

    For methods whose token counts depend on the image, pass ``inputs`` (real images):
    FLOPs and token counts are then the mean over the first ``max_images`` of them: fvcore's
    trace on the first, then fvcore's rules read on the dispatcher in one forward each where they
    agree with fvcore there (:mod:`tokenbench.flops_dispatch`), else fvcore's trace on each;
    ``on_image(done, total)`` is told after each (a progress bar).
    Counting runs in eval mode under no_grad and restores the model's mode.
    """
    with _surgery_for_counting(model):
        return _flops(model, img_size, inputs, max_images, on_image)


def _flops(model: nn.Module, img_size: Optional[int], inputs: Optional[torch.Tensor], max_images: int,
           on_image: Optional[Callable[[int, int], None]] = None) -> dict:
    from .backbones import is_prepared

    dev = next(model.parameters()).device
    if inputs is None:
        xs = [example_input(model, 1, img_size, device=dev)]
    else:
        xs = [inputs[i:i + 1].to(dev) for i in range(min(max_images, len(inputs)))]
    totals, by_op = [], {}
    toks, toks_mlp = [], []
    fast = len(xs) > 1  # many images: fvcore's rules on the dispatcher, once fvcore agrees on the first
    with eval_mode(model), torch.no_grad():
        for i, x in enumerate(xs):
            got = _count_fast(model, x) if fast and i > 0 else None
            counted_here = got is not None   # that forward left this image's token counts in the state
            if got is None:
                got = _count(model, x)
                if fast and i == 0:
                    fast = _count_fast(model, x) == got  # the same number, operator by operator
            t, ops = got
            totals.append(t)
            for k, v in ops.items():
                by_op[k] = by_op.get(k, 0.0) + v / len(xs)
            if is_prepared(model):
                tk, tm = _last_counts(model) if counted_here else token_counts(model, x=x)
                toks.append(tk)
                toks_mlp.append(tm)
            if on_image is not None:
                on_image(i + 1, len(xs))
    n_params = sum(p.numel() for p in model.parameters())
    c, s = model_input(model)
    out = {
        "gflops": sum(totals) / len(totals) / 1e9,
        "params_m": n_params / 1e6,
        "img_size": img_size or s,
        "flops_by_operator": {k: v / 1e9 for k, v in sorted(by_op.items())},
        "flops_images": len(xs),
    }
    if len(totals) > 1:  # per-image counts (methods whose token count depends on the image)
        g = torch.tensor(totals, dtype=torch.float64) / 1e9
        out["gflops_per_image"] = {"mean": float(g.mean()), "std": float(g.std()) if len(g) > 1 else 0.0,
                                   "min": float(g.min()), "max": float(g.max())}
    if toks and len(xs) > 1:  # counted image by image: how the counts spread over the images
        out["tokens_per_image"] = token_distribution(toks, toks_mlp)
    if toks:
        out["tokens"] = [round(sum(col) / len(col), 3) for col in zip(*toks)]
        out["tokens_mlp"] = [round(sum(col) / len(col), 3) for col in zip(*toks_mlp)]
        out["tokens"] = [int(t) if float(t).is_integer() else t for t in out["tokens"]]
        out["tokens_mlp"] = [int(t) if float(t).is_integer() else t for t in out["tokens_mlp"]]
    return out


TOKEN_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def token_distribution(toks: Sequence[Sequence[float]], toks_mlp: Sequence[Sequence[float]]) -> dict[str, Any]:
    """How per-image token counts spread (``toks[i][b]``: tokens image ``i`` has entering block ``b``):
    per block, mean, min, max and the :data:`TOKEN_QUANTILES`; and a histogram of the final count
    (tokens entering the last block's MLP: ``{count: images}``)."""
    def stats(col: Sequence[float]) -> dict[str, float]:
        out = {"mean": round(sum(col) / len(col), 3), "min": min(col), "max": max(col)}
        out.update({f"q{round(q * 100)}": _percentile(col, q) for q in TOKEN_QUANTILES})
        return {k: int(v) if float(v).is_integer() else v for k, v in out.items()}

    final = [int(t[-1]) for t in toks_mlp]
    return {"images": len(toks), "blocks": [stats(col) for col in zip(*toks)],
            "blocks_mlp": [stats(col) for col in zip(*toks_mlp)],
            "final_histogram": {str(n): final.count(n) for n in sorted(set(final))}}


# --------------------------------------------------------------------------- throughput

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_context(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r} (use fp32, fp16 or bf16)")
    if precision == "fp32":
        return contextlib.nullcontext(), None
    note = None
    if device.type == "cpu":
        flags = cpu_flags()
        if precision == "bf16" and not ({"avx512_bf16", "amx_bf16"} & flags):
            note = "bf16 emulated on this CPU (no avx512_bf16/amx_bf16)"
        if precision == "fp16" and not ({"avx512_fp16", "amx_fp16"} & flags):
            note = "fp16 emulated on this CPU (no avx512_fp16/amx_fp16)"
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision]), note


def available_memory_bytes(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimate_memory_bytes(model: nn.Module, batch_size: int, img_size: Optional[int] = None,
                          precision: str = "fp32") -> int:
    """A generous estimate of inference peak memory: weights plus the largest live activations.

    Per block a pre-norm ViT holds the residual stream, the normalised input, q/k/v and
    the MLP's hidden layer; unfused attention would add one N x N matrix per head.
    """
    from .backbones import backbone_of

    bytes_per = 2 if precision in ("fp16", "bf16") else 4
    params = sum(p.numel() for p in model.parameters()) * 4
    c, s = model_input(model)
    s = img_size or s
    try:
        act = backbone_of(model).activation_bytes(s, bytes_per)
    except UserError:  # an unknown family: ViT-B's figures at this size
        n = (s // 16) ** 2 + 1
        act = n * (6 * 768 + 2 * 3072) * bytes_per + 12 * n * n * 4
    per_image = act + c * s * s * 4
    return int(params + 2 * batch_size * per_image)


def check_batch_fits(model: nn.Module, batch_size: int, device: torch.device, precision: str = "fp32",
                     img_size: Optional[int] = None) -> None:
    """Refuse a batch that would not fit (on a machine without swap an OOM is an uncatchable kill)."""
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    avail = available_memory_bytes(device)
    if avail is None:
        return
    need = estimate_memory_bytes(model, batch_size, img_size, precision)
    budget = int(avail * 0.8)
    if need > budget:
        per = max(1, (need - sum(p.numel() for p in model.parameters()) * 4) // batch_size)
        fit = max(1, (budget - sum(p.numel() for p in model.parameters()) * 4) // per)
        fit = 2 ** int(math.log2(fit)) if fit >= 1 else 1
        raise UserError(f"batch size {batch_size} needs about {_bytes(need)} but only "
                        f"{_bytes(avail)} is free on {device.type}; try --batch-size {fit}")


def _bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _percentile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _prepare_timing(model: nn.Module, device, precision: str, threads: Optional[int], batch_size: int,
                    img_size: Optional[int]):
    dev = resolve_device(device) if isinstance(device, str) else device
    threads = threads or (torch.get_num_threads() if dev.type != "cpu" else default_threads())
    if threads < 1:
        raise UserError(f"threads must be at least 1, got {threads}")
    check_batch_fits(model, batch_size, dev, precision, img_size)
    ctx, note = precision_context(dev, precision)
    return dev, threads, ctx, note


def _timing_env(model: nn.Module, dev: torch.device, threads: int, compile, note: Optional[str]) -> dict:
    """What a timing records of where and how it ran (device, threads, attention path, compile mode)."""
    info = env_info(dev, threads)
    info["attention"] = attention_kernel(model)
    info["compile"] = compile
    if note:
        info["precision_note"] = note
    return info


def _runner(model: nn.Module, ctx):
    def run(inp):
        with ctx:
            return model(inp)
    return run


# --------------------------------------------------------------------------- compiled, GPU protocol

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(mode) -> Optional[str]:
    """A compile setting as recorded: None (eager) or one of :data:`COMPILE_MODES`
    (``True`` means ``"default"``); anything else is refused in one line."""
    if mode is None or mode is False or mode == "" or mode == "none":
        return None
    if mode is True:
        return "default"
    if mode not in COMPILE_MODES:
        raise UserError(f"unknown compile mode {mode!r} (use {', '.join(COMPILE_MODES)}, or false for eager)")
    return str(mode)


def compiled(model: nn.Module, mode: Optional[str]):
    """``model`` under ``torch.compile`` (``mode``; ``None``: the model itself, eager).

    Static shapes (``dynamic=False``): each batch size gets its own graph, as a deployed
    model at a fixed batch does.  The model itself is not changed.
    """
    if mode is None:
        return model
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)


def fresh_compile_state() -> None:
    """Forget earlier compilations before a compiled measurement: its ``compile_s`` is a whole
    compile, and a sweep's many models never reach dynamo's recompile limit (past which it
    would silently run eager)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # one graph per batch size and model
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))


def compile_stats() -> dict[str, int]:
    """Graph breaks and graphs compiled since :func:`fresh_compile_state` (0 breaks: one graph)."""
    from torch._dynamo.utils import counters

    return {"graph_breaks": int(sum(counters["graph_break"].values())),
            "graphs": int(counters["stats"].get("unique_graphs", 0))}


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
    from .backbones import backbone_of

    try:
        return backbone_of(model).convolutional
    except UserError:
        return any(isinstance(m, nn.Conv2d) for m in model.modules())


@contextlib.contextmanager
def cuda_timing_settings(dev: torch.device):
    """cuDNN autotuning (``cudnn.benchmark``) on while timing on CUDA, restored after; the
    timing's env records it (:func:`gpu_settings`).  Nothing changes on other devices."""
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


MAX_BATCH = 1024  # --batch-size max never goes past this


def max_batch_size(model: nn.Module, device: str | torch.device = "auto", precision: str = "fp32",
                   img_size: Optional[int] = None, cap: int = MAX_BATCH) -> int:
    """The largest power-of-two batch (at most ``cap``) that fits, as EViT's speed test and
    ToMe's benchmark pick it: on CUDA by running the model (eager, inference mode) at
    doubling batches until one runs out of memory; elsewhere by :func:`check_batch_fits`'s
    estimate (an out-of-memory on a machine without swap is an uncatchable kill)."""
    dev = resolve_device(device) if isinstance(device, str) else device
    ctx, _ = precision_context(dev, precision)

    def fits(b: int) -> bool:
        try:
            check_batch_fits(model, b, dev, precision, img_size)
        except UserError:
            return False
        if dev.type != "cuda":
            return True
        home = next(model.parameters()).device
        model.to(dev)
        try:
            with eval_mode(model), torch.inference_mode(), ctx:
                model(example_input(model, b, img_size, device=dev))
            torch.cuda.synchronize(dev)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.to(home)
            torch.cuda.empty_cache()

    if not fits(1):
        raise UserError(f"not even batch 1 fits on {dev.type}")
    b = 1
    while b * 2 <= cap and fits(b * 2):
        b *= 2
    return b


def _check_finite(out: torch.Tensor) -> None:
    if not torch.isfinite(out.float()).all():
        raise UserError("the model produced NaN or infinite logits; refusing to time it")


def _warm(run, x, seconds: float) -> None:
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        run(x)


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

    ``compile``: time ``torch.compile(model, mode=compile)`` instead (:func:`compiled`); the
    first, compiling call is timed on its own (``compile_s``; ``latency_compile_s`` for the
    batch-1 graph) and never enters the timed blocks.  ``fresh_compile=False`` (a retry of the
    same measurement) reuses what an earlier call compiled instead of compiling again.  On CUDA, ``cudnn.benchmark`` is on
    and a convolutional model runs ``channels_last`` (both recorded in ``env``).

    ``inputs``: the batch to time (``batch_size`` real images, for a method whose token count
    depends on the image) instead of the synthetic one; latency takes its first image.

    ``cuda_graphs``: time the eager forward captured as a CUDA graph once per static shape and
    replayed (:mod:`tokenbench.graphs`; CUDA only; the capture is reported apart, ``capture_s``).
    """
    compile = compile_mode(compile)
    dev = resolve_device(device) if isinstance(device, str) else device
    _check_graphs(cuda_graphs, compile, dev)
    with cuda_timing_settings(dev):
        return _throughput(model, batch_size, dev, precision, threads, min_run_time, warmup_s, latency,
                           latency_samples, img_size, max_spread, compile, fresh_compile, inputs, cuda_graphs)


def _check_graphs(cuda_graphs: bool, compile: Optional[str], dev: torch.device) -> None:
    if not cuda_graphs:
        return
    from .graphs import check_device

    check_device(dev)
    if compile:
        raise UserError("--cuda-graphs times the eager model; compiled, CUDA graphs are "
                        "--compile-mode reduce-overhead")


def _timed_runner(model: nn.Module, ctx, compile: Optional[str], cuda_graphs: bool, dev: torch.device):
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


def _throughput(model, batch_size, device, precision, threads, min_run_time, warmup_s, latency,
                latency_samples, img_size, max_spread, compile, fresh_compile, inputs=None,
                cuda_graphs=False) -> dict[str, Any]:
    from torch.utils import benchmark

    dev, threads, ctx, note = _prepare_timing(model, device, precision, threads, batch_size, img_size)
    params_dev = next(model.parameters()).device
    if params_dev != dev:
        model.to(dev)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    info = _timing_env(model, dev, threads, compile, note)
    if cuda_graphs:
        info["cuda_graphs"] = True
    res: dict[str, Any] = {}
    try:
        with eval_mode(model), torch.inference_mode(), device_context(dev), memory_format(model, dev) as fmt, \
                PeakMemory(dev) as mem, load_watch(info, threads):
            info["channels_last"] = fmt == torch.channels_last
            x = timing_input(model, batch_size, img_size, dev, inputs).contiguous(memory_format=fmt)
            if compile and fresh_compile:
                fresh_compile_state()
            run = _timed_runner(model, ctx, compile, cuda_graphs, dev)
            out, first_s = first_call_s(run, x, dev)
            if compile:
                res["compile_s"] = first_s
                res.update(compile_stats())
            if cuda_graphs:
                res["capture_s"] = first_s
            _check_finite(out)
            _warm(run, x, warmup_s)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            timer = benchmark.Timer(stmt="run(x)", globals={"run": run, "x": x}, num_threads=threads)
            m = timer.blocked_autorange(min_run_time=min_run_time)
            times = list(m.times)
            # blocked_autorange may return very few blocks for a slow model: take more.
            while len(times) < 5:
                times += list(timer.blocked_autorange(min_run_time=min_run_time / 2).times)
            rates = [batch_size / t for t in times]
            res.update({
                "img_per_s": statistics.median(rates),
                "img_per_s_q1": _percentile(rates, 0.25),
                "img_per_s_q3": _percentile(rates, 0.75),
                "trials": len(rates),
                "runs_per_trial": m.number_per_run,
            })
            iqr = res["img_per_s_q3"] - res["img_per_s_q1"]
            res["spread"] = iqr / res["img_per_s"] if res["img_per_s"] else float("nan")
            res["spread_flag"] = bool(res["spread"] > max_spread)
            if latency:
                x1 = x[:1].contiguous()
                t1 = benchmark.Timer(stmt="run(x)", globals={"run": run, "x": x1}, num_threads=threads)
                _, first1_s = first_call_s(run, x1, dev)  # compiled: batch 1 is a graph of its own
                if compile:
                    res["latency_compile_s"] = first1_s
                _warm(run, x1, min(warmup_s, 0.2))
                lat = []
                deadline = time.perf_counter() + max(1.0, min_run_time)
                while len(lat) < latency_samples and (len(lat) < 5 or time.perf_counter() < deadline):
                    lat.append(t1.timeit(1).mean * 1000.0)
                res["latency_ms_p50"] = _percentile(lat, 0.5)
                res["latency_ms_p90"] = _percentile(lat, 0.9)
                res["latency_samples"] = len(lat)
        res["peak_mem_mb"] = mem.mb()
        res["peak_mem_kind"] = mem.kind
    finally:
        torch.set_num_threads(prev_threads)
        if params_dev != dev:
            model.to(params_dev)
    res.update({"batch_size": batch_size, "device": dev.type, "precision": precision, "compile": compile,
                "env": info})
    if cuda_graphs:
        res["cuda_graphs"] = True
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

    ``compile``: both models are compiled the same way (:func:`compiled`), each one's
    compile time reported apart (``compile_s``, ``baseline_compile_s``), never timed;
    ``fresh_compile``, ``inputs`` (both models run on them) and ``cuda_graphs`` (both models
    replayed as CUDA graphs) as in :func:`throughput`.
    """
    compile = compile_mode(compile)
    dev = resolve_device(device) if isinstance(device, str) else device
    _check_graphs(cuda_graphs, compile, dev)
    with cuda_timing_settings(dev):
        return _speedup(model, baseline, batch_size, dev, precision, threads, min_run_time, rounds, warmup_s,
                        img_size, max_spread, compile, fresh_compile, inputs, cuda_graphs)


def _speedup(model, baseline, batch_size, device, precision, threads, min_run_time, rounds, warmup_s,
             img_size, max_spread, compile, fresh_compile, inputs=None, cuda_graphs=False) -> dict[str, Any]:
    from torch.utils import benchmark

    if rounds < 3:
        raise UserError(f"a paired timing needs at least 3 rounds, got {rounds}")
    dev, threads, ctx, note = _prepare_timing(model, device, precision, threads, batch_size, img_size)
    nets = (baseline, model)
    homes = [next(n.parameters()).device for n in nets]
    for n in nets:
        n.to(dev)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    info = _timing_env(model, dev, threads, compile, note)
    first_s = [0.0, 0.0]
    block_s = max(min_run_time / (2 * rounds), 1e-3)
    try:
        with eval_mode(baseline), eval_mode(model), torch.inference_mode(), device_context(dev), \
                memory_format(baseline, dev), memory_format(model, dev) as fmt, load_watch(info, threads):
            info["channels_last"] = fmt == torch.channels_last
            x = timing_input(model, batch_size, img_size, dev, inputs).contiguous(memory_format=fmt)
            if compile and fresh_compile:
                fresh_compile_state()
            runs = [_timed_runner(n, ctx, compile, cuda_graphs, dev) for n in nets]
            for i, run in enumerate(runs):
                out, first_s[i] = first_call_s(run, x, dev)
                _check_finite(out)
                _warm(run, x, warmup_s / 2)
            stats = compile_stats() if compile else {}
            timers = [benchmark.Timer(stmt="run(x)", globals={"run": r, "x": x}, num_threads=threads) for r in runs]
            # calls per block: what fills block_s, from the median of three calls, then corrected
            # once by a calibration block of that size (one slow or fast call misleads the first guess)
            numbers = []
            for t in timers:
                est = statistics.median(t.timeit(1).mean for _ in range(3))
                n = max(1, int(round(block_s / max(est, 1e-6))))
                per_call = t.timeit(n).mean
                numbers.append(max(1, int(round(block_s / max(per_call, 1e-6)))))
            per_image: list[list[float]] = [[], []]
            ratios = []
            for r in range(rounds):
                order = (0, 1) if r % 2 == 0 else (1, 0)
                got = [0.0, 0.0]
                for i in order:
                    got[i] = timers[i].timeit(numbers[i]).mean / batch_size
                    per_image[i].append(got[i])
                ratios.append(got[0] / got[1])
    finally:
        torch.set_num_threads(prev_threads)
        for n, home in zip(nets, homes):
            if home != dev:
                n.to(home)
    med = statistics.median(ratios)
    q1, q3 = _percentile(ratios, 0.25), _percentile(ratios, 0.75)
    res = {
        "speedup": med, "speedup_q1": q1, "speedup_q3": q3,
        "spread": (q3 - q1) / med if med else float("nan"),
        "rounds": rounds, "calls_per_block": {"baseline": numbers[0], "method": numbers[1]},
        "img_per_s": 1.0 / statistics.median(per_image[1]),
        "baseline_img_per_s": 1.0 / statistics.median(per_image[0]),
    }
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


# --------------------------------------------------------------------------- accuracy

def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for k successes in n, as fractions."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict[str, Any]:
    """Exact McNemar test (two-sided binomial on the discordant pairs)."""
    if len(a_correct) != len(b_correct):
        raise ValueError("paired test needs the same images")
    b = sum(1 for x, y in zip(a_correct, b_correct) if x and not y)  # a right, b wrong
    c = sum(1 for x, y in zip(a_correct, b_correct) if y and not x)  # b right, a wrong
    n = b + c
    if n == 0:
        p = 1.0
    else:
        from scipy.stats import binomtest

        p = float(binomtest(min(b, c), n, 0.5).pvalue)
    return {"only_a": b, "only_b": c, "p_value": p}


def evaluate(model: nn.Module, dataset, batch_size: int = 256, device: str | torch.device = "cpu",
             precision: str = "fp32", progress: bool = False, num_workers: int = 0,
             desc: str = "eval") -> dict[str, Any]:
    """Top-1/top-5 accuracy in percent with a Wilson 95% interval and per-image correctness.

    Under torchrun each process evaluates its shard of whole batches and the per-image
    results are gathered back in dataset order: the same dict as one process returns.
    """
    from torch.utils.data import DataLoader, Subset

    from . import distributed
    from .backbones import image_ids

    dev = resolve_device(device) if isinstance(device, str) else device
    ctx, note = precision_context(dev, precision)
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    # Global indices (into ``dataset``) of the images this process evaluates, in order.
    mine = distributed.shard(len(dataset), batch_size, distributed.rank(), distributed.world_size())
    # The largest batch the loader will really make: a huge --batch-size on a small set is harmless.
    check_batch_fits(model, min(batch_size, max(1, len(mine))), dev, precision)
    params_dev = next(model.parameters()).device
    if params_dev != dev:
        model.to(dev)
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    seen: list[int] = []  # global indices of the images evaluated so far, in order
    correct1: list[int] = []
    correct5: list[int] = []
    preds: list[int] = []
    prog = None
    if progress:
        from rich.progress import Progress

        prog = Progress(transient=True)
        prog.start()
        task = prog.add_task(desc, total=len(mine))
    try:
        with eval_mode(model), torch.inference_mode():
            for x, y in loader:
                # Each image's global index in the evaluated set (the same under torchrun as in one
                # process): random choices follow the image, not its place in a batch or a shard.
                batch_ids = list(mine[len(seen):len(seen) + len(y)])
                x, y = x.to(dev), torch.as_tensor(y).to(dev)
                ids = torch.tensor(batch_ids, device=dev, dtype=torch.long)
                with ctx, image_ids(model, ids):
                    logits = model(x)
                logits = logits.float()
                if not torch.isfinite(logits).all():
                    raise UserError("the model produced NaN or infinite logits; accuracy would be meaningless")
                k = min(5, logits.shape[-1])
                top = logits.topk(k, dim=-1).indices
                seen += batch_ids
                correct1 += (top[:, 0] == y).int().tolist()
                preds += top[:, 0].tolist()
                correct5 += (top == y[:, None]).any(-1).int().tolist()
                if prog:
                    prog.update(task, advance=len(y))
    finally:
        if prog:
            prog.stop()
        if params_dev != dev:
            model.to(params_dev)
    if distributed.active():
        seen, correct1, correct5, preds = (distributed.gather_in_rank_order(v)
                                           for v in (seen, correct1, correct5, preds))
        if seen != list(range(len(dataset))):
            raise RuntimeError("the shards did not cover the evaluation set exactly once, in order")
    n = len(seen)
    k1 = sum(correct1)
    lo, hi = wilson_interval(k1, n)
    out = {
        "top1": 100.0 * k1 / n if n else float("nan"),
        "top1_ci95": [100.0 * lo, 100.0 * hi],
        "top5": 100.0 * sum(correct5) / n if n else float("nan"),
        "n": n,
        "correct": "".join("1" if c else "0" for c in correct1),
        "predictions": preds,
    }
    if note:
        out["precision_note"] = note
    return out
