"""The full grid behind a reduced ViT (``tokenbench.backbones.grid``), checked method by method
against an obvious reference: the source map ``TokenState`` keeps for pictures, and the values
of the tokens at the moment a primitive removed them, both followed image by image in loops.

A position still covered by a token (itself, or the token its group was merged into) holds
that token; a position whose token left holds the value it had when it left.  What a method
does at its defaults (drops, merges) must be what it declares in ``restores_grid``.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_vit
from tokenbench import backbones
from tokenbench.backbones.tokens import TokenState
from tokenbench.errors import UserError
from tokenbench.registry import _SOURCES, GridRestore, Method, apply, get_method, load_methods


def _vit_methods() -> list[str]:
    load_methods()
    return sorted(n for n, src in _SOURCES.items() if src and "vit" in get_method(n).backbones)


def _covering(source: torch.Tensor, pad, pos: torch.Tensor, b: int, p: int) -> dict[int, int]:
    """Image ``b``: patch -> the real, placed token whose source row covers it."""
    out = {}
    for n in range(source.shape[1]):
        if int(pos[b, n]) < 0 or (pad is not None and not bool(pad[b, n])):
            continue
        for j in torch.nonzero(source[b, n, p:] > 0).flatten().tolist():
            out[j] = n
    return out


class Spy:
    """Wraps the primitives: for each image, the value of each patch at the moment its token left."""

    def __init__(self, monkeypatch):
        self.dropped: dict[tuple[int, int], torch.Tensor] = {}
        self.merges = 0
        for name in ("keep", "merge", "fuse", "mix"):
            monkeypatch.setattr(TokenState, name, self._wrap(getattr(TokenState, name)))

    def _wrap(self, primitive):
        spy = self

        def wrapped(st, x, *args, **kw):
            p = st.n_prefix
            before = (x.detach().clone(), st.source.clone(), None if st.pad is None else st.pad.clone(), st.pos.clone())
            out = primitive(st, x, *args, **kw)
            for b in range(x.shape[0]):
                was = _covering(before[1], before[2], before[3], b, p)
                now = _covering(st.source, st.pad, st.pos, b, p)
                for j, n in was.items():
                    if j not in now:
                        spy.dropped[(b, j)] = before[0][b, n]
                spy.merges += sum(1 for n in set(now.values()) if list(now.values()).count(n) > 1)
            return out

        return wrapped


@pytest.mark.parametrize("name", _vit_methods())
def test_pruned_positions_hold_their_value_when_dropped_and_merged_ones_their_group(name, monkeypatch):
    cls = get_method(name)
    how = cls.grid_restore("vit")
    net = apply(tiny_vit(), name)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    last = backbones.backbone_of(net).depth - 1
    if how is GridRestore.NONE:
        with pytest.raises(UserError, match="forward_intermediates"):
            net.forward_intermediates(x, indices=[last])
        return
    backbones.set_track_source(net, True)
    p = backbones.backbone_of(net).n_prefix
    with torch.no_grad():
        _, (seq,) = net.forward_intermediates(x, indices=[last], output_fmt="NLC", return_prefix_tokens=True)
        spy = Spy(monkeypatch)
        (grid,) = net.forward_intermediates(x, indices=[last], intermediates_only=True)
    tokens = torch.cat([seq[1], seq[0]], dim=1) if p else seq    # prefix first, as in the state
    st = backbones.last_state(net)
    grid = grid.flatten(2).transpose(1, 2)                        # [B, N0, C]
    for b in range(x.shape[0]):
        covering = _covering(st.source, st.pad, st.pos, b, p)
        for j in range(grid.shape[1]):
            want = tokens[b, covering[j]] if j in covering else spy.dropped[(b, j)]
            torch.testing.assert_close(grid[b, j], want, rtol=0, atol=1e-6)
    drops, merges = bool(spy.dropped), spy.merges > 0
    allowed = {GridRestore.KEEPS: (False, False), GridRestore.FILL: (True, False),
               GridRestore.UNMERGE: (False, True), GridRestore.FILL_UNMERGE: (True, True)}[how]
    assert (drops and not allowed[0], merges and not allowed[1]) == (False, False), \
        f"{name} declares {how.value} but dropped={drops} merged={merges}"
    if cls.reduces(cls.defaults()) and how in (GridRestore.FILL, GridRestore.UNMERGE):
        assert drops or merges                                     # the check saw what it checks


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
