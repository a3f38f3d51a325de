"""``tokenbench throughput``: images per second, batch-1 latency and peak memory of one setting."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UserError
from .common import (CKPT_OPT, JSON_OPT, METHOD_OPT, MODEL_ARG, PRETRAINED_OPT, RESULTS_OPT, SET_OPT,
                     check_data_dir, open_store, out_json, public_record, reused_text, run_spec)


def register(app: typer.Typer) -> None:
    app.command("throughput")(throughput_cmd)


def _parse_batch_sizes(batch_size: str) -> list:
    """Batch sizes: integers, or ``max`` (the largest power of two that fits)."""
    try:
        out = [b if b == "max" else int(b) for b in str(batch_size).replace(" ", "").strip("[]").split(",") if b]
    except ValueError:
        raise UserError(f"--batch-size takes an integer, max, or a comma-separated list, got {batch_size!r}") from None
    if not out or any(b != "max" and b < 1 for b in out):
        raise UserError(f"--batch-size must be positive, got {batch_size!r}")
    return out


def throughput_cmd(model: str = MODEL_ARG, method: str = METHOD_OPT, set_: Optional[List[str]] = SET_OPT,
                   batch_size: str = typer.Option("64", "--batch-size", "-b",
                                                  help="Batch size, or a list: 1,16,64; max: the largest power "
                                                       "of two that fits."),
                   device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
                   precision: str = typer.Option("fp32", "--precision", help="fp32, fp16 or bf16 (autocast)."),
                   threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: the CPUs this process may use)."),
                   min_run_time: float = typer.Option(2.0, "--min-run-time", help="Seconds of timing per batch size."),
                   compile_: bool = typer.Option(False, "--compile", help="Time the model under torch.compile "
                                                 "(compile time reported apart, as compile_s)."),
                   compile_mode: Optional[str] = typer.Option(None, "--compile-mode",
                                                              help="torch.compile mode (implies --compile): default, "
                                                                   "reduce-overhead, max-autotune, "
                                                                   "max-autotune-no-cudagraphs."),
                   cuda_graphs: bool = typer.Option(False, "--cuda-graphs",
                                                    help="CUDA only: time the eager model captured as a CUDA "
                                                         "graph once per batch shape and replayed (no launch "
                                                         "overhead, no compiling)."),
                   img_size: Optional[int] = typer.Option(None, "--img-size"),
                   data: Optional[str] = typer.Option(None, "--data", help="Time on a batch of real images "
                                                      "(fashion-mnist, imagenet, folder or synthetic: the seeded "
                                                      "subset of --batch-size images), for methods whose token "
                                                      "count depends on the image."),
                   data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where the dataset lives."),
                   seed: int = typer.Option(0, "--seed", help="Seed of the --data subset."),
                   pretrained: bool = PRETRAINED_OPT, checkpoint: Optional[Path] = CKPT_OPT,
                   results: Optional[Path] = RESULTS_OPT, json_: bool = JSON_OPT):
    """Images per second (median and quartiles), batch-1 latency (p50, p90) and peak memory."""
    from .. import checks
    from ..measure.compilation import compile_mode as check_compile_mode
    from ..measure.env import resolve_device
    from ..measure.memory import max_batch_size
    from ..runner import Loaded, Settings, measure_run

    sizes = _parse_batch_sizes(batch_size)
    mode = check_compile_mode(compile_mode or "default") if compile_ or compile_mode else None
    dev = resolve_device(device)
    if cuda_graphs:
        from ..measure.graphs import check_device

        check_device(dev)
        if mode:
            raise UserError("--cuda-graphs times the eager model; compiled, CUDA graphs are "
                            "--compile-mode reduce-overhead")
    if precision not in ("fp32", "fp16", "bf16"):
        raise UserError(f"unknown precision {precision!r} (use fp32, fp16 or bf16)")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    checks.min_run_time(min_run_time)
    on_data = {}
    if data is not None:
        from ..data import DATASETS
        from ..errors import did_you_mean

        if data not in DATASETS:
            raise UserError(f"unknown dataset {data!r}{did_you_mean(data, DATASETS)}; "
                            f"choose from {', '.join(DATASETS)}")
        check_data_dir(data, data_dir)
        on_data = dict(data=data, data_dir=str(data_dir) if data_dir else None, data_seed=seed,
                       split="val" if data in ("imagenet", "folder") else "test", timing_on_data=True)
    elif data_dir is not None:
        raise UserError("--data-dir times real images: pass --data too")
    spec = run_spec(model, method, set_, pretrained, checkpoint, img_size)
    store = open_store(results)
    loaded = Loaded(spec)
    pubs = []
    for i, b in enumerate(sizes):
        from_max = b == "max"
        if from_max:
            b = max_batch_size(loaded.net, device, precision, img_size)
            sizes[i] = b
        s = Settings(batch_size=b, device=device, precision=precision, threads=threads, min_run_time=min_run_time,
                     latency=(i == 0), compile=mode, cuda_graphs=cuda_graphs, batch_from_max=from_max, **on_data)
        rec, reused = measure_run("throughput", spec, s, store, loaded=loaded)
        pubs.append(public_record(rec, reused, results))
    if json_:
        if len(pubs) == 1:
            out_json(pubs[0])
        else:
            first = pubs[0]
            out_json({"model": first["model"], "method": first["method"], "params": first["params"],
                      "batch_sizes": sizes, "results": pubs, "env": first["env"]})
        return
    for p in pubs:
        line = (f"batch {p['batch_size']:>4}: {p['img_per_s']:.1f} img/s "
                f"[{p['img_per_s_q1']:.1f}, {p['img_per_s_q3']:.1f}] on {p['device']} ({p['precision']}, "
                f"{p['env']['threads']} threads)")
        if p.get("compile"):
            line += f", compiled ({p['compile']}, {p['compile_s']:.1f} s to compile)" if "compile_s" in p \
                else f", compiled ({p['compile']})"
        if p.get("cuda_graphs"):
            line += f", CUDA graphs ({p['capture_s']:.1f} s to capture)" if "capture_s" in p else ", CUDA graphs"
        if "latency_ms_p50" in p:
            line += f"; batch-1 latency p50 {p['latency_ms_p50']:.2f} ms, p90 {p['latency_ms_p90']:.2f} ms"
        inp = p.get("input") or {}
        if inp.get("source") == "data":
            line += f"; on {inp['images']} images of {inp['data']}"
        typer.echo(line + reused_text(p))
        for w in p.get("warnings", []):
            typer.echo(f"warning: {w}", err=True)
