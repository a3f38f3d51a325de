"""Dense (segmentation) sweeps: the task a sweep runs, the entries that cannot hand back the
full feature map (skipped, one line each in the plan), and what a dense run measures.

A sweep is dense when its ``task`` says so or, without one, when its data is a dense dataset
(``fashion-mnist-scenes``, ``voc``, ``ade20k``).  Each run of a dense sweep is measured by
:func:`tokenbench.runner_dense.measure_dense_run`: one ``segmentation`` record holds its mIoU
(with its interval), pixel accuracy, per-image IoU and the GFLOPs of backbone and decoder, so
the sweep's ``flops`` and ``accuracy`` are that one record; ``throughput`` adds the timed
throughput and the paired speedup over the dense model, as for classification.
"""

from __future__ import annotations

from typing import Optional

from ..errors import UserError

SEGMENTATION = "segmentation"
CLASSIFICATION = "classification"
TASKS = (CLASSIFICATION, SEGMENTATION)
DENSE_KIND = "segmentation"       # the record kind of a dense run (runner_dense.KIND)
FOLDER_SPLIT = "val"               # the scored split of VOC and ADE20K folders


def parse_task(raw: dict, sw, source: str) -> None:
    """``task`` (or the data deciding it): every model must be of that task, a dense sweep needs
    dense data; a model and a dataset of different tasks are refused in one line."""
    from ..runner_dense import task_of

    task = raw.get("task")
    if task is not None and task not in TASKS:
        raise UserError(f"{source}: unknown task {task!r} (choose from {', '.join(TASKS)})")
    try:
        found = {task_of(m, sw.data, task) for m in sw.models + sw.dense_family}
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    sw.task = task or (found.pop() if len(found) == 1 else CLASSIFICATION)
    if sw.task == SEGMENTATION and not sw.data:
        raise UserError(f"{source}: a dense sweep needs dense data (data = \"fashion-mnist-scenes\", voc or ade20k)")


def is_dense(sw) -> bool:
    return getattr(sw, "task", CLASSIFICATION) == SEGMENTATION


def default_split(data: Optional[str]) -> str:
    """The split a sweep scores when none is given: the folders' val, the test split otherwise."""
    from ..data_scenes import ADE20K, VOC

    return FOLDER_SPLIT if data in (VOC, ADE20K) else "test"


def skipped_entries(sw) -> list[dict]:
    """The method entries a dense sweep leaves out on a model: those that declare no way to hand
    back the full feature map on its backbone family (``restores_grid`` none), one line each."""
    if not is_dense(sw):
        return []
    from ..registry import GridRestore, get_method
    from ..runner_dense import dense_family

    out = []
    for model in sw.models:
        family = dense_family(model)
        for e in sw.methods:
            if e.models is not None and model not in e.models:
                continue
            if family is not None and get_method(e.method).grid_restore(family) is GridRestore.NONE:
                out.append({"label": e.label, "model": model, "method": e.method,
                            "why": f"{e.label} skipped on {model}: {e.method} cannot hand back the full feature "
                                   f"map on {family} models (restores_grid none)"})
    return out


def is_skipped(sw, entry, model: str) -> bool:
    """Whether method ``entry`` is left out on ``model``: not one of the entry's ``models``, or a
    dense model the method cannot restore the grid of."""
    if entry.models is not None and model not in entry.models:
        return True
    return any(s["label"] == entry.label and s["model"] == model for s in skipped_entries(sw))


def dense_kinds(run, sw, with_speedup: bool) -> list[str]:
    """What a dense run measures: its ``segmentation`` record, then (with throughput) its
    throughput and paired speedup, as :func:`tokenbench.sweep.plan.kinds_for` decides for timings."""
    out = [DENSE_KIND]
    if "throughput" in sw.measure and run.seed_index == 0 and not run.untimed:
        out.append("throughput")
        if with_speedup:
            out.append("speedup")
    return out


def dense_key(run, sw) -> str:
    """The store key of a dense run's ``segmentation`` record."""
    from ..registry import get_method
    from ..runner_dense import dense_record_key

    spec = run.spec()
    spec["params"] = get_method(run.method).validate(spec["params"])
    return dense_record_key(spec, sw.settings())


# --------------------------------------------------------------------------- the matched-FLOPs search on a dense model

def method_net(net):
    """The network a method acts on: a dense model's encoder, any other model itself."""
    from ..models_seg import encoder_of

    return encoder_of(net)


def dense_architecture(model: str):
    """A dense model (encoder and decoder) with random weights, in eval mode, and its architecture's
    identity: the FLOPs search counts both, so a target is a fraction of the whole model's FLOPs."""
    import timm

    from ..models_seg import build_seg_model, configured_arch

    net = build_seg_model(model, configured_arch(model))
    return net.eval(), {"dense": net.tokenbench_arch, "timm_version": timm.__version__}


def gflops_of(net, img_size: Optional[int] = None, inputs=None) -> float:
    """fvcore GFLOPs per image of ``net``: a dense model's encoder and decoder together; with
    ``inputs`` (real images), the mean over them (a dense model: its encoder on each, its decoder once)."""
    from ..measure import flop_count
    from ..measure.dense import dense_flops

    if method_net(net) is not net:
        return dense_flops(net, img_size, inputs=inputs)["gflops"]
    return flop_count.flops(net, img_size=img_size, inputs=inputs,
                            max_images=8 if inputs is None else len(inputs))["gflops"]


def apply_to(net, method: str, params: dict):
    """``method(params)`` applied where it acts (:func:`method_net`); returns ``net``."""
    from ..registry import apply

    apply(method_net(net), method, **params)
    return net
