"""McNemar's paired test between two settings of a results directory (``tokenbench compare``)."""

from __future__ import annotations

import os

from .collect import collect
from ..errors import UserError
from .stats import one_model, params_text, select_rows
from .rows import Row


def paired(out: str | os.PathLike, a: str, b: str, model: str | None = None) -> dict:
    """McNemar's paired test between two settings measured on the same images in ``out``.

    Each of ``a`` and ``b`` selects one setting (``METHOD:KEY=VALUE,...``); a seeded method
    gives one comparison per seed.  ``model``: the model compared, where ``out`` holds several.
    Returns both sides' accuracy and, per pair, the images
    only one side gets right and the exact two-sided p-value.
    """
    from ..measure.stats import mcnemar

    res = collect(out)
    rows = one_model([r for r in res["rows"] if r.correct], model, out)
    ra, rb = select_rows(rows, a), select_rows(rows, b)

    def side(r: Row) -> dict:
        return {"method": r.method, "label": r.label, "model": r.model, "params": r.params, "top1": r.top1,
                "top1_ci95": [r.top1_lo, r.top1_hi],
                "n": r.n, "gflops": r.gflops, "learned": r.learned, "checkpoint": r.checkpoint}

    pairs = []
    for x in ra:
        for y in rb:
            if x.acc_setting != y.acc_setting or len(x.correct) != len(y.correct):
                raise UserError(f"{params_text(x)} and {params_text(y)} were not measured on the same images; "
                                "a paired test needs the same data subset")
            m = mcnemar([c == "1" for c in x.correct], [c == "1" for c in y.correct])
            pairs.append({"a": side(x), "b": side(y), "only_a": m["only_a"], "only_b": m["only_b"],
                          "p_value": m["p_value"], "diff": x.top1 - y.top1})
    return {"out": str(out), "a": a, "b": b, "pairs": pairs}
