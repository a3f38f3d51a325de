"""One measurement of one spec, recorded in a store (or reused from it).

The single-measurement CLI commands and the sweep runner both go through
:func:`measure_run`, so a record written by ``tokenbench flops --results DIR`` is the
same record a sweep would write and skip.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from . import distributed, measure
from .errors import UserError
from .store import Store, make_record, record_key

KINDS = ("flops", "throughput", "accuracy")


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
    # accuracy
    data: Optional[str] = None
    data_dir: Optional[str] = None
    split: str = "test"
    limit: Optional[int] = None
    data_seed: int = 0
    eval_batch_size: int = 256


def weights_id(model: str, pretrained: bool = False, checkpoint: Optional[str] = None) -> str:
    """Identity of the weights without building the model: checkpoint hash, timm tag, or random-init."""
    from .models import EMBEDDED_NAME, embedded_paths, sha256_file

    if checkpoint:
        p = Path(checkpoint)
        if not p.is_file():
            raise UserError(f"checkpoint {p} does not exist")
        return f"sha256:{sha256_file(p)}"
    if model == EMBEDDED_NAME:
        sha = embedded_paths()["sha"]
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
    return {"model": model, "method": method, "params": params, "pretrained": bool(pretrained),
            "checkpoint": str(checkpoint) if checkpoint else None, "img_size": img_size}


def key_fields(kind: str, spec: dict, weights: str, s: Settings) -> dict:
    import timm

    kf: dict[str, Any] = {"model": spec["model"], "method": spec["method"], "params": spec["params"],
                          "img_size": spec["img_size"], "weights": weights,
                          "torch": torch.__version__, "timm": timm.__version__}
    if kind == "throughput":
        dev = measure.resolve_device(s.device)
        kf.update({"device": dev.type, "device_name": measure.env_info(dev)["device_name"],
                   "precision": s.precision, "threads": s.threads or (os.cpu_count() if dev.type == "cpu" else None),
                   "batch_size": s.batch_size})
    elif kind == "accuracy":
        if not s.data:
            raise UserError("accuracy needs a dataset (--data)")
        dev = measure.resolve_device(s.device)
        kf.update({"data": s.data, "split": s.split, "limit": s.limit, "data_seed": s.data_seed,
                   "device": dev.type, "precision": s.precision})
    elif kind != "flops":
        raise ValueError(kind)
    return kf


class Loaded:
    """Loads the model once, lazily, for several measurements of one spec."""

    def __init__(self, spec: dict):
        self.spec = spec
        self._net = None
        self.prov: dict = {}

    @property
    def net(self):
        if self._net is None:
            from .api import load

            self._net, self.prov = load(self.spec["model"], self.spec["method"], self.spec["params"],
                                        pretrained=self.spec["pretrained"], checkpoint=self.spec["checkpoint"],
                                        img_size=self.spec["img_size"])
        return self._net


def dense_tokens(net) -> Optional[list]:
    from . import vit

    n = vit.num_patches(net) + net.num_prefix_tokens if hasattr(net, "patch_embed") else None
    return [n] * len(net.blocks) if n is not None and hasattr(net, "blocks") else None


def measure_run(kind: str, spec: dict, settings: Settings, store: Optional[Store] = None, force: bool = False,
                loaded: Optional[Loaded] = None, progress: bool = False) -> tuple[dict, bool]:
    """(record, reused): measure ``kind`` of ``spec`` unless the store already has it.

    Under torchrun, accuracy is measured by every rank together; FLOPs and throughput by
    rank 0 alone while the others wait (throughput never shares the device).  Only rank 0
    writes the record.
    """
    if kind != "accuracy" and distributed.active():
        return distributed.on_main(lambda: _measure_run(kind, spec, settings, store, force, loaded, progress))
    return _measure_run(kind, spec, settings, store, force, loaded, progress)


def _measure_run(kind: str, spec: dict, settings: Settings, store: Optional[Store], force: bool,
                 loaded: Optional[Loaded], progress: bool) -> tuple[dict, bool]:
    from .registry import get_method

    cls = get_method(spec["method"])
    spec = dict(spec)
    spec["params"] = cls.validate(spec.get("params") or {})
    weights = weights_id(spec["model"], spec["pretrained"], spec["checkpoint"])
    kf = key_fields(kind, spec, weights, settings)
    key = record_key({"kind": kind, **kf})
    if store is not None and not force:
        rec = store.get(key)
        if kind == "accuracy":  # measured by all ranks together: all of them reuse, or all measure
            rec = distributed.broadcast_from_main(rec)
        if rec is not None:
            return rec, True
    if store is not None:
        store.ensure_writable()
    loaded = loaded or Loaded(spec)
    net = loaded.net
    prov = loaded.prov
    warnings_: list[str] = []
    if kind == "flops":
        metrics = measure.flops(net, img_size=spec["img_size"])
        env = measure.env_info("cpu")
        dense = dense_tokens(net)
        if cls.name != "none" and dense is not None and metrics.get("tokens") == dense and \
                metrics.get("tokens_mlp") == dense and _reduces(cls, spec["params"]):
            warnings_.append("method left every block at the dense token count")
    elif kind == "throughput":
        metrics = measure.throughput(net, batch_size=settings.batch_size, device=settings.device,
                                     precision=settings.precision, threads=settings.threads,
                                     min_run_time=settings.min_run_time, latency=settings.latency,
                                     img_size=spec["img_size"])
        env = metrics.pop("env")
        if metrics.get("spread_flag"):
            warnings_.append(f"throughput spread {metrics['spread']:.0%} of the median: noisy machine?")
        if env.get("busy"):
            warnings_.append(f"machine busy while timing (load {env.get('load_avg')})")
    else:
        from .api import evaluate

        metrics = evaluate(net, settings.data, split=settings.split, data_dir=settings.data_dir,
                           limit=settings.limit, seed=settings.data_seed, batch_size=settings.eval_batch_size,
                           device=settings.device, precision=settings.precision, progress=progress)
        env = measure.env_info(measure.resolve_device(settings.device))
    metrics["warnings"] = warnings_
    rspec = dict(spec)
    rspec["learned_parts"] = prov.get("learned_parts")
    rec = make_record(kind, kf, rspec, metrics, env, extra={"weights": weights, "provenance": prov})
    if store is not None and distributed.is_main():
        store.put(rec)
    return rec, False


def _reduces(cls, params: dict) -> bool:
    """Whether these parameters should reduce tokens at all (keep_rate < 1, r > 0)."""
    kr = params.get("keep_rate")
    if kr is not None:
        return kr < 1
    r = params.get("r")
    if r is not None:
        return (sum(r) if isinstance(r, list) else r) > 0
    return True
