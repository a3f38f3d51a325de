"""The paired test of two settings of a results directory on a dense task (``tokenbench compare``):
per-image IoU of the same images, compared by :func:`tokenbench.measure.dense.paired_iou_test`."""

from __future__ import annotations

import os

from ..errors import UserError

KIND = "segmentation"


def dense_records(out: str | os.PathLike) -> list[dict]:
    """The dense (segmentation) records of a results directory."""
    from ..store import Store

    return Store(out, read_only=True).records(KIND)


def _matches(rec: dict, method: str, params: dict) -> bool:
    from .stats import params_match

    kf = rec["key_fields"]
    return kf["method"] == method and params_match(kf["params"], params)


def _select(recs: list[dict], text: str) -> dict:
    from .stats import parse_selector

    method, params = parse_selector(text)
    got = [r for r in recs if _matches(r, method, params)]
    if len(got) != 1:
        what = "no dense record" if not got else f"{len(got)} dense records (name more parameters)"
        raise UserError(f"{what} matches {text!r}; methods here: "
                        f"{', '.join(sorted({r['key_fields']['method'] for r in recs}))}")
    return got[0]


def _current_of_one_model(recs: list[dict], model: str | None, out) -> list[dict]:
    """The records this checkout would write the same (stale ones left out) of ``model``, or of the
    only model there is (several and none named: one line)."""
    from ..identity import stale_reasons
    from .stats import check_model_choice

    recs = [r for r in recs if not stale_reasons(r)]
    check_model_choice(sorted({r["key_fields"]["model"] for r in recs}), model, out)
    return [r for r in recs if model is None or r["key_fields"]["model"] == model]


def _select_current(recs: list[dict], every: list[dict], text: str) -> dict:
    """:func:`_select` among the current records; where only stale ones match, one line says so."""
    from ..identity import stale_reasons
    from .stats import parse_selector

    try:
        return _select(recs, text)
    except UserError:
        method, params = parse_selector(text)
        stale = [r for r in every if stale_reasons(r) and _matches(r, method, params)]
        if stale:
            raise UserError(f"only {len(stale)} stale record(s) match {text!r} (measured by other code); rerun "
                            "`tokenbench run` on this directory to measure them with this code") from None
        raise


def paired_dense(out: str | os.PathLike, a: str, b: str, model: str | None = None) -> dict:
    """mIoU of settings ``a`` and ``b`` and the paired test on their per-image IoU (``model``: the
    model compared, where ``out`` holds several; stale records are not read)."""
    from ..measure.dense import paired_iou_test

    every = dense_records(out)
    recs = _current_of_one_model(every, model, out)
    ra, rb = _select_current(recs, every, a), _select_current(recs, every, b)
    same = ("model", "data", "data_id", "split", "limit", "data_seed")
    if any(ra["key_fields"].get(k) != rb["key_fields"].get(k) for k in same):
        raise UserError(f"{a} and {b} were not measured on the same model and images; a paired test needs them")
    test = paired_iou_test(ra["metrics"]["per_image_iou"], rb["metrics"]["per_image_iou"])

    def side(r: dict) -> dict:
        m = r["metrics"]
        return {"method": r["key_fields"]["method"], "params": r["key_fields"]["params"], "miou": m["miou"],
                "miou_ci95": m["miou_ci95"], "n": m["n"], "gflops": m.get("gflops")}

    return {"out": str(out), "a": side(ra), "b": side(rb), **test}
