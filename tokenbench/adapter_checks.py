"""The shared adapter checks: every registered method (built-in or plugin) goes through them.

``tests/test_adapters.py`` runs them on every method; ``tokenbench check METHOD`` runs them on
one (a plugin's author included), on a tiny random ViT (depth 12, width 32, 32 px, patch 4) and
random images, in seconds.  Each check raises :class:`CheckFailed` (an ``AssertionError``) with
what went wrong, or returns.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import backbones
from .measure import flop_count
from .errors import UserError
from .registry import FAMILIES, apply, get_method


class CheckFailed(AssertionError):
    pass


def expect(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)


def refused(fn: Callable[[], object], what: str, match: Optional[str] = None) -> None:
    """``fn`` must raise a one-line :class:`UserError` (its text holding ``match``)."""
    try:
        fn()
    except UserError as e:
        expect(match is None or match in str(e), f"{what}: refused, but with {str(e)!r}")
        return
    raise CheckFailed(f"{what}: accepted, should be refused")


def tiny_vit(num_classes: int = 10) -> torch.nn.Module:
    """A depth-12 ViT small enough to run in milliseconds (reduction sites exist at 3, 6, 9)."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=12,
                             num_heads=2, num_classes=num_classes).eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def applied(name: str, **params) -> torch.nn.Module:
    return apply(tiny_vit(), name, **params)


# --------------------------------------------------------------------------- the checks

def declaration(name: str) -> None:
    """Family, summary, version; the knob and seed among the parameters; a random method's seed."""
    cls = get_method(name)
    pnames = [p.name for p in cls.params]
    expect(cls.family in FAMILIES, f"family {cls.family!r} is not one of {FAMILIES}")
    expect(bool(cls.summary and cls.version), "summary and version must be set")
    expect(cls.knob is None or cls.knob in pnames, f"knob {cls.knob!r} is not a parameter")
    expect(cls.seed_param is None or cls.seed_param in pnames, f"seed_param {cls.seed_param!r} is not a parameter")
    expect(cls.deterministic or bool(cls.seed_param), "a random method must declare its seed parameter")
    expect("vit" in cls.backbones, "the checks run on a ViT: backbones must include 'vit'")


def shapes_schedule_and_batch(name: str) -> None:
    """Finite logits; an image's logits independent of its batch; the declared schedule
    (``expected_tokens``) equal to what the forward keeps."""
    net = applied(name)
    x = images(4)
    with torch.no_grad():
        with backbones.image_ids(net, torch.arange(4)):  # each image's index, as evaluation says it
            y = net(x)
        st = backbones.last_state(net)
        tokens, tokens_mlp = list(st.tokens), list(st.tokens_mlp)
        alone = []
        for i in range(4):
            with backbones.image_ids(net, torch.tensor([i])):
                alone.append(net(x[i:i + 1]))
        alone = torch.cat(alone)
    expect(y.shape == (4, 10) and bool(torch.isfinite(y).all()), f"logits of shape {tuple(y.shape)} or not finite")
    torch.testing.assert_close(y, alone, rtol=1e-4, atol=1e-4,
                               msg=lambda m: f"an image's logits depend on its batch: {m}")
    cls = get_method(name)
    expected = cls().expected_tokens(net, **cls.defaults())
    if expected is not None:
        expect((tokens, tokens_mlp) == (list(expected[0]), list(expected[1])),
               f"expected_tokens declares {list(expected[0])} / {list(expected[1])}, the forward keeps "
               f"{tokens} / {tokens_mlp} (tokens per block / per MLP)")
    expect(len(tokens) == backbones.backbone_of(net).depth, "a token count per block is missing")


def deterministic_and_seeded(name: str) -> None:
    """The same input gives the same output, at the default seed and at another."""
    cls = get_method(name)
    x = images(3, seed=1)
    with torch.no_grad():
        a, b = applied(name)(x), applied(name)(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"two runs differ: {m}")
    if cls.seed_param:
        with torch.no_grad():
            c = applied(name, **{cls.seed_param: 1})(x)
            d = applied(name, **{cls.seed_param: 1})(x)
        torch.testing.assert_close(c, d, rtol=0, atol=0, msg=lambda m: f"two runs at seed 1 differ: {m}")


def bad_parameters_refused(name: str) -> None:
    """Unknown parameters, values out of range and non-numbers are refused in one line."""
    cls = get_method(name)
    refused(lambda: cls.validate({"no_such_parameter": 1}), "an unknown parameter", "unknown parameter")
    for p in cls.params:
        if p.min is not None and p.type in ("int", "float", "int_or_list"):
            refused(lambda: cls.validate({p.name: p.min - 1}), f"{p.name}={p.min - 1} (below its minimum)")
        if p.max is not None and p.type in ("int", "float"):
            refused(lambda: cls.validate({p.name: p.max + 1}), f"{p.name}={p.max + 1} (above its maximum)")
        if p.type in ("int", "float"):
            refused(lambda: cls.validate({p.name: "not a number"}), f"{p.name}='not a number'")


def restore_gives_the_plain_model(name: str) -> None:
    """``backbones.restore`` gives back the plain model: its class, parameters and outputs."""
    plain = tiny_vit()
    net = applied(name)
    x = images(2)
    backbones.restore(net)
    expect(type(net) is type(plain) and not backbones.is_prepared(net), "restore left the model converted")
    expect(set(dict(net.named_parameters())) == set(dict(plain.named_parameters())),
           "restore left parameters of the method behind")
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain(x), rtol=0, atol=0,
                                   msg=lambda m: f"the restored model computes otherwise: {m}")


def fewer_flops_where_it_reduces(name: str) -> None:
    """Fewer FLOPs than dense at the defaults when ``reduces`` says so; the same otherwise."""
    cls = get_method(name)
    dense = flop_count.flops(tiny_vit())["gflops"]
    got = flop_count.flops(applied(name))["gflops"]
    if cls.reduces(cls.defaults()):
        expect(got < dense, f"reduces() says the defaults reduce, but FLOPs {got:.6g} >= dense {dense:.6g}")
    elif cls.learned:  # untrained, it may keep every token; its scoring may still count
        expect(got >= dense * (1 - 1e-6), f"FLOPs {got:.6g} below dense {dense:.6g} at an identity setting")
    else:
        expect(abs(got - dense) <= 1e-6 * dense, f"reduces() is False but FLOPs {got:.6g} != dense {dense:.6g}")


def training_step_reaches_learned_parts(name: str) -> None:
    """A learned method: one training step gives every learned weight a finite gradient."""
    cls = get_method(name)
    net = applied(name).train()
    m = cls()
    loss_fn = m.train_setup(net, tiny_vit(), cls.defaults(), None)
    x, y = images(4), torch.arange(4)
    loss = loss_fn(net, x, y)[0] if loss_fn else torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    added = backbones.added_modules(net)
    # a learned method's own modules (attached with backbones.add_module), or, for one that
    # learns through the backbone's weights alone, every weight
    learned = [net._modules[a] for a in added] or [net]
    grads = [p.grad for mod in learned for p in mod.parameters() if p.requires_grad]
    expect(bool(grads) and all(g is not None and bool(torch.isfinite(g).all()) for g in grads),
           "a learned weight got no gradient, or a non-finite one")
    m.train_step(net, cls.defaults(), 0.5)  # the per-step hook runs


def _covering(st, b: int) -> dict[int, int]:
    """Image ``b`` of the state ``st`` (tracking sources): patch -> the real, placed token whose
    source row covers it."""
    p, out = st.n_prefix, {}
    for n in range(st.source.shape[1]):
        if int(st.pos[b, n]) < 0 or (st.pad is not None and not bool(st.pad[b, n])):
            continue
        for j in torch.nonzero(st.source[b, n, p:] > 0).flatten().tolist():
            out[j] = n
    return out


class _Witness:
    """Follows a forward's primitives image by image, from the source map: the value each patch
    had when its token left, and whether any token came to stand for several patches."""

    def __init__(self):
        self.dropped: dict[tuple[int, int], torch.Tensor] = {}
        self.merged = False

    def on_start(self, model, x, st) -> None:
        for prim in st.PRIMITIVES:
            setattr(st, prim, self._wrap(st, getattr(st, prim)))

    def _wrap(self, st, primitive):
        def wrapped(x, *args, **kw):
            was = [_covering(st, b) for b in range(x.shape[0])]
            out = primitive(x, *args, **kw)
            for b, before in enumerate(was):
                now = _covering(st, b)
                for j, n in before.items():
                    if j not in now:
                        self.dropped[(b, j)] = x[b, n].detach().clone()
                self.merged |= len(set(now.values())) < len(now)
            return out

        return wrapped


def grid_as_declared(name: str) -> None:
    """Dense tasks: the last block's map on the full grid holds, at each patch, the token that
    stands for it (itself or its group's) or, once its token left, the value it had then; what
    the method did (drops, merges) is what ``restores_grid`` declares.  Nothing to check for a
    method that declares it cannot (dense tasks refuse it)."""
    from .registry import GridRestore

    how = get_method(name).grid_restore("vit")
    if how is GridRestore.NONE:
        return
    net, x = applied(name), images(2)
    last = backbones.backbone_of(net).depth - 1
    backbones.set_track_source(net, True)
    p = backbones.backbone_of(net).n_prefix
    with torch.no_grad():
        _, (seq,) = net.forward_intermediates(x, indices=[last], output_fmt="NLC", return_prefix_tokens=True)
        witness = _Witness()
        backbones.plan_of(net).on_start.append(witness.on_start)
        (grid,) = net.forward_intermediates(x, indices=[last], intermediates_only=True)
    tokens = torch.cat([seq[1], seq[0]], dim=1) if p else seq                # prefix first, as in the state
    grid, st = grid.flatten(2).transpose(1, 2), backbones.last_state(net)  # [B, N0, C]
    for b in range(x.shape[0]):
        covering = _covering(st, b)
        for j in range(grid.shape[1]):
            want = tokens[b, covering[j]] if j in covering else witness.dropped.get((b, j))
            expect(want is not None and bool(torch.allclose(grid[b, j], want, rtol=0, atol=1e-6)),
                   f"image {b}, patch {j}: the map holds neither the token standing for it nor its value when dropped")
    fills = how in (GridRestore.FILL, GridRestore.FILL_UNMERGE)
    unmerges = how in (GridRestore.UNMERGE, GridRestore.FILL_UNMERGE)
    expect(fills or not witness.dropped, f"restores_grid is {how.value}, but the method dropped tokens")
    expect(unmerges or not witness.merged, f"restores_grid is {how.value}, but the method merged tokens")


CHECKS: tuple[Callable[[str], None], ...] = (
    declaration, shapes_schedule_and_batch, deterministic_and_seeded, bad_parameters_refused,
    restore_gives_the_plain_model, fewer_flops_where_it_reduces, grid_as_declared,
    training_step_reaches_learned_parts)


def applies(check: Callable[[str], None], name: str) -> bool:
    return check is not training_step_reaches_learned_parts or get_method(name).learned


def run_checks(name: str) -> list[dict]:
    """Every check that applies to ``name``: ``{"check", "ok", "message"}`` each."""
    get_method(name)  # unknown names: one line with suggestions
    out = []
    for check in CHECKS:
        if not applies(check, name):
            continue
        try:
            check(name)
            out.append({"check": check.__name__, "ok": True, "message": ""})
        except AssertionError as e:
            out.append({"check": check.__name__, "ok": False, "message": str(e).splitlines()[0] if str(e) else ""})
        except UserError as e:
            out.append({"check": check.__name__, "ok": False, "message": f"refused: {e}"})
    return out
