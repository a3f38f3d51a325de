"""One measurement of one spec, recorded in a store (or reused from it).

The single-measurement CLI commands and the sweep runner both go through
:func:`measure_run`, so a record written by ``tokenbench flops --results DIR`` is the
same record a sweep would write and skip.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from . import checks, distributed, inputs
from .measure import compilation, env, flop_count, overhead, timing
from .errors import UserError
from .store import Store, make_record, record_key

if TYPE_CHECKING:
    from .registry import Method

KINDS = ("flops", "throughput", "speedup", "accuracy")
TIMED = ("throughput", "speedup")


@dataclass
class Settings:
    """Measurement settings (what, besides the model spec, determines a result)."""

    # throughput
    batch_size: int = 64
    device: str = "auto"
    precision: str = "fp32"
    threads: Optional[int] = None
    min_run_time: float = 2.0
    latency: bool = True
    rounds: int = 10          # paired (speedup) timing: interleaved rounds of dense and method
    retries: int = 2          # a busy or noisy timing is taken again up to this many times
    compile: Optional[str] = None  # torch.compile mode (tokenbench.measure.compilation.COMPILE_MODES); None: eager
    cuda_graphs: bool = False      # the eager forward captured as CUDA graphs and replayed (tokenbench.measure.graphs)
    batch_from_max: bool = False   # batch_size was found by --batch-size max (recorded, not keyed)
    # accuracy
    data: Optional[str] = None
    data_dir: Optional[str] = None
    split: str = "test"
    limit: Optional[int] = None
    data_seed: int = 0
    eval_batch_size: int = 256
    # FLOPs counted over real images of ``data`` (``tokenbench flops --data``), not one synthetic
    # image; sweeps set ``data`` for accuracy only, so this is asked for explicitly.
    flops_on_data: bool = False
    flops_images: Optional[int] = None  # images those FLOPs are counted on (default: ``limit``, else 64)
    # throughput and speedup timed on a batch of real images of ``data`` (its seeded, stratified
    # subset of ``batch_size`` images), not the synthetic batch: for methods whose count depends on the image
    timing_on_data: bool = False


def weights_id(model: str, pretrained: bool = False, checkpoint: Optional[str] = None) -> str:
    """Identity of the weights without building the model: checkpoint hash, timm tag, or random-init."""
    from .models import DENSE_MODELS, embedded_paths, is_embedded
    from .store import sha256_file

    if model in DENSE_MODELS:  # an embedded dense model: its committed weights, or a checkpoint of it
        from .runner_dense import weights_id as dense_weights_id

        return dense_weights_id(model, checkpoint)
    if checkpoint:
        p = Path(checkpoint)
        if not p.is_file():
            raise UserError(f"checkpoint {p} does not exist")
        return f"sha256:{sha256_file(p)}"
    if is_embedded(model):
        sha = embedded_paths(name=model)["sha"]
        if sha.is_file():
            return "sha256:" + sha.read_text().split()[0]
        return "embedded:missing"
    if pretrained:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(model)
        if cfg is None:
            return f"timm:{model}"
        return f"timm:{cfg.architecture}.{cfg.tag}" if cfg.tag else f"timm:{cfg.architecture}"
    return "random-init:seed0"


def spec_dict(model: str, method: str, params: dict, pretrained: bool, checkpoint: Optional[str],
              img_size: Optional[int]) -> dict:
    """A measurement's spec.  An embedded model's own input size, asked for explicitly, is the
    same spec as none asked for (one record, one key, either way)."""
    from .models import embedded_arch, is_embedded

    if img_size is not None and is_embedded(model) and img_size == embedded_arch(model).get("img_size"):
        img_size = None
    return {"model": model, "method": method, "params": params, "pretrained": bool(pretrained),
            "checkpoint": str(checkpoint) if checkpoint else None, "img_size": img_size}


def key_fields(kind: str, spec: dict, weights: str, s: Settings, baseline: Optional[dict] = None) -> dict:
    """Everything that determines the number a ``kind`` measurement of ``spec`` gives.

    Always: the model, method, parameters, input size, weights, torch and timm versions,
    the method's code (declared version and source hash, :mod:`tokenbench.identity`) and the
    kind's protocol version.  Timing adds the device, precision, threads and batch size,
    the compile mode when compiled and the attention path when timm's fused kernel is switched
    off; a throughput timed without its batch-1 latency says so, a speedup adds its dense
    baseline.  Accuracy, and FLOPs counted on data (``--data``), add the data's fingerprint and
    subset.
    """
    import timm

    from . import identity
    from .registry import get_method

    if kind not in KINDS:
        raise ValueError(kind)
    kf: dict[str, Any] = {"model": spec["model"], "method": spec["method"], "params": spec["params"],
                          "img_size": spec["img_size"], "weights": weights,
                          "torch": torch.__version__, "timm": timm.__version__,
                          "code": identity.method_code(get_method(spec["method"])),
                          "protocol": identity.PROTOCOLS[kind]}
    if kind in TIMED:
        dev = env.resolve_device(s.device)
        kf.update({"device": dev.type, "device_name": env.env_info(dev)["device_name"],
                   "precision": s.precision,
                   "threads": s.threads or (env.default_threads() if dev.type == "cpu" else None),
                   "batch_size": s.batch_size})
        if s.compile:  # eager keys stay as they were
            kf["compile"] = compilation.compile_mode(s.compile)
        attention = env.timm_attention()
        if attention != "sdpa":  # another kernel times differently; the default's keys stay as they were
            kf["attention"] = attention
        if s.cuda_graphs:
            kf["cuda_graphs"] = True
        if kind == "throughput" and not s.latency:  # no batch-1 latency in it: never reused where one is asked for
            kf["latency"] = False
        if dev.type == "cuda" and s.precision == "fp32" and env.tf32_matmul():  # TensorFloat-32 matmuls: another number
            kf["tf32"] = True
        if s.timing_on_data:  # real images; without this field, the synthetic batch
            kf["input"] = inputs.data_key(s.data, s.split, s.data_dir, s.batch_size, s.data_seed)
        if kind == "speedup":
            if baseline is None:
                raise ValueError("a speedup needs its baseline spec")
            kf["baseline"] = {k: baseline[k] for k in ("model", "method", "params", "img_size")}
            kf["baseline_code"] = identity.method_code(get_method(baseline["method"]))
            kf["rounds"] = s.rounds
    elif kind == "flops" and s.flops_on_data:  # FLOPs averaged over real images: keyed by them, like accuracy
        kf.update({"data": s.data, "data_id": identity.data_fingerprint(s.data, s.split, s.data_dir),
                   "split": s.split, "limit": flops_limit(s), "data_seed": s.data_seed})
    elif kind == "accuracy":
        if not s.data:
            raise UserError("accuracy needs a dataset (--data)")
        dev = env.resolve_device(s.device)
        kf.update({"data": s.data, "data_id": identity.data_fingerprint(s.data, s.split, s.data_dir),
                   "split": s.split, "limit": s.limit, "data_seed": s.data_seed,
                   "device": dev.type, "precision": s.precision})
    return kf


FLOPS_LIMIT = inputs.SEARCH_IMAGES  # images counted by `flops --data` without --limit (each is one fvcore trace)
SYNTHETIC_FLOPS = inputs.SYNTHETIC_FLOPS
varies_per_image = inputs.varies_per_image


def flops_limit(s: Settings) -> int:
    """Images a FLOPs count over ``s.data`` uses: ``flops_images`` (a sweep's), ``--limit``,
    else :data:`FLOPS_LIMIT`."""
    return s.flops_images or s.limit or FLOPS_LIMIT


def image_progress(total: int):
    """A progress bar on stderr over ``total`` images (one fvcore trace each: minutes for a few
    hundred), with the time left; a context manager yielding ``on_image(done, total)``."""
    import contextlib

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    @contextlib.contextmanager
    def bar():
        with Progress(TextColumn("counting FLOPs image by image"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                      console=Console(stderr=True), transient=True) as prog:
            task = prog.add_task("flops", total=total)
            yield lambda done, _total: prog.update(task, completed=done)

    return bar()


def flops_on_data(net, spec: dict, s: Settings, progress: bool = False) -> dict:
    """FLOPs averaged over the first :func:`flops_limit` images of the (seeded, stratified)
    subset of ``s.data``: mean, spread per image, the tokens' distribution and the data's identity.
    ``progress``: a bar with the time left on stderr (:func:`image_progress`)."""
    import contextlib

    n = flops_limit(s)
    images, dspec = inputs.data_images(net, s.data, s.split, s.data_dir, n, s.data_seed,
                                       asked=s.flops_images or s.limit)
    with (image_progress(len(images)) if progress else contextlib.nullcontext()) as on_image:
        metrics = flop_count.flops(net, img_size=spec["img_size"], inputs=images, max_images=len(images),
                                on_image=on_image)
    metrics["data"] = dspec.key()
    metrics["input"] = inputs.described(s.data, s.split, len(images), s.data_seed)
    return metrics


def timing_images(net, s: Settings) -> Optional[torch.Tensor]:
    """The batch a timing runs on: ``batch_size`` real images of ``s.data`` when
    ``s.timing_on_data``, else None (the synthetic batch)."""
    if not s.timing_on_data:
        return None
    return inputs.data_images(net, s.data, s.split, s.data_dir, s.batch_size, s.data_seed)[0]


def record_key_of(kind: str, spec: dict, s: Settings, baseline: Optional[dict] = None) -> tuple[str, dict, str]:
    """(key, key fields, weights identity) of a ``kind`` measurement of ``spec``."""
    weights = weights_id(spec["model"], spec["pretrained"], spec["checkpoint"])
    kf = key_fields(kind, spec, weights, s, baseline)
    return record_key({"kind": kind, **kf}), kf, weights


class Loaded:
    """Loads the model once, lazily, for several measurements of one spec."""

    def __init__(self, spec: dict, dense: bool = False):
        self.spec = spec
        self.dense = dense  # a dense sweep's run: an embedded dense model, the method on its encoder
        self._net = None
        self.prov: dict = {}

    @property
    def net(self):
        from .models import DENSE_MODELS

        if self._net is None and self.dense and self.spec["model"] in DENSE_MODELS:  # encoder + decoder
            from .runner_dense import load_dense

            self._net, self.prov = load_dense(self.spec["model"], self.spec["method"], self.spec["params"],
                                              self.spec["checkpoint"])
        if self._net is None:
            from .api import load

            self._net, self.prov = load(self.spec["model"], self.spec["method"], self.spec["params"],
                                        pretrained=self.spec["pretrained"], checkpoint=self.spec["checkpoint"],
                                        img_size=self.spec["img_size"])
        return self._net


def declared_schedule_check(cls, net, params: dict, metrics: dict) -> Optional[str]:
    """The traced token counts of a FLOPs record against the method's declared schedule."""
    try:
        declared = cls().expected_tokens(net, **params)
    except UserError:
        return None
    return checks.schedule_disagreement(declared, metrics.get("tokens"), metrics.get("tokens_mlp"))


def dense_tokens(net) -> Optional[list]:
    from .backbones import backbone_of

    try:
        return backbone_of(net).dense_tokens()
    except UserError:
        return None


def measure_run(kind: str, spec: dict, settings: Settings, store: Optional[Store] = None, force: bool = False,
                loaded: Optional[Loaded] = None, progress: bool = False, reference: Optional[Store] = None,
                baseline: Optional[dict] = None, baseline_loaded: Optional[Loaded] = None) -> tuple[dict, bool]:
    """(record, reused): measure ``kind`` of ``spec`` unless the store already has it.

    ``reference``: a read-only store (the project's reference results) consulted after
    ``store``; a record found there is copied into ``store``, unchanged.  A ``speedup``
    needs ``baseline`` (the dense spec), timed interleaved with ``spec``.  A busy or noisy
    timing is taken again, up to ``settings.retries`` times; the calmest attempt is kept,
    with its flag if it stayed noisy.

    Under torchrun, accuracy is measured by every rank together; FLOPs and timings by
    rank 0 alone while the others wait (a timing never shares the device).  Only rank 0
    writes the record.
    """
    args = (kind, spec, settings, store, force, loaded, progress, reference, baseline, baseline_loaded)
    if kind != "accuracy" and distributed.active():
        return distributed.on_main(lambda: _measure_run(*args))
    return _measure_run(*args)


def _measure_run(kind: str, spec: dict, settings: Settings, store: Optional[Store], force: bool,
                 loaded: Optional[Loaded], progress: bool, reference: Optional[Store],
                 baseline: Optional[dict], baseline_loaded: Optional[Loaded]) -> tuple[dict, bool]:
    from .registry import get_method

    cls = get_method(spec["method"])
    spec = dict(spec)
    spec["params"] = cls.validate(spec.get("params") or {})
    if baseline is not None:
        baseline = dict(baseline)
        baseline["params"] = get_method(baseline["method"]).validate(baseline.get("params") or {})
    key, kf, weights = record_key_of(kind, spec, settings, baseline)
    if store is not None and not force:
        rec = _stored(kind, key, store, reference, settings)
        if rec is not None:
            return rec, True
    if store is not None:
        store.ensure_writable()
    started = time.perf_counter()
    loaded = loaded or Loaded(spec)
    net = loaded.net
    prov = loaded.prov
    warnings_: list[str] = checks.for_run(kind, spec, net, prov)
    if kind == "accuracy":
        warnings_ += checks.held_out_warnings(spec, settings.data, settings.split)
    if kind == "flops":
        metrics, machine = _measure_flops(cls, net, spec, settings, progress, warnings_)
    elif kind in TIMED:
        base_net = None
        if kind == "speedup":
            if baseline is None:
                raise ValueError("a speedup needs its baseline spec")
            base_net = (baseline_loaded or Loaded(baseline)).net
        metrics, machine = _measure_timed(kind, cls, net, base_net, spec, settings, warnings_)
        # what this measurement took here, retries included (a later sweep's estimate reads it)
        metrics["wall_s"] = round(time.perf_counter() - started, 2)
    else:
        from .api import evaluate

        metrics = evaluate(net, settings.data, split=settings.split, data_dir=settings.data_dir,
                           limit=settings.limit, seed=settings.data_seed, batch_size=settings.eval_batch_size,
                           device=settings.device, precision=settings.precision, progress=progress)
        machine = env.env_info(env.resolve_device(settings.device))
    metrics["warnings"] = warnings_
    rspec = dict(spec)
    rspec["learned_parts"] = prov.get("learned_parts")
    extra = {"weights": weights, "provenance": prov}
    if baseline is not None:
        extra["baseline"] = baseline
    rec = make_record(kind, kf, rspec, metrics, machine, extra=extra)
    if store is not None and distributed.is_main():
        store.put(rec)
    return rec, False


def stored_record(key: str, store: Store, reference: Optional[Store], min_run_time: Optional[float] = None,
                  ) -> tuple[Optional[dict], bool]:
    """(the record under ``key`` in ``store``, else in ``reference``; whether it came from the
    reference).  With ``min_run_time`` (a timing), a record timed for less is no record: the
    reference's is read past a short one here, and a short one there is not taken."""
    def usable(rec: Optional[dict]) -> Optional[dict]:
        return None if rec is None or (min_run_time is not None and timed_shorter(rec, min_run_time)) else rec

    rec = usable(store.get(key))
    if rec is None and reference is not None and reference.root.resolve() != store.root.resolve():
        rec = usable(reference.get(key))
        return rec, rec is not None
    return rec, False


def _stored(kind: str, key: str, store: Store, reference: Optional[Store], settings: Settings) -> Optional[dict]:
    """The record already measured under ``key``: in ``store``, else in the ``reference`` results
    (copied into ``store``); None: measure it."""
    rec, from_ref = stored_record(key, store, reference, settings.min_run_time if kind in TIMED else None)
    if from_ref and distributed.is_main():
        store.put_copy(rec)
    if kind == "accuracy":  # measured by all ranks together: all of them reuse, or all measure
        rec = distributed.broadcast_from_main(rec)
    return rec


def timed_shorter(rec: dict, min_run_time: float) -> bool:
    """Whether the stored timing ``rec`` ran for less time than ``min_run_time`` asks (not in the
    key: a longer timing of the same key serves a shorter request, a shorter one is timed again and
    replaced).  Records that predate the field say nothing and are reused."""
    stored = rec.get("metrics", {}).get("min_run_time")
    return stored is not None and stored < min_run_time - 1e-9


def _measure_flops(cls: type[Method], net: torch.nn.Module, spec: dict, settings: Settings, progress: bool,
                   warnings_: list[str]) -> tuple[dict, dict]:
    """(metrics, environment) of a FLOPs count, on the data or on one synthetic image, checked
    against the schedule the method declares and against the dense token count."""
    if settings.flops_on_data:
        metrics = flops_on_data(net, spec, settings, progress=progress)
    else:
        metrics = flop_count.flops(net, img_size=spec["img_size"])
        if varies_per_image(cls, net, spec["params"]):
            warnings_.append(SYNTHETIC_FLOPS)
            metrics["input"] = inputs.described(n=1)
    machine = env.env_info("cpu")
    mismatch = None if settings.flops_on_data else declared_schedule_check(cls, net, spec["params"], metrics)
    if mismatch:
        warnings_.append(mismatch)
        metrics["schedule_mismatch"] = True
    dense = dense_tokens(net)
    if dense is not None and metrics.get("tokens") == dense and \
            metrics.get("tokens_mlp") == dense and cls.reduces(spec["params"]):
        warnings_.append("method left every block at the dense token count")
    return metrics, machine


def _measure_timed(kind: str, cls: type[Method], net: torch.nn.Module, base_net: Optional[torch.nn.Module],
                   spec: dict, settings: Settings, warnings_: list[str]) -> tuple[dict, dict]:
    """(metrics, environment) of a throughput, or of a speedup over ``base_net``: timed with
    retries while the machine is busy, the host's share beside it."""
    images = timing_images(net, settings)  # None: the synthetic batch
    from .models_seg import encoder_of

    per_image = varies_per_image(cls, encoder_of(net), spec["params"])
    if settings.cuda_graphs and per_image:
        from .measure.graphs import NOT_CAPTURABLE

        raise UserError(f"{spec['method']}: {NOT_CAPTURABLE}")
    tries: list = []  # a retry reuses the first attempt's compiled graphs
    timing_kw = dict(batch_size=settings.batch_size, device=settings.device, precision=settings.precision,
                     threads=settings.threads, min_run_time=settings.min_run_time, img_size=spec["img_size"],
                     compile=settings.compile, inputs=images, cuda_graphs=settings.cuda_graphs)

    def counted():
        if kind == "speedup":
            res = timing.speedup(net, base_net, rounds=settings.rounds, fresh_compile=not tries, **timing_kw)
        else:
            res = timing.throughput(net, latency=settings.latency, fresh_compile=not tries, **timing_kw)
        tries.append(1)
        return res

    from .measure.busy import still_busy

    metrics = timed_with_retries(counted, settings.retries, still_busy=still_busy)
    metrics["min_run_time"] = settings.min_run_time  # how long it timed: a shorter one is never reused for a longer
    machine = metrics.pop("env")
    metrics.update(overhead.overhead(net, spec["img_size"]))  # aten_ops, host_ms: the host's share
    if settings.compile:
        metrics["compile_note"] = cls.compile_note
    if settings.batch_from_max:
        metrics["batch_size_from"] = "max"
    if images is not None:
        metrics["input"] = inputs.described(settings.data, settings.split, len(images), settings.data_seed)
    elif per_image:  # records of methods with a declared schedule stay as they were
        metrics["input"] = inputs.described(n=settings.batch_size)
        warnings_.append(inputs.RANDOM_TIMING)
    warnings_ += _timing_warnings(kind, metrics, machine)
    return metrics, machine


def _timing_warnings(kind: str, metrics: dict, machine: dict) -> list[str]:
    """What makes a timing doubtful: a wide spread, a busy machine, retries given up."""
    what = "speedup ratio" if kind == "speedup" else "throughput"
    out = []
    if metrics.get("spread_flag"):
        out.append(f"{what} spread {metrics['spread']:.0%} of the median after {metrics['attempts']} "
                   "attempts: noisy machine?")
    if machine.get("busy"):
        out.append(f"machine busy while timing (other processes took {machine.get('other_cores')} cores) "
                   f"after {metrics['attempts']} attempts")
    if metrics.get("retries_stopped"):
        out.append(metrics["retries_stopped"])
    return out


def timed_with_retries(once, retries: int, still_busy: Optional[Callable[[], Optional[float]]] = None) -> dict:
    """Run a timing; while it is busy or noisy, run it again (at most ``retries`` more times)
    and keep the calmest attempt: not busy first, then the smallest spread.

    ``still_busy()``: other processes' cores now when they would make a retry busy too, else
    None.  A busy attempt is retried only when the load has dropped: otherwise the retries stop
    early and ``retries_stopped`` says why."""
    attempts = []
    stopped = None
    for i in range(1 + max(0, retries)):
        if i and still_busy is not None and attempts[-1]["env"].get("busy"):
            load = still_busy()
            if load is not None:
                stopped = (f"retries stopped after {i} attempt(s): the machine was still busy before the next one "
                           f"(other processes took {load} cores), so it could not be calmer")
                break
        res = once()
        attempts.append(res)
        if not res.get("spread_flag") and not res["env"].get("busy"):
            break
    best = min(attempts, key=lambda r: (bool(r["env"].get("busy")), bool(r.get("spread_flag")),
                                        r.get("spread") if r.get("spread") == r.get("spread") else 1e9))
    best = dict(best)
    best["attempts"] = len(attempts)
    if stopped:
        best["retries_stopped"] = stopped
    for k in ("compile_s", "baseline_compile_s", "latency_compile_s", "graph_breaks", "graphs",
              "baseline_graph_breaks", "baseline_graphs"):  # a retry finds the graphs compiled
        if k in attempts[0]:
            best[k] = attempts[0][k]
    return best
