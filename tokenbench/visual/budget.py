"""Which budget a token picture is drawn at: a method's budget knob (its declared ``knob``)
searched to a fraction of the dense model's FLOPs, a checkpoint's own training value, or
what the user set.  FLOPs come from the sweep's cached counter."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import UserError

# The FLOPs level a single-method picture is drawn at when the method's budget is not given: a
# method's declared default is tuned for one model (ToMe's r=16 leaves 2 of the embedded model's
# 50 tokens), a fraction of the dense model's FLOPs means the same on every model.
DEFAULT_FLOPS = 0.66


def fmt_params(params: dict, only: Optional[str] = None) -> str:
    """``k=v, ...`` as tables print values; ``only``: that one parameter."""
    from ..sweep import fmt_value

    items = [(k, v) for k, v in params.items() if only is None or k == only]
    return ", ".join(f"{k}={fmt_value(v)}" for k, v in items)


class Flops:
    """GFLOPs of (model, method, params) and of the dense model, through the sweep's cached counter."""

    def __init__(self, cache: Optional[Path] = None):
        from ..sweep import FlopsSearch

        self.search = FlopsSearch(cache)

    def count(self, model: str, method: str, params: dict) -> float:
        return self.search.count(model, None, method, params)

    def dense(self, model: str) -> float:
        return self.search.dense(model, None)

    def matched(self, model: str, method: str, params: dict, target: float, preferred: Sequence[Any] = ()
                ) -> tuple[dict, Any]:
        """``params`` with the method's budget knob (its declared ``knob``) moved to land at ``target`` x dense FLOPs.

        A ``preferred`` value (one a checkpoint was trained with) wins when it lands within the
        sweep's tolerance.  Returns (params, SearchResult or None when the method has nothing to
        search).
        """
        from ..registry import get_method

        cls = get_method(method)
        param = cls.knob
        if not param:
            return params, None
        fixed = {k: v for k, v in params.items() if k != param}
        res = self.search.search(model, None, cls, fixed, param, target, preferred=preferred)
        return cls.validate({**fixed, param: res.value}), res


def trained_params(checkpoint: Optional[str]) -> dict:
    """The method parameters a ``tokenbench train`` run was trained with (its ``config.json``), or {}."""
    import json

    if not checkpoint:
        return {}
    cfg = Path(checkpoint).parent / "config.json"
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return {}
    p = data.get("params") if isinstance(data, dict) else None
    return p if isinstance(p, dict) else {}


def picture_params(cls, model: str, params: dict, flops: Optional[float], checkpoint: Optional[str],
                   flops_cache: Optional[Path]) -> tuple[dict, Optional[str]]:
    """``params`` with the method's budget knob filled in where the user left it out, and a note saying how.

    ``--flops F`` (or, by default, :data:`DEFAULT_FLOPS`) searches the knob to F x dense FLOPs; a
    checkpoint's own training value wins when none of the two is asked for explicitly.
    """
    from ..sweep import fmt_value

    knob = cls.knob
    if not knob or (knob in params and flops is None):
        return params, None
    if knob in params:
        raise UserError(f"--flops searches {knob}: give one of --flops and --set {knob}=..., not both")
    trained = trained_params(checkpoint).get(knob)
    if flops is None and trained is not None:
        return {**params, knob: trained}, f"note: {cls.name} at {knob}={trained}, as its checkpoint was trained"
    target = DEFAULT_FLOPS if flops is None else flops
    try:
        p, res = Flops(flops_cache).matched(model, cls.name, cls.validate(params), target,
                                            preferred=[trained] if trained is not None else [])
    except UserError as e:  # e.g. a value the search tried that the method refuses on this model
        raise UserError(f"{e} (while searching {knob} for {target:.2f}x dense FLOPs: give --set {knob}=VALUE)"
                        ) from None
    how = "" if flops is not None else f" (no --set {knob}; --flops F picks another level)"
    if res is not None and res.miss:  # the knob's range cannot reach the target: say what it reached
        return p, (f"note: {cls.name} at {knob}={fmt_value(p[knob])}: {res.ratio:.2f}x dense FLOPs, the nearest "
                   f"its {knob} reaches to {target:.2f}x{how}")
    return p, f"note: {cls.name} at {knob}={fmt_value(p[knob])}: {target:.2f}x dense FLOPs{how}"


def column_params(cls, fl: Flops, model: str, params: dict, flops: Optional[float],
                  checkpoint: Optional[str]) -> tuple[dict, Any]:
    """A comparison column's parameters: ``params``, with the knob searched to ``flops`` x dense
    FLOPs when given (a checkpoint's training value preferred).  Returns (params, SearchResult or None)."""
    if flops is None:
        return params, None
    trained = trained_params(checkpoint).get(cls.knob) if cls.knob else None
    return fl.matched(model, cls.name, params, flops, preferred=[trained] if trained is not None else [])
