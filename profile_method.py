#!/usr/bin/env python
"""Where a method's time goes: the dense model and each method setting, profiled side by side.

``bench.py`` says *whether* an adapter loses its FLOPs saving to overhead; this says *where*.
For every setting: milliseconds per forward (device time, and the host time spent issuing
it: when the host time is the larger, the device waits for launches), then the operators
(CPU) or kernels (CUDA) that take the most time per forward, from ``torch.profiler``.

    python profile_method.py deit_small_patch16_224 tome:'{"r":13}' tome:'{"r":13,"prop_attn":false}'
    python profile_method.py deit_small_patch16_224 tome evit --device cuda --precision fp16 --batch-size 256

A setting is ``METHOD`` or ``METHOD:JSON`` (its parameters); the dense model comes first
on its own.  ``--compile default`` profiles the compiled models (their kernels are inductor's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}


def sdpa_context(name):
    """``torch.nn.attention.sdpa_kernel`` restricted to one backend (``None``: no restriction)."""
    import contextlib

    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[name]))


def parse_setting(text: str) -> tuple[str, dict]:
    """``tome`` or ``tome:{"r":13}`` -> (method, parameters)."""
    from tokenbench.errors import UserError

    method, _, params = text.partition(":")
    if not params:
        return method, {}
    try:
        p = json.loads(params)
    except json.JSONDecodeError:
        raise UserError(f"setting {text!r}: the parameters after ':' must be a JSON object, e.g. tome:{{\"r\":13}}")
    if not isinstance(p, dict):
        raise UserError(f"setting {text!r}: the parameters after ':' must be a JSON object")
    return method, p


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def forward_ms(run, x, dev, calls: int) -> float:
    """Median over 5 blocks of ``calls`` forwards: wall milliseconds per forward."""
    times = []
    for _ in range(5):
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(calls):
            run(x)
        _sync(dev)
        times.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(times)


def profile(run, x, dev, steps: int, top: int) -> tuple[float, float, list, list]:
    """(device ms per forward, host ms per forward, the top kernels (CUDA) or operators (CPU),
    the top operators by host time (CUDA; empty on the CPU, where they are the first list)),
    each row (name, calls per forward, ms per forward)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(steps):
            run(x)
        _sync(dev)
    events = prof.key_averages()
    per_forward = lambda rows: [(n, round(c / steps), t / steps / 1e3) for n, c, t in rows[:top]]
    host_rows = sorted(((e.key, e.count, e.self_cpu_time_total) for e in events), key=lambda r: -r[2])
    host = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    if dev.type != "cuda":
        return host, host, per_forward(host_rows), []
    dev_time = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
    # the kernels themselves (an operator's own device time would count its kernels twice)
    kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA") and dev_time(e) > 0]
    device = sum(dev_time(e) for e in kernels) / steps / 1e3
    rows = sorted(((e.key, e.count, dev_time(e)) for e in kernels), key=lambda r: -r[2])
    return device, host, per_forward(rows), per_forward(host_rows)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="timm model name, or default (the embedded model)")
    ap.add_argument("settings", nargs="*", default=["tome"], help="METHOD or METHOD:JSON parameters")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", help="fp32, fp16 or bf16 (autocast)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--compile", default="none", help="torch.compile mode, or none (eager)")
    ap.add_argument("--sdpa", default=None, choices=sorted(SDPA_BACKENDS),
                    help="force this fused-attention kernel (default: PyTorch's choice)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5, help="forwards profiled")
    ap.add_argument("--top", type=int, default=12, help="operators / kernels listed per setting")
    ap.add_argument("--out", default=None, help="also write the report to this markdown file")
    return ap


def header(args, dev, threads: int, mode) -> list[str]:
    """The report's title and the line saying what was profiled, how, and on what."""
    import torch

    from tokenbench.measure import env
    from tokenbench.store import code_line, git_commit

    what = "kernels (device time)" if dev.type == "cuda" else "operators (self CPU time)"
    return [f"# Profile: {args.model}, batch {args.batch_size}, {args.precision}, "
            f"{'compiled ' + mode if mode else 'eager'}{', sdpa ' + args.sdpa if args.sdpa else ''}, {env.env_info(dev, threads).get('device_name', dev.type)}",
            "", f"torch {torch.__version__}; {code_line(git_commit(changed=True))}; "
            f"load average {os.getloadavg()[0]:.2f}; top {args.top} {what} "
            f"per forward, over {args.steps} profiled forwards. The settings are timed one after another, "
            "not interleaved: their speed and efficiency move with the machine's speed; for speedups, "
            "use bench.py (paired).", ""]


def setting_section(label: str, wall: float, device: float, host: float, top, top_host, cuda: bool) -> list[str]:
    """One setting's lines: its times, then its top kernels or operators (and by host time on CUDA)."""
    times = (f"device {device:.3f} ms, host {host:.3f} ms" if cuda else f"operators' own time {host:.3f} ms")
    lines = [f"## {label}", "", f"{wall:.3f} ms per forward (wall); {times}"
             + ("  (host-bound: the device waits for launches)" if cuda and host > device else ""),
             "", "| ms / forward | share | calls | name |", "|---|---|---|---|"]
    for name, count, ms in top:
        lines.append(f"| {ms:.3f} | {ms / device:.0%} | {count} | `{name[:90]}` |" if device else
                     f"| {ms:.3f} | - | {count} | `{name[:90]}` |")
    if top_host:
        lines += ["", "Operators by host time (launching their kernels included):", "",
                  "| host ms / forward | share | calls | name |", "|---|---|---|---|"]
        lines += [f"| {ms:.3f} | {ms / host:.0%} | {count} | `{name[:90]}` |" for name, count, ms in top_host]
    return lines + [""]


def main(argv=None) -> int:
    args = parser().parse_args(argv)

    import torch

    from tokenbench.api import load
    from tokenbench.measure import compilation, env, flop_count, forward
    from tokenbench.errors import UserError
    from tokenbench.registry import get_method

    dev = env.resolve_device(args.device)
    if args.batch_size < 1 or args.steps < 1 or args.top < 1:
        raise UserError("--batch-size, --steps and --top must be at least 1")
    threads = args.threads or (env.default_threads() if dev.type == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    mode = compilation.compile_mode(args.compile)
    ctx, _note = forward.precision_context(dev, args.precision)
    settings = [("none", {})] + [parse_setting(s) for s in args.settings]
    for method, params in settings:  # an unknown method or parameter: one line, before any work
        get_method(method).validate(params)
    lines = header(args, dev, threads, mode)
    summary = []
    dense_ms = None
    cuda = dev.type == "cuda"
    for method, params in settings:
        label = method + ("" if not params else " " + json.dumps(params, separators=(",", ":")))
        net, _prov = load(args.model, method, params)
        gflops = flop_count.flops(net)["gflops"]
        try:
            wall, device, host, top, top_host = measure_setting(net, args, dev, ctx, mode)
        except RuntimeError as e:  # e.g. --sdpa flash on a method that needs an attention mask
            if method == "none":
                raise
            lines += [f"## {label}", "", f"failed: {str(e).splitlines()[0]}", ""]
            print(f"{label:40s} failed: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
            continue
        finally:
            net.cpu()
        dense_ms = wall if method == "none" else dense_ms
        summary.append((label, gflops, wall, device, host))
        lines += setting_section(label, wall, device, host, top, top_host, cuda)
        print(f"{label:40s} {gflops:7.3f} GFLOPs  {wall:8.3f} ms/forward", file=sys.stderr, flush=True)
        if args.out:  # after every setting: a run stopped part-way keeps what it profiled
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(render(lines, summary, dense_ms, cuda))
    report = render(lines, summary, dense_ms, cuda)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


def measure_setting(net, args, dev, ctx, mode):
    """(wall ms, device ms, host ms per forward, top operators) of one loaded model."""
    import torch

    from tokenbench.measure import compilation, forward, timed_forward

    net.to(dev)
    with forward.eval_mode(net), torch.inference_mode(), timed_forward.cuda_timing_settings(dev), \
            timed_forward.memory_format(net, dev) as fmt:
        x = forward.example_input(net, args.batch_size, device=dev).contiguous(memory_format=fmt)
        if mode:
            compilation.fresh_compile_state()
            timed_forward.prime(net, x, ctx)  # one compile, not two (see prime)
        model = compilation.compiled(net, mode)

        def run(inp):
            with ctx, sdpa_context(args.sdpa):
                return model(inp)

        for _ in range(3):  # compile, cuDNN autotuning, allocator warm-up
            run(x)
        _sync(dev)
        t0 = time.perf_counter()
        run(x)
        _sync(dev)
        calls = max(1, int(0.2 / max(time.perf_counter() - t0, 1e-6)))
        wall = forward_ms(run, x, dev, calls)
        return (wall,) + profile(run, x, dev, args.steps, args.top)


def render(lines: list[str], summary: list[tuple], dense_ms: float, cuda: bool) -> str:
    """The report: heading, the summary table (speed and efficiency over dense; on CUDA the device
    and host time per forward), then each setting's operators."""
    g0 = summary[0][1]
    extra = " device ms | host ms |" if cuda else ""
    table = ["| setting | GFLOPs | FLOPs x | ms / forward | speed x | efficiency |" + extra,
             "|---|---|---|---|---|---|" + ("---|---|" if cuda else "")]
    for label, g, wall, device, host in summary:
        fx, sx = g0 / g, dense_ms / wall
        table.append(f"| {label} | {g:.3f} | {fx:.2f} | {wall:.3f} | {sx:.2f} | {sx / fx:.2f} |"
                     + (f" {device:.3f} | {host:.3f} |" if cuda else ""))
    return "\n".join(lines[:4] + table + [""] + lines[4:]) + "\n"


def cli(argv=None) -> int:
    """:func:`main`, with bad input as one line and exit status 2 (``--debug``: the traceback)."""
    from tokenbench.cli.main import script_main

    return script_main(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
