"""Every entry point of a reduced model runs the reduced model, for every family and every
registered method that declares the family: ``forward``, ``forward_features`` +
``forward_head``, ``forward_intermediates`` and a ``features_only`` net built over the model.
A spatial map (``NCHW``) is on the full grid at every stage whatever the method did to the
tokens (every built-in method declares how); at a method's no-reduction setting the maps equal
the dense model's.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_vit
from tokenbench import backbones
from tokenbench.errors import UserError
from tokenbench.registry import _SOURCES, GridRestore, apply, get_method, load_methods


def tiny_convnext():
    from timm.models.convnext import ConvNeXt

    torch.manual_seed(0)
    net = ConvNeXt(depths=(1, 1, 4, 1), dims=(8, 16, 32, 64), num_classes=10)
    net.pretrained_cfg = {"input_size": (3, 64, 64)}
    return net.eval()


def tiny_swin():
    import timm

    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=64, embed_dim=16, depths=(1, 1, 4, 1),
                             num_heads=(1, 1, 2, 2), window_size=2, num_classes=10).eval()


FAMILIES = {"vit": (tiny_vit, 32), "convnext": (tiny_convnext, 64), "swin": (tiny_swin, 64)}


def _cases() -> list[tuple[str, str]]:
    load_methods()
    shipped = sorted(n for n, src in _SOURCES.items() if src)
    return [(fam, name) for fam in FAMILIES for name in shipped if fam in get_method(name).backbones]


def _images(size: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(5))


def _identity_params(name: str):
    """Parameters at which the method removes no token (its knob at a bound), or None."""
    cls = get_method(name)
    params = cls.defaults()
    if not cls.reduces(params):
        return params
    if cls.knob is None:
        return None
    p = cls.param(cls.knob)
    for v in (p.min, p.max, 0, 1):
        if v is None:
            continue
        try:
            trial = {**params, cls.knob: p.parse(v, name)}
        except UserError:
            continue
        if not cls.reduces(trial):
            return trial
    return None


OUT = {"vit": (3, 7, 11), "convnext": (0, 1, 2, 3), "swin": (0, 1, 2, 3)}


def _features_only(net, family: str):
    """timm's ``features_only`` net over ``net`` (the model left whole), its maps as [B, C, H, W]."""
    from timm.models._features import FeatureGetterNet, FeatureListNet

    if family == "vit":
        return FeatureGetterNet(net, out_indices=OUT[family], prune=False)
    feats = FeatureListNet(net, out_indices=OUT[family], flatten_sequential=True)
    if family == "swin":  # timm's Swin stages hand on [B, H, W, C] maps
        return lambda x: [t.permute(0, 3, 1, 2) for t in feats(x)]
    return feats


def _taken(maps: list, family: str) -> list:
    return [maps[i] for i in OUT[family]]


def _untouched(net) -> bool:
    """Whether the last forward kept every token of every image, unpadded and unmerged."""
    st = backbones.last_state(net)
    return (st.tokens_mlp == backbones.backbone_of(net).dense_tokens()
            and (st.pad is None or bool(st.pad.all())) and (st.size is None or bool((st.size == 1).all())))


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,name", _cases())
def test_every_entry_point_runs_the_reduced_model(family, name):
    build, size = FAMILIES[family]
    net = apply(build(), name)
    x = _images(size)
    with torch.no_grad():
        logits = net(x)
        counts = list(backbones.last_state(net).tokens_mlp)
        feats = net.forward_features(x)
        _close(net.forward_head(feats), logits)
        if family == "vit":
            final, inter = net.forward_intermediates(x, output_fmt="NLC", norm=True)
            _close(final, feats)
            _close(inter[-1], feats[:, backbones.backbone_of(net).n_prefix:])
        else:
            final, inter = net.forward_intermediates(x)
            _close(final, feats)
            _close(_features_only(net, family)(x)[-1], inter[-1])
        assert list(backbones.last_state(net).tokens_mlp) == counts   # the entry points ran the same blocks


@pytest.mark.parametrize("family,name", _cases())
def test_maps_are_on_the_full_grid_after_reduction_and_dense_without_it(family, name):
    """At the defaults: the dense model's shapes at every stage (features_only agreeing); at no
    reduction: the dense maps."""
    _check_grid(family, name, get_method(name).defaults())
    params = _identity_params(name)
    if params is None:
        pytest.skip(f"{name} has no setting that removes no token")
    _check_dense_at_no_reduction(family, name, params)


def _check_grid(family: str, name: str, params: dict) -> None:
    build, size = FAMILIES[family]
    net, ref = apply(build(), name, **params), build()
    x = _images(size)
    with torch.no_grad():
        want = ref.forward_intermediates(x, intermediates_only=True)
        assert get_method(name).grid_restore(family) is not GridRestore.NONE
        got = net.forward_intermediates(x, intermediates_only=True)
        assert [t.shape for t in got] == [t.shape for t in want]
        for a, b in zip(_taken(got, family), _features_only(net, family)(x), strict=True):
            _close(a, b)


def _check_dense_at_no_reduction(family: str, name: str, params: dict) -> None:
    build, size = FAMILIES[family]
    net, ref = apply(build(), name, **params), build()
    x = _images(size)
    with torch.no_grad():
        net(x)
        if not _untouched(net):  # untrained thresholds that still merge, fast paths at every keep rate
            pytest.skip(f"{name} changes the tokens on {family} even at {params}")
        want = ref.forward_intermediates(x, intermediates_only=True)
        for got, dense in zip(net.forward_intermediates(x, intermediates_only=True), want, strict=True):
            _close(got, dense)
        for got, dense in zip(_features_only(net, family)(x), _taken(want, family), strict=True):
            _close(got, dense)
