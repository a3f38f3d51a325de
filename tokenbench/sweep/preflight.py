"""Preflight: refuse, before anything is written or measured, what would fail part-way through."""

from __future__ import annotations

import itertools
from pathlib import Path

from ..errors import UserError
from .dense import is_dense, is_skipped, method_net
from .format import DENSE_METHOD, Sweep
from .search import FlopsSearch


def preflight(sw: Sweep, searcher: FlopsSearch) -> None:
    """Refuse, before anything is written or measured, what would fail part-way through the sweep.

    Every model is built (random weights; the embedded model's checkpoint is verified), every
    method entry is applied to it and every value of its grid checked against the model
    (declared schedule), every checkpoint is loaded into the method-applied model, the
    device is resolved, the data is found and read, and the throughput and evaluation
    batches are checked against the free memory.  On a dense model the methods act on its
    encoder; entries that cannot restore the grid are skipped (:func:`.dense.skipped_entries`).
    """
    import copy as _copy

    from ..measure import env, memory
    from ..checkpoint import load_state_dict_checked, read_state_dict
    from ..models import embedded_paths, is_embedded, verify_checksum
    from ..registry import apply, get_method

    timed = [k for k in sw.measure if k != "flops"]
    dev = env.resolve_device(sw.device) if timed else None
    for model in sw.dense_family:  # dense models of other sizes: built, and embedded weights checked
        searcher.base(model, sw.img_size)
        if is_embedded(model):
            p = embedded_paths(name=model)
            verify_checksum(p["ckpt"], p["sha"], model)
    for model in sw.models:
        whole, _ = searcher.base(model, sw.img_size)
        net = method_net(whole)  # a dense model's encoder
        if is_embedded(model):  # its trained weights load under every run (checkpoints load on top)
            p = embedded_paths(name=model)
            verify_checksum(p["ckpt"], p["sha"], model)
        if is_dense(sw):  # its committed weights, checksum verified, load under every run
            from ..models_seg import create_seg_model

            create_seg_model(model)
        if sw.dense:
            apply(_copy.deepcopy(net), DENSE_METHOD)
        for e in sw.methods:
            if is_skipped(sw, e, model):
                continue
            cls = get_method(e.method)
            inst = cls()
            keys = list(e.grid)
            first = None
            for combo in itertools.product(*(e.grid[k] for k in keys)):
                params = cls.validate(dict(zip(keys, combo)))
                first = first or params
                try:
                    inst.expected_tokens(net, **params)
                except UserError as err:
                    raise UserError(f"{sw.source}: [methods.{e.label}] on {model}: {err}") from None
            trial = _copy.deepcopy(net)
            try:
                apply(trial, e.method, **(first or {}))
            except UserError as err:
                raise UserError(f"{sw.source}: [methods.{e.label}] on {model}: {err}") from None
            for ck in dict.fromkeys([e.checkpoint, *e.checkpoints.values()]):
                if ck is None:
                    continue
                if not Path(ck).is_file():
                    raise UserError(f"{sw.source}: [methods.{e.label}]: checkpoint {ck} does not exist")
                try:
                    if is_dense(sw):  # a dense model's checkpoint: encoder, decoder and the method's parts
                        from ..runner_dense import load_dense

                        load_dense(model, e.method, first or {}, ck)
                    else:
                        load_state_dict_checked(trial, read_state_dict(ck), source=f"checkpoint {ck}")
                except UserError as err:
                    raise UserError(f"{sw.source}: [methods.{e.label}]: {err}") from None
            del trial
        if "throughput" in sw.measure:
            try:
                memory.check_batch_fits(net, sw.batch_size, dev, sw.precision, sw.img_size)
            except UserError as err:
                raise UserError(f"{sw.source}: throughput {err} ([throughput] batch_size)") from None
        if "accuracy" in sw.measure or is_dense(sw):
            from ..data import build_dataset
            from ..data_scenes import build_dense_dataset

            build = build_dense_dataset if is_dense(sw) else build_dataset
            ds, _ = build(sw.data, sw.split, sw.data_dir, model=whole, limit=sw.limit, seed=sw.data_seed)
            try:
                memory.check_batch_fits(net, min(sw.eval_batch_size, max(1, len(ds))), dev, sw.precision)
            except UserError as err:
                msg = str(err).replace("--batch-size", "--eval-batch-size")
                raise UserError(f"{sw.source}: evaluation {msg} ([data] batch_size)") from None
