"""One dense measurement (mIoU, pixel accuracy, FLOPs of encoder and decoder) recorded in a store.

The dense counterpart of :func:`tokenbench.runner.measure_run`: every refusal (a model and a
dataset of different tasks, a method that cannot hand back the full grid, bad data) happens
before anything is written, and a record is keyed by the model, method, weights, code, the
protocol and the data's fingerprint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .measure import env
from .data_scenes import DENSE_DATASETS, is_dense_data
from .errors import UserError
from .models_seg import DENSE_MODELS, is_dense_model
from .store import Store, make_record, record_key

KIND = "segmentation"
TASKS = ("classification", "segmentation")


def task_of(model: str, data: Optional[str], task: Optional[str] = None, checkpoint=None,
            new_decoder: bool = False) -> str:
    """The task a command runs: ``task`` when given, else what the data (or the model) says.

    A model is dense when it is an embedded dense model, when ``checkpoint`` holds a dense model
    trained on it (:func:`tokenbench.models_seg_timm.checkpoint_arch`), or when a training gives
    it a new decoder (``new_decoder``).  A model and a dataset of different tasks are refused in
    one line."""
    if task is not None and task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    dense_ckpt = checkpoint is not None and seg_checkpoint(model, checkpoint) is not None
    dense_model, dense_data = is_dense_model(model) or dense_ckpt or new_decoder, is_dense_data(data)
    wanted = task or ("segmentation" if dense_data or (data is None and dense_model) else "classification")
    if wanted == "segmentation" and not dense_model:
        if f"{model}-seg" in DENSE_MODELS:  # an embedded model: its dense counterpart is shipped
            hint = f"use its dense counterpart {model}-seg (its encoder fine-tuned with a decoder)"
        else:
            hint = (f"use a dense model ({', '.join(DENSE_MODELS)}), or train a decoder on it with `tokenbench "
                    f"train {model} --task segmentation --data {data or 'DATA'}`")
        raise UserError(f"{model} is a classification model; {data or 'a segmentation task'} needs a dense "
                        f"model: {hint}")
    if wanted == "segmentation" and data is not None and not dense_data:
        raise UserError(f"{data} is a classification dataset; segmentation needs a dense one "
                        f"({', '.join(DENSE_DATASETS)})")
    if wanted == "classification" and dense_model:
        what = f"{checkpoint} holds a segmentation model" if dense_ckpt and not is_dense_model(model) \
            else f"{model} is a segmentation model"
        raise UserError(f"{what}; {data or 'classification'} needs a classification model (or a dense dataset: "
                        f"{', '.join(DENSE_DATASETS)})")
    if wanted == "classification" and dense_data:
        raise UserError(f"{data} is a dense (per-pixel) dataset; {model} is a classification model: use "
                        f"{' or '.join(DENSE_MODELS)}")
    return wanted


def seg_checkpoint(model: str, checkpoint) -> Optional[dict]:
    """The architecture of the dense model ``checkpoint`` holds (None: no segmentation training
    wrote it); a checkpoint trained for another model is refused in one line."""
    from .models_seg_timm import checkpoint_arch

    found = checkpoint_arch(checkpoint)
    if found is None:
        return None
    if found["model"] not in (None, model):
        raise UserError(f"{checkpoint} holds a dense model trained on {found['model']}, not {model}")
    return found["arch"]


def check_restores_grid(method: str, params: dict, family: Optional[str]) -> None:
    """Refuse, in one line, a method that reduces tokens but declares no way to hand back the
    full feature map on the dense model's backbone family (``Method.restores_grid``); ``family``
    None (not known before the model is built): nothing to check yet."""
    from .registry import GridRestore, get_method

    cls = get_method(method)
    if family is not None and cls.reduces(params) and cls.grid_restore(family) is GridRestore.NONE:
        raise UserError(f"{method} cannot hand back the full feature map a dense task needs on {family} models "
                        "(it declares restores_grid none); measure it on a classification dataset, or use "
                        "--method none")


def dense_family(model: str) -> Optional[str]:
    """The backbone family of an embedded dense model (None for others: known once built)."""
    from .models_seg import SEG_ARCH

    return SEG_ARCH.get(model, {}).get("family")


def weights_id(model: str, checkpoint: Optional[str]) -> str:
    from .models_seg import seg_weights_id
    from .store import sha256_file

    if checkpoint:
        p = Path(checkpoint)
        if not p.is_file():
            raise UserError(f"checkpoint {p} does not exist")
        return f"sha256:{sha256_file(p)}"
    return seg_weights_id(model)


def load_dense(model: str, method: str, params: dict, checkpoint: Optional[str] = None):
    """The dense model with ``method`` applied to its encoder, and its provenance.

    A checkpoint a segmentation training wrote is loaded into the architecture its
    ``config.json`` names (any timm backbone and its head); other checkpoints into ``model``'s."""
    from .models_seg import create_seg_model
    from .models_seg_timm import build_dense
    from .registry import apply, get_method

    arch = seg_checkpoint(model, checkpoint) if checkpoint else None
    if arch is not None:
        net = build_dense(model, arch)
    else:
        net, prov = create_seg_model(model)
    dense_keys = set(net.state_dict())
    cls = get_method(method)
    if cls.reduces(params):  # before the checkpoint, which may carry the method's learned parts
        from .backbones import backbone_of

        check_restores_grid(method, params, backbone_of(net.encoder, method).name)
        apply(net.encoder, method, **params)
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = state.get("model", state)
        own = set(net.state_dict())
        if not cls.reduces(params):  # a checkpoint trained with a method, read without it
            state = {k: v for k, v in state.items() if k in own}
        # the method's learned parts may be missing (a dense model's checkpoint: untrained parts)
        missing = sorted(k for k in dense_keys if k not in state)
        unexpected = sorted(k for k in state if k not in own)
        try:
            if missing or unexpected:
                raise RuntimeError(f"{'missing' if missing else 'unexpected'} keys: {(missing or unexpected)[0]}, ...")
            net.load_state_dict(state, strict=False)
        except RuntimeError as e:
            raise UserError(f"{checkpoint} does not hold {model}'s weights ({str(e).splitlines()[0]})") from None
        learned = "trained" if any(k not in dense_keys for k in state) else "untrained" if cls.learned else "none"
        prov = {"weights": weights_id(model, checkpoint), "pretrained": False, "checkpoint": str(checkpoint),
                "learned_parts": learned}
    elif arch is None and cls.learned:  # the shipped dense model: none of the method's parts are trained
        prov = dict(prov, learned_parts="untrained")
    net.eval()
    return net, prov


_ENCODERS: dict[tuple, Optional[torch.nn.Module]] = {}  # (model, its config file) -> its architecture's encoder


def per_image(spec: dict) -> bool:
    """Whether ``spec``'s method declares no token schedule on its dense model's encoder (its count,
    and so its FLOPs, depend on the image), read from the architecture (random weights, built once
    per model and configuration), as the matched-FLOPs search reads it."""
    from .inputs import varies_per_image
    from .models_seg import build_seg_model, configured_arch, encoder_of, seg_paths
    from .registry import get_method

    key = (spec["model"], str(seg_paths(spec["model"])["config"]))
    if key not in _ENCODERS:
        try:
            _ENCODERS[key] = encoder_of(build_seg_model(spec["model"], configured_arch(spec["model"])).eval())
        except UserError:  # a dense model over a timm backbone (its architecture is its checkpoint's):
            _ENCODERS[key] = None  # counted on one synthetic image, as a report beside its row says
    if _ENCODERS[key] is None:
        return False
    return varies_per_image(get_method(spec["method"]), _ENCODERS[key], spec["params"])


def key_fields(spec: dict, settings, weights: str) -> dict:
    """A segmentation record's key; a method whose token count depends on the image also names the
    images its FLOPs are the mean over (``flops_images``: that many scenes of the split drawn with the
    data seed, those an evaluation with that limit reads)."""
    import timm

    from . import identity
    from .data_scenes import dense_fingerprint
    from .inputs import SEARCH_IMAGES
    from .registry import get_method

    dev = env.resolve_device(settings.device)
    kf = {"model": spec["model"], "method": spec["method"], "params": spec["params"], "img_size": None,
          "weights": weights, "torch": torch.__version__, "timm": timm.__version__,
          "code": identity.method_code(get_method(spec["method"])), "protocol": identity.PROTOCOLS[KIND],
          "data": settings.data, "data_id": dense_fingerprint(settings.data, settings.split, settings.data_dir),
          "split": settings.split, "limit": settings.limit, "data_seed": settings.data_seed,
          "device": dev.type, "precision": settings.precision}
    if per_image(spec):  # keys of the other methods stay as they were
        kf["flops_images"] = SEARCH_IMAGES
    return kf


def dense_record_key(spec: dict, settings) -> str:
    """The store key of ``spec``'s dense record under ``settings`` (``spec["params"]`` validated)."""
    kf = key_fields(spec, settings, weights_id(spec["model"], spec.get("checkpoint")))
    return record_key({"kind": KIND, **kf})


def measure_dense_run(spec: dict, settings, store: Optional[Store] = None, force: bool = False,
                      progress: bool = False, reference: Optional[Store] = None) -> tuple[dict, bool]:
    """(record, reused): mIoU, pixel accuracy and FLOPs of ``spec`` on ``settings.data``.

    ``reference``: a read-only store consulted after ``store``; a record found there is copied
    into ``store``, unchanged."""
    from .data_scenes import build_dense_dataset
    from .measure.dense import dense_flops, evaluate_dense
    from .models_seg import untrained_note
    from .registry import get_method

    task_of(spec["model"], settings.data, checkpoint=spec.get("checkpoint"))
    cls = get_method(spec["method"])
    spec = dict(spec, params=cls.validate(spec.get("params") or {}))
    check_restores_grid(spec["method"], spec["params"], dense_family(spec["model"]))
    weights = weights_id(spec["model"], spec.get("checkpoint"))
    kf = key_fields(spec, settings, weights)
    key = record_key({"kind": KIND, **kf})
    if store is not None and not force:
        rec = store.get(key)
        if rec is None and reference is not None and reference.root.resolve() != store.root.resolve():
            rec = reference.get(key)
            if rec is not None:
                store.put_copy(rec)
        if rec is not None:
            return rec, True
        store.ensure_writable()
    net, prov = load_dense(spec["model"], spec["method"], spec["params"], spec.get("checkpoint"))
    ds, dspec = build_dense_dataset(settings.data, settings.split, settings.data_dir, model=net,
                                    limit=settings.limit, seed=settings.data_seed)
    if dspec.classes != net.num_classes:
        raise UserError(f"{spec['model']} predicts {net.num_classes} classes; {settings.data} has {dspec.classes}")
    metrics = evaluate_dense(net, ds, dspec.classes, batch_size=settings.eval_batch_size, device=settings.device,
                             precision=settings.precision, progress=progress)
    if "flops_images" in kf:  # the mean over the first images of the set, as the matched-FLOPs search counts
        from .inputs import data_images

        images = data_images(net.cpu(), settings.data, settings.split, settings.data_dir, kf["flops_images"],
                             settings.data_seed, asked=None)[0]  # a smaller set: all of it
        metrics.update(dense_flops(net.cpu(), inputs=images))
    else:
        metrics.update(dense_flops(net.cpu()))
    metrics["data"] = dspec.key() | {"source": dspec.source}
    metrics["warnings"] = [untrained_note(spec["model"])] if prov.get("untrained") else []
    if cls.reduces(spec["params"]):
        from .checks import weights_warnings

        metrics["warnings"] += weights_warnings(spec["method"], prov.get("learned_parts"), None)
    if "flops_images" not in kf and cls.reduces(spec["params"]):
        from .inputs import varies_per_image

        if varies_per_image(cls, net.encoder, spec["params"]):  # an architecture per_image could not read
            metrics["warnings"].append("FLOPs of one synthetic image: this method's token count depends on the "
                                       "image, and this dense model's architecture is its checkpoint's")
    rspec = dict(spec, pretrained=False, img_size=None, task=KIND)
    rec = make_record(KIND, kf, rspec, metrics, env.env_info(env.resolve_device(settings.device)),
                      extra={"weights": weights, "provenance": prov})
    if store is not None:
        store.put(rec)
    return rec, False
