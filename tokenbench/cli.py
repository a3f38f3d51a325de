"""The ``tokenbench`` command line: parse, call the library, print.

Errors in what the user asked for are one line on stderr and exit code 2; ``--debug``
shows the full traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer

from .errors import UserError, user_message

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  help="tokenbench: FLOPs, throughput and accuracy of token reduction in vision transformers.")
STATE = {"debug": False}


def out_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, default=_json_default))


def _json_default(o):
    import math

    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def err(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)


def console():
    from rich.console import Console

    return Console(stderr=False, width=None if sys.stdout.isatty() else 140)


@app.callback(invoke_without_command=True)
def main_callback(ctx: typer.Context,
                  debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    STATE["debug"] = STATE["debug"] or debug or bool(os.environ.get("TOKENBENCH_DEBUG"))
    from .distributed import init_from_env

    init_from_env()  # under torchrun: join its process group (a no-op otherwise)
    if ctx.invoked_subcommand is None:
        # `tokenbench` alone runs the default sweep, like `tokenbench run`.
        run_cmd = ctx.command.get_command(ctx, "run")
        if run_cmd is None:
            typer.echo(ctx.get_help())
            raise typer.Exit(0)
        ctx.invoke(run_cmd.callback, **{p.name: p.default for p in run_cmd.params})


# --------------------------------------------------------------------------- shared options

MODEL_ARG = typer.Argument(..., help="A timm model name, or `default` for the embedded Fashion-MNIST ViT.")
METHOD_OPT = typer.Option("none", "--method", "-m", help="Token-reduction method (see `tokenbench list`).")
SET_OPT = typer.Option(None, "--set", "-s", help="Method parameter KEY=VALUE (JSON values: r=[8,8,4]); repeatable.")
PRETRAINED_OPT = typer.Option(False, "--pretrained", help="timm's pretrained weights (needs a network).")
CKPT_OPT = typer.Option(None, "--checkpoint", "-c", help="Load weights from this file (after the method is applied).")
JSON_OPT = typer.Option(False, "--json", help="Print exactly one JSON object on stdout.")
RESULTS_OPT = typer.Option(None, "--results", help="Record the measurement in this results directory (reused if there).")


def _spec(model: str, method: str, sets: Optional[List[str]], pretrained: bool, checkpoint: Optional[Path],
          img_size: Optional[int]) -> dict:
    from .checks import unique_set_keys
    from .registry import get_method, parse_set
    from .runner import spec_dict

    unique_set_keys(sets)
    params = parse_set(sets or [])
    cls = get_method(method)
    params = cls.validate(params)
    if img_size is not None and img_size <= 0:
        raise UserError(f"--img-size must be positive, got {img_size}")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise UserError(f"checkpoint {checkpoint} does not exist")
    from .models_seg_timm import checkpoint_arch

    if checkpoint is not None and checkpoint_arch(checkpoint) is not None:
        raise UserError(f"{checkpoint} holds a dense (segmentation) model: measure it with `tokenbench eval {model} "
                        f"--checkpoint {checkpoint} --data DATA` on a dense dataset")
    return spec_dict(model, method, params, pretrained, str(checkpoint) if checkpoint else None, img_size)


def _check_data_dir(data: str, data_dir: Optional[Path]) -> None:
    """A missing or unreadable --data-dir, in one line, before anything slow runs."""
    from .data import require_dir

    if data_dir is not None:
        require_dir(data_dir)
    elif data in ("imagenet", "folder"):
        raise UserError(f"--data-dir is required for --data {data}")


def _store(results: Optional[Path]):
    if results is None:
        return None
    from .store import Store

    s = Store(results)
    s.ensure_writable()
    return s


def _public(rec: dict, reused: bool = False, results: Optional[Path] = None) -> dict:
    """A record as the commands print it; ``recorded_in``: the results directory that keeps it
    (None: not kept, pass ``--results``), ``reused``: it was read from there, not measured."""
    m = {k: v for k, v in rec["metrics"].items() if k not in ("correct", "predictions")}
    spec = rec["spec"]
    return {"model": spec["model"], "method": spec["method"], "params": spec["params"], **m,
            "weights": rec.get("weights"), "learned_parts": spec.get("learned_parts"), "env": rec["env"],
            "key": rec["key"], "reused": bool(reused), "recorded_in": None if results is None else str(results)}


def _reused_text(pub: dict) -> str:
    """`` (reused from DIR)`` for a record read from the store, else nothing."""
    return f" (reused from {pub['recorded_in']})" if pub.get("reused") else ""


# --------------------------------------------------------------------------- commands

@app.command("flops")
def flops_cmd(model: str = MODEL_ARG, method: str = METHOD_OPT, set_: Optional[List[str]] = SET_OPT,
              img_size: Optional[int] = typer.Option(None, "--img-size", help="Input resolution (default: the model's)."),
              data: Optional[str] = typer.Option(None, "--data", help="Count on real images (fashion-mnist, "
                                                 "imagenet, folder or synthetic): the mean and spread per image, "
                                                 "for methods whose token count depends on the image."),
              data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where the dataset lives."),
              limit: Optional[int] = typer.Option(None, "--limit", help="Images counted with --data: a seeded, "
                                                  "class-stratified subset (default 64)."),
              seed: int = typer.Option(0, "--seed", help="Seed of the --limit subset."),
              pretrained: bool = PRETRAINED_OPT, checkpoint: Optional[Path] = CKPT_OPT,
              results: Optional[Path] = RESULTS_OPT, json_: bool = JSON_OPT):
    """GFLOPs per image (fvcore, multiply-add = 1 FLOP), parameters and tokens per block."""
    from .runner import Settings, measure_run

    settings = Settings()
    if data is not None:
        from .data import DATASETS
        from .errors import did_you_mean

        if data not in DATASETS:
            raise UserError(f"unknown dataset {data!r}{did_you_mean(data, DATASETS)}; "
                            f"choose from {', '.join(DATASETS)}")
        if limit is not None and limit <= 0:
            raise UserError(f"--limit must be positive, got {limit}")
        _check_data_dir(data, data_dir)
        settings = Settings(data=data, data_dir=str(data_dir) if data_dir else None,
                            split="val" if data in ("imagenet", "folder") else "test", limit=limit, data_seed=seed,
                            flops_on_data=True)
    elif limit is not None or data_dir is not None:
        raise UserError("--limit and --data-dir count real images: pass --data too")
    spec = _spec(model, method, set_, pretrained, checkpoint, img_size)
    rec, reused = measure_run("flops", spec, settings, _store(results),
                              progress=settings.flops_on_data and sys.stderr.isatty())
    pub = _public(rec, reused, results)
    if json_:
        out_json(pub)
        return
    typer.echo(f"{model} + {method} {json.dumps(spec['params'])}: {pub['gflops']:.3f} GFLOPs, "
               f"{pub['params_m']:.2f} M params{_reused_text(pub)}")
    spread = pub.get("gflops_per_image")
    if spread:
        typer.echo(f"per image ({pub['flops_images']} images of {data}): mean {spread['mean']:.4f}, "
                   f"std {spread['std']:.4f}, min {spread['min']:.4f}, max {spread['max']:.4f} GFLOPs")
    typer.echo(f"tokens per block:     {pub.get('tokens')}")
    typer.echo(f"tokens entering MLP:  {pub.get('tokens_mlp')}")
    dist = pub.get("tokens_per_image")
    if dist:
        for name, rows in (("block", dist["blocks"]), ("MLP", dist["blocks_mlp"])):
            typer.echo(f"tokens per image entering each {name} (min / median / max): "
                       + ", ".join(f"{r['min']}/{r['q50']}/{r['max']}" for r in rows))
        typer.echo("final token count (tokens: images): "
                   + ", ".join(f"{n}: {k}" for n, k in dist["final_histogram"].items()))
    for w in pub.get("warnings", []):
        typer.echo(f"warning: {w}", err=True)


def _parse_batch_sizes(batch_size: str) -> list:
    """Batch sizes: integers, or ``max`` (the largest power of two that fits)."""
    try:
        out = [b if b == "max" else int(b) for b in str(batch_size).replace(" ", "").strip("[]").split(",") if b]
    except ValueError:
        raise UserError(f"--batch-size takes an integer, max, or a comma-separated list, got {batch_size!r}") from None
    if not out or any(b != "max" and b < 1 for b in out):
        raise UserError(f"--batch-size must be positive, got {batch_size!r}")
    return out


@app.command("throughput")
def throughput_cmd(model: str = MODEL_ARG, method: str = METHOD_OPT, set_: Optional[List[str]] = SET_OPT,
                   batch_size: str = typer.Option("64", "--batch-size", "-b",
                                                  help="Batch size, or a list: 1,16,64; max: the largest power "
                                                       "of two that fits."),
                   device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
                   precision: str = typer.Option("fp32", "--precision", help="fp32, fp16 or bf16 (autocast)."),
                   threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: all)."),
                   min_run_time: float = typer.Option(2.0, "--min-run-time", help="Seconds of timing per batch size."),
                   compile_: bool = typer.Option(False, "--compile", help="Time the model under torch.compile "
                                                 "(compile time reported apart, as compile_s)."),
                   compile_mode: str = typer.Option("default", "--compile-mode",
                                                    help="torch.compile mode with --compile: default, "
                                                         "reduce-overhead, max-autotune, max-autotune-no-cudagraphs."),
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
    from . import checks
    from .measure import compile_mode as check_compile_mode, max_batch_size, resolve_device
    from .runner import Loaded, Settings, measure_run

    sizes = _parse_batch_sizes(batch_size)
    mode = check_compile_mode(compile_mode) if compile_ else None
    dev = resolve_device(device)
    if cuda_graphs:
        from .graphs import check_device

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
        from .data import DATASETS
        from .errors import did_you_mean

        if data not in DATASETS:
            raise UserError(f"unknown dataset {data!r}{did_you_mean(data, DATASETS)}; "
                            f"choose from {', '.join(DATASETS)}")
        _check_data_dir(data, data_dir)
        on_data = dict(data=data, data_dir=str(data_dir) if data_dir else None, data_seed=seed,
                       split="val" if data in ("imagenet", "folder") else "test", timing_on_data=True)
    elif data_dir is not None:
        raise UserError("--data-dir times real images: pass --data too")
    spec = _spec(model, method, set_, pretrained, checkpoint, img_size)
    store = _store(results)
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
        pubs.append(_public(rec, reused, results))
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
        typer.echo(line + _reused_text(p))
        for w in p.get("warnings", []):
            typer.echo(f"warning: {w}", err=True)


@app.command("eval")
def eval_cmd(model: str = MODEL_ARG, method: str = METHOD_OPT, set_: Optional[List[str]] = SET_OPT,
             data: str = typer.Option(..., "--data", help="fashion-mnist, imagenet, folder or synthetic; dense: "
                                      "fashion-mnist-scenes, voc or ade20k (with a dense model such as default-seg, or "
                                      "a --checkpoint trained with --task segmentation)."),
             data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where the dataset lives."),
             split: Optional[str] = typer.Option(None, "--split", help="train, val or test (default: test for "
                                                 "fashion-mnist and synthetic, val for image folders). "
                                                 "Fashion-MNIST's val: 5,000 train images held out (500 per "
                                                 "class, seed 0), not trained on; its train: the other 55,000."),
             limit: Optional[int] = typer.Option(None, "--limit", help="A seeded, class-stratified subset of N images."),
             seed: int = typer.Option(0, "--seed", help="Seed of the --limit subset."),
             batch_size: int = typer.Option(256, "--batch-size", "-b"),
             device: str = typer.Option("auto", "--device"),
             precision: str = typer.Option("fp32", "--precision"),
             pretrained: bool = PRETRAINED_OPT, checkpoint: Optional[Path] = CKPT_OPT,
             results: Optional[Path] = RESULTS_OPT, json_: bool = JSON_OPT):
    """Top-1 and top-5 accuracy with a 95% (Wilson) interval; on a dense dataset (fashion-mnist-scenes,
    voc) mIoU with a 95% bootstrap interval, pixel accuracy and per-class IoU."""
    from .cli_dense import eval_dense, wants_dense
    from .data import DATASETS
    from .errors import did_you_mean
    from .measure import resolve_device
    from .runner import Settings, measure_run

    if wants_dense(model, data, checkpoint=checkpoint):
        pub, line = eval_dense(model, method, set_, data, data_dir, split, limit, seed, batch_size, device,
                               precision, checkpoint, results, json_, pretrained)
        for w in pub.get("warnings", []):
            typer.echo(f"warning: {w}", err=True)
        return out_json(pub) if json_ else typer.echo(line)
    resolve_device(device)
    if data not in DATASETS:
        raise UserError(f"unknown dataset {data!r}{did_you_mean(data, DATASETS)}; choose from {', '.join(DATASETS)}")
    split = split or ("val" if data in ("imagenet", "folder") else "test")
    from .checks import eval_options

    eval_options(split, precision, limit, batch_size, did_you_mean(split, ("val", "test", "train")))
    _check_data_dir(data, data_dir)  # cheap, before the model (and any download of its weights)
    spec = _spec(model, method, set_, pretrained, checkpoint, None)
    s = Settings(device=device, precision=precision, data=data, data_dir=str(data_dir) if data_dir else None,
                 split=split, limit=limit, data_seed=seed, eval_batch_size=batch_size)
    rec, reused = measure_run("accuracy", spec, s, _store(results), progress=not json_ and sys.stderr.isatty())
    pub = _public(rec, reused, results)
    for w in pub.get("warnings", []):
        typer.echo(f"warning: {w}", err=True)
    if json_:
        out_json(pub)
        return
    lo, hi = pub["top1_ci95"]
    typer.echo(f"{model} + {method} on {_data_text(pub.get('data') or {}, data, split)} ({pub['n']} images): "
               f"top-1 {pub['top1']:.2f}% [95% CI {lo:.2f}, {hi:.2f}], top-5 {pub['top5']:.2f}%{_reused_text(pub)}")


def _data_text(d: dict, data: str, split: str) -> str:
    """Which images were read: the dataset and split, or the image folder and its layout."""
    if d.get("layout") == "split":
        return f"{data} {d['source']} (split {split})"
    if d.get("layout") == "flat":
        return f"{data} {d['source']} (its class folders; no train/val/test split folders, --split not used)"
    if d.get("carved") and split != "test":
        return f"{data} {split} ({d['carved']})"
    return f"{data} {split}"


@app.command("train-base")
def train_base_cmd(model: str = typer.Option("default", "--model",
                                              help="The embedded model to train: default (ViT), default-small "
                                                   "(its smaller dense sibling) or default-convnext."),
                   out: Optional[Path] = typer.Option(None, "--out",
                                                      help="Run directory (resumable; never the committed results/"
                                                           "embedded*; default runs/embedded or "
                                                           "runs/embedded-convnext)."),
                   data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
                   epochs: Optional[float] = typer.Option(None, "--epochs", help="Override the recipe's epochs."),
                   seed: int = typer.Option(0, "--seed"),
                   max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N more steps "
                                                       "(rerun to continue: each run goes N further)."),
                   threads: Optional[int] = typer.Option(None, "--threads"),
                   reschedule: bool = typer.Option(False, "--reschedule",
                                                   help="Resume with a different --epochs (recorded in config.json)."),
                   force: bool = typer.Option(False, "--force", help="Train again from scratch over a finished run."),
                   json_: bool = JSON_OPT):
    """Train an embedded model from scratch on Fashion-MNIST (resumable; rerun to continue)."""
    import dataclasses

    from .cli_train import print_train_summary
    from .models import EMBEDDED_MODELS
    from .train import BASE_RECIPES, check_run_dir, train_base

    if model not in EMBEDDED_MODELS:
        raise UserError(f"--model {model!r}: train-base trains an embedded model: {', '.join(EMBEDDED_MODELS)}")
    out = out or Path({"default": "runs/embedded", "default-convnext": "runs/embedded-convnext"}.get(model, f"runs/{model}"))
    check_run_dir(out, force)
    if data_dir is not None and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is not a directory")
    cfg = BASE_RECIPES[model]
    changes = {"seed": seed, "max_steps": max_steps, "threads": threads}
    if epochs is not None:
        if epochs <= 0:
            raise UserError(f"--epochs must be positive, got {epochs}")
        changes["epochs"] = epochs
    cfg = dataclasses.replace(cfg, **changes)
    summary = train_base(out, cfg, data_dir=str(data_dir) if data_dir else None, reschedule=reschedule, force=force,
                         progress=not json_, model=model)
    print_train_summary(out, summary, json_)


# --------------------------------------------------------------------------- more commands

def _register_extensions() -> None:
    """Commands that live in their own modules (listing, training, sweeps, figures, visualisation)."""
    import importlib

    for name in ("cli_list", "cli_check", "cli_train", "cli_sweep", "cli_visualize", "cli_figure", "cli_analyze"):
        try:
            mod = importlib.import_module(f"tokenbench.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"tokenbench.{name}":
                continue
            raise
        mod.register(app)


_register_extensions()


def _click_exceptions() -> tuple[tuple, tuple, tuple]:
    """(usage errors, aborts, exits) of click and of the copy of click that typer vendors."""
    usage, abort, exit_ = [], [], []
    for name in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            import importlib

            mod = importlib.import_module(name)
        except ImportError:
            continue
        for dest, attr in ((usage, "ClickException"), (abort, "Abort"), (exit_, "Exit")):
            cls = getattr(mod, attr, None)
            if isinstance(cls, type) and cls not in dest:
                dest.append(cls)
    return tuple(usage), tuple(abort), tuple(exit_)


def _take_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` wherever it stands (before a ``--``), and whether it was there.

    "rerun with --debug" is advice users follow by appending it; typer alone would take it
    only before the subcommand.
    """
    end = argv.index("--") if "--" in argv else len(argv)
    found = "--debug" in argv[:end]
    return [a for i, a in enumerate(argv) if not (i < end and a == "--debug")], found


def script_main(main, argv: Optional[list[str]] = None) -> int:
    """A script's ``main(argv)`` (``bench.py``, ``profile_method.py``) with bad input as one line on
    stderr and exit status 2, as the `tokenbench` command does (``--debug`` or ``TOKENBENCH_DEBUG``:
    the traceback)."""
    from .errors import UserError, user_message

    argv, debug = _take_debug(list(sys.argv[1:] if argv is None else argv))
    try:
        return main(argv)
    except UserError as e:
        if debug or os.environ.get("TOKENBENCH_DEBUG"):
            raise
        err(user_message(e))
        return 2


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    import warnings

    argv, debug_flag = _take_debug(list(argv) if argv is not None else sys.argv[1:])
    debug = debug_flag or bool(os.environ.get("TOKENBENCH_DEBUG"))
    STATE["debug"] = debug
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    if not debug:
        # One line per warning ("warning: damaged record ... set aside as ..."), no source echo.
        warnings.formatwarning = lambda message, category, *a, **k: f"warning: {str(message).splitlines()[0]}\n"
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    try:
        rv = app(args=argv, standalone_mode=False)
        # Outside standalone mode typer returns an Exit's code instead of exiting; Ctrl-C
        # becomes Exit(130) that way.
        if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:
            if rv == 130:
                err("interrupted; completed runs are recorded, rerun to continue")
            sys.exit(rv)
    except UserError as e:
        if debug:
            raise
        err(user_message(e))
        sys.exit(2)
    except KeyboardInterrupt:
        err("interrupted; completed runs are recorded, rerun to continue")
        sys.exit(130)
    except Exception as e:  # usage errors and bugs
        usage, abort, exit_ = _click_exceptions()
        if isinstance(e.__cause__, KeyboardInterrupt) or isinstance(e.__context__, KeyboardInterrupt):
            # typer turns Ctrl-C into Exit(130) (click into Abort): say what it means.
            err("interrupted; completed runs are recorded, rerun to continue")
            sys.exit(130)
        if isinstance(e, abort):
            err("aborted")
            sys.exit(130)
        if isinstance(e, usage):
            if debug:
                raise
            err(e.format_message().splitlines()[0])
            sys.exit(2)
        if isinstance(e, exit_):
            sys.exit(e.exit_code)
        if debug:
            raise
        err(f"internal error: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(rerun with --debug for the traceback)")
        sys.exit(1)
    except SystemExit:
        raise


if __name__ == "__main__":
    main()
