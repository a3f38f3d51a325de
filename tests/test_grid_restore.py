"""The full grid behind a reduced ViT (``tokenbench.backbones.grid``), checked method by method
(``adapter_checks.grid_as_declared``, which ``tokenbench check`` runs too) against an obvious
reference: the source map ``TokenState`` keeps for pictures, and the values of the tokens at the
moment a primitive removed them, both followed image by image in loops.

A position still covered by a token (itself, or the token its group was merged into) holds
that token; a position whose token left holds the value it had when it left.  What a method
does at its defaults (drops, merges) must be what it declares in ``restores_grid``.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_vit
from tokenbench import adapter_checks as checks
from tokenbench import backbones
from tokenbench.backbones.grid import GridRestorer
from tokenbench.registry import _SOURCES, GridRestore, Method, apply, get_method, load_methods


def _vit_methods() -> list[str]:
    load_methods()
    return sorted(n for n, src in _SOURCES.items() if src and "vit" in get_method(n).backbones)


@pytest.mark.parametrize("name", _vit_methods())
def test_pruned_positions_hold_their_value_when_dropped_and_merged_ones_their_group(name):
    checks.grid_as_declared(name)


def _forget_dropped(self, x, new):
    self.owner = new.gather(1, self.owner.clamp(min=0))                 # no value kept for a dropped patch


def _forget_merged(self, x, keep_idx, src_idx, dst, drop, real):
    self.kept(x, keep_idx, real)                                        # folded tokens treated as dropped


@pytest.mark.parametrize("name,part,broken", [("topk", "_follow", _forget_dropped),
                                              ("tome", "merged", _forget_merged)])
def test_the_check_fails_a_wrong_declaration_and_a_restorer_that_forgets(name, part, broken, monkeypatch):
    cls = get_method(name)
    wrong = GridRestore.UNMERGE if cls.grid_restore("vit") is GridRestore.FILL else GridRestore.FILL
    monkeypatch.setattr(cls, "restores_grid", wrong)
    with pytest.raises(checks.CheckFailed, match="restores_grid is"):
        checks.grid_as_declared(name)
    monkeypatch.undo()
    monkeypatch.setattr(GridRestorer, part, broken)
    with pytest.raises(checks.CheckFailed, match="image"):
        checks.grid_as_declared(name)


def test_a_grid_costs_nothing_unless_asked_for():
    net = apply(tiny_vit(), "tome", r=4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        net(x)
        assert backbones.last_state(net).grid is None
        net.forward_intermediates(x, indices=[5])
        assert set(backbones.last_state(net).grid.maps) == {5}
        net(x)
        assert backbones.last_state(net).grid is None


def test_a_declaration_that_is_not_a_grid_restore_is_refused():
    with pytest.raises(ValueError, match="restores_grid must be a GridRestore"):
        type("Bad", (Method,), {"name": "bad-grid", "restores_grid": "fill"})
    per_family = type("PerFamily", (Method,), {"name": "per-family", "restores_grid": {"vit": GridRestore.FILL}})
    assert per_family.grid_restore("vit") is GridRestore.FILL
    assert per_family.grid_restore("swin") is GridRestore.NONE
    assert Method.grid_restore("vit") is GridRestore.NONE              # a method that declares nothing cannot
