"""The method registry: discovery, declarations, validation, third-party plugins."""

import json
import sys
import textwrap

import pytest
import torch

from conftest import tiny_vit
from tokenbench import registry, vit
from tokenbench.errors import UserError
from tokenbench.backbones import last_state

BUILTIN = {"none", "dynamicvit", "tome", "evit", "topk", "random"}


def test_builtin_methods_listed_with_parameters(cli):
    code, out, err = cli("list", "--json")
    assert code == 0, err
    methods = {m["name"]: m for m in json.loads(out)["methods"]}
    assert BUILTIN <= set(methods)
    assert [p["name"] for p in methods["tome"]["params"]] == ["r", "prop_attn"]
    assert [p["name"] for p in methods["evit"]["params"]] == ["keep_rate", "fuse_token"]
    for name in ("dynamicvit", "evit", "topk", "random"):
        kr = methods[name]["params"][0]
        assert kr["name"] == "keep_rate" and kr["type"] == "float" and kr["range"] == "(0, 1]" and kr["help"]
    assert methods["dynamicvit"]["learned"] and not methods["topk"]["learned"]
    code, out, err = cli("list")
    assert code == 0 and "keep_rate" in out
    code, out, err = cli("list", "tome")
    assert code == 0 and "prop_attn" in out


@pytest.mark.parametrize("name,params,msg", [
    ("topk", {"keep_rate": 0}, "out of range"),
    ("topk", {"keep_rate": 1.5}, "out of range"),
    ("evit", {"keep_rate": -1}, "out of range"),
    ("tome", {"r": -2}, "out of range"),
    ("tome", {"r": "many"}, "must be an integer"),
    ("tome", {"rr": 3}, "did you mean 'r'"),
    ("evit", {"fuse_token": "perhaps"}, "must be a bool"),
    ("none", {"keep_rate": 0.5}, "takes no parameters"),
])
def test_bad_parameters_rejected(name, params, msg):
    with pytest.raises(UserError, match=msg):
        registry.apply(tiny_vit(), name, **params)


def test_apply_keeps_parameters_and_restore_gives_timm_back():
    m = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
    registry.apply(m, "topk", keep_rate=0.5)
    with torch.no_grad():
        assert not torch.allclose(m(x), ref)
    assert set(m.state_dict()) == set(tiny_vit().state_dict())
    vit.restore(m)
    with torch.no_grad():
        assert torch.equal(m(x), ref)


def test_refuses_non_vit_models():
    import timm

    cnn = timm.create_model("resnet18", num_classes=10)
    with pytest.raises(UserError, match="VisionTransformer"):
        registry.apply(cnn, "tome", r=2)
    no_cls = tiny_vit(class_token=False, global_pool="avg")
    with pytest.raises(UserError, match="class token"):
        registry.apply(no_cls, "evit", keep_rate=0.7)
    registry.apply(no_cls, "tome", r=2)  # ToMe needs none


PLUGIN = textwrap.dedent('''
    import torch
    from tokenbench import vit
    from tokenbench.registry import Method, Param

    class Halve(Method):
        name = "halve"
        summary = "Drop every second patch token before one block."
        params = (Param("site", "int", 6, "block index", min=1, max=11),)

        def apply(self, model, site=6):
            plan = vit.prepare(model, self.name)
            def pre(block, x, state):
                p = state.n_prefix
                keep = torch.cat([torch.arange(p), torch.arange(p, x.shape[1], 2)]).to(x.device)
                return state.keep(x, keep.expand(x.shape[0], -1))
            plan.pre[site] = pre
            return model
''')


def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch, cli):
    """A third-party package adds a method through the `tokenbench.methods` entry points."""
    (tmp_path / "tb_plugin_halve.py").write_text(PLUGIN)
    dist = tmp_path / "tb_plugin_halve-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tb-plugin-halve\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tokenbench.methods]\nhalve = tb_plugin_halve:Halve\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_LOADED", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))   # no plugin left behind for later tests
    assert "halve" in registry.load_methods()
    m = registry.apply(tiny_vit(), "halve", site=4)
    m(torch.randn(1, 3, 32, 32))
    assert last_state(m).tokens == [65] * 4 + [33] * 8
    code, out, err = cli("flops", "deit_tiny_patch16_224", "--img-size", "64", "--method", "halve", "--json")
    assert code == 0, err
    assert json.loads(out)["tokens"] == [17] * 6 + [9] * 6
    code, out, err = cli("check", "halve")                              # the shared adapter checks, on a plugin
    assert code == 0 and "halve: 6 of 6 checks passed" in out, out + err


def test_declared_schedules_match_what_runs():
    """Every built-in method's expected_tokens equals what a forward records."""
    from tokenbench.measure import token_counts

    for name in BUILTIN:
        cls = registry.get_method(name)
        m = tiny_vit()
        registry.apply(m, name)
        exp = cls().expected_tokens(m, **cls.defaults())
        if exp is None:
            continue
        got = token_counts(m)
        assert got[0] == exp[0] and got[1] == exp[1], name
