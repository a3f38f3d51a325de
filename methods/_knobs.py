"""Parameter declarations several methods share: the two budget knobs and proportional attention."""

from __future__ import annotations

from typing import Optional

from tokenbench.registry import Param


def keep_rate_param(help: str, default: float = 0.7, identity: Optional[float] = 1.0) -> Param:
    """The pruning knob ``keep_rate``, a fraction in (0, 1]; at its ``identity`` (1 unless the
    method still reduces there) nothing is removed."""
    return Param("keep_rate", "float", default, help, min=0.0, max=1.0, min_exclusive=True, identity=identity)


def r_param(help: str, default: int = 16, type: str = "int_or_list") -> Param:
    """The merging knob ``r``: tokens removed per block or site (an int, or a list, one per slot);
    0 removes none."""
    return Param("r", type, default, help, min=0, identity=0)


PROP_ATTN = Param("prop_attn", "bool", True, "proportional attention: add log(token size) to the attention logits")
