"""A sweep given as ``tokenbench run`` flags (``--model``, ``--method``, ``--set``): its raw mapping."""

from __future__ import annotations

from typing import Any, Optional

from ..errors import UserError, did_you_mean
from .format import ENTRY_KEYS


def sweep_from_flags(models: list[str], methods: list[str], sets: list[str], name: Optional[str] = None) -> dict:
    """The raw mapping of a sweep given as flags: ``--method NAME --set PARAM=[A,B]``.

    ``--set KEY=VALUE`` applies to every listed method that declares KEY (``METHOD.KEY=VALUE``
    to one of them); a list value is a grid, a nested list a per-block schedule; repeating
    a key adds to its grid.
    Entry keys (``flops_targets``, ``seeds``, ``checkpoint``, ``checkpoints``) work too.
    """
    from ..registry import get_method, parse_set

    methods = list(dict.fromkeys(methods or []))
    entries: dict[str, dict] = {m: {} for m in methods}

    def put(entry: dict, k: str, v: Any) -> None:
        if k in entry and k not in ENTRY_KEYS:  # a repeated --set of one parameter adds to its grid
            old = entry[k] if isinstance(entry[k], list) else [entry[k]]
            v = old + (v if isinstance(v, list) else [v])
        entry[k] = v

    for item in sets or []:
        kv = parse_set([item])
        (k, v), = kv.items()
        if "." in k:
            target, k = k.split(".", 1)
            if target not in entries:
                raise UserError(f"--set {item}: {target!r} is not one of the --method values"
                                f"{did_you_mean(target, entries)}")
            put(entries[target], k, v)
            continue
        takers = [m for m in methods if k in ENTRY_KEYS or k in [p.name for p in get_method(m).params]]
        if not takers:
            known = sorted({p.name for m in methods for p in get_method(m).params})
            raise UserError(f"--set {item}: no listed method takes {k!r}{did_you_mean(k, known)}"
                            f" (their parameters: {', '.join(known) or 'none'})")
        for m in takers:
            put(entries[m], k, v)
    raw: dict[str, Any] = {"methods": entries}
    if models:
        raw["models"] = models
    raw["name"] = name or "-".join([*(models or ["default"]), *methods]).replace("/", "_")
    return raw
