"""The shared adapter suite: every registered method (built-in or plugin) goes through the same
checks, so a new method gets them for free.

Shapes, the declared token schedule against what the model does, batch consistency (an
image's logits do not depend on the batch it is in), determinism (and seeds), refused bad
parameters, a clean restore, fewer FLOPs where the method says it reduces, and a training
step for learned methods.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_vit
from tokenbench import backbones, measure
from tokenbench.errors import UserError
from tokenbench.registry import FAMILIES, _SOURCES, apply, get_method, load_methods


def _shipped() -> list[str]:
    """Built-in methods and installed plugins (not the toy methods other tests register)."""
    load_methods()
    return sorted(n for n, src in _SOURCES.items() if src)


METHODS = _shipped()


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _model(name: str, **params):
    return apply(tiny_vit(), name, **params)


@pytest.mark.parametrize("name", METHODS)
def test_declaration_is_complete(name):
    cls = get_method(name)
    pnames = [p.name for p in cls.params]
    assert cls.family in FAMILIES and cls.summary and cls.version
    assert cls.knob is None or cls.knob in pnames
    assert cls.seed_param is None or cls.seed_param in pnames
    assert cls.deterministic or cls.seed_param, "a random method must declare its seed parameter"
    assert "vit" in cls.backbones


@pytest.mark.parametrize("name", METHODS)
def test_shapes_schedule_and_batch_consistency(name):
    net = _model(name)
    x = _images(4)
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
    assert y.shape == (4, 10) and torch.isfinite(y).all()
    torch.testing.assert_close(y, alone, rtol=1e-4, atol=1e-4)     # no image depends on its batch
    cls = get_method(name)
    expected = cls().expected_tokens(net, **cls.defaults())
    if expected is not None:
        assert (tokens, tokens_mlp) == (list(expected[0]), list(expected[1]))
    assert len(tokens) == backbones.backbone_of(net).depth


@pytest.mark.parametrize("name", METHODS)
def test_deterministic_and_seeded(name):
    cls = get_method(name)
    x = _images(3, seed=1)
    with torch.no_grad():
        a, b = _model(name)(x), _model(name)(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    if cls.seed_param:
        with torch.no_grad():
            c = _model(name, **{cls.seed_param: 1})(x)
            d = _model(name, **{cls.seed_param: 1})(x)
        torch.testing.assert_close(c, d, rtol=0, atol=0)


@pytest.mark.parametrize("name", METHODS)
def test_bad_parameters_are_refused(name):
    cls = get_method(name)
    with pytest.raises(UserError, match="unknown parameter"):
        cls.validate({"no_such_parameter": 1})
    for p in cls.params:
        if p.min is not None and p.type in ("int", "float", "int_or_list"):
            with pytest.raises(UserError):
                cls.validate({p.name: p.min - 1})
        if p.max is not None and p.type in ("int", "float"):
            with pytest.raises(UserError):
                cls.validate({p.name: p.max + 1})
        if p.type in ("int", "float"):
            with pytest.raises(UserError):
                cls.validate({p.name: "not a number"})


@pytest.mark.parametrize("name", METHODS)
def test_restore_gives_the_plain_model(name):
    plain = tiny_vit()
    net = _model(name)
    x = _images(2)
    backbones.restore(net)
    assert type(net) is type(plain) and not backbones.is_prepared(net)
    assert set(dict(net.named_parameters())) == set(dict(plain.named_parameters()))
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", METHODS)
def test_reducing_settings_count_fewer_flops(name):
    cls = get_method(name)
    dense = measure.flops(tiny_vit())["gflops"]
    got = measure.flops(_model(name))["gflops"]
    if cls.reduces(cls.defaults()):
        assert got < dense
    elif cls.learned:  # untrained, it may keep every token; its scoring may still count
        assert got >= dense * (1 - 1e-6)
    else:
        assert got == pytest.approx(dense, rel=1e-6)


@pytest.mark.parametrize("name", [n for n in METHODS if get_method(n).learned])
def test_training_step_reaches_the_learned_parts(name):
    cls = get_method(name)
    net = _model(name).train()
    teacher = tiny_vit()
    m = cls()
    loss_fn = m.train_setup(net, teacher, cls.defaults(), None)
    x, y = _images(4), torch.arange(4)
    loss = loss_fn(net, x, y)[0] if loss_fn else torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    added = backbones.added_modules(net)
    # a learned method's own modules (attached with backbones.add_module), or, for one that
    # learns through the backbone's weights alone (A-ViT's halting channel), every weight
    learned = [net._modules[a] for a in added] or [net]
    grads = [p.grad for mod in learned for p in mod.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    m.train_step(net, cls.defaults(), 0.5)  # the per-step hook runs
