"""The method registry: discovery, declarations, validation, third-party plugins."""

import json
import sys
import textwrap

import pytest
import torch

from conftest import tiny_vit
from tokenbench import registry
from tokenbench.errors import UserError
from tokenbench.backbones import last_state, restore

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
    restore(m)
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
    from tokenbench.backbones import prepare
    from tokenbench.registry import Method, Param

    class Halve(Method):
        name = "halve"
        summary = "Drop every second patch token before one block."
        params = (Param("site", "int", 6, "block index", min=1, max=11),)

        def apply(self, model, site=6):
            plan = prepare(model, self.name)
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
    assert code == 0 and "halve: 7 of 7 checks passed" in out, out + err


def test_declared_schedules_match_what_runs():
    """Every built-in method's expected_tokens equals what a forward records."""
    from tokenbench.measure.flop_count import token_counts

    for name in BUILTIN:
        cls = registry.get_method(name)
        m = tiny_vit()
        registry.apply(m, name)
        exp = cls().expected_tokens(m, **cls.defaults())
        if exp is None:
            continue
        got = token_counts(m)
        assert got[0] == exp[0] and got[1] == exp[1], name


def test_register_refuses_a_name_taken_by_another_class(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry.load_methods()))

    class Impostor(registry.Method):
        name = "tome"

    with pytest.raises(UserError, match="'tome' is registered twice"):
        registry.register(Impostor)
    assert registry.get_method("tome").__module__ == "tokenbench.methods.tome"
    registry.register(registry.get_method("topk"))  # the same class again (a reloaded module): kept


def test_a_plugin_that_fails_to_import_is_reported_and_the_others_load(tmp_path, monkeypatch):
    (tmp_path / "tb_plugin_halve.py").write_text(PLUGIN)
    (tmp_path / "tb_plugin_broken.py").write_text("import tb_no_such_dependency\n")
    dist = tmp_path / "tb_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tb-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tokenbench.methods]\nbroken = tb_plugin_broken:Broken\n"
                                           "halve = tb_plugin_halve:Halve\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_LOADED", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))
    with pytest.warns(UserWarning) as caught:
        names = registry.load_methods()
    assert "halve" in names and "tome" in names
    lines = [str(w.message) for w in caught]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "'broken'" in lines[0] and "ModuleNotFoundError" in lines[0] and "tb_no_such_dependency" in lines[0]


def test_a_method_file_that_fails_to_import_is_named_with_its_line_and_the_others_run(tmp_path, monkeypatch):
    import tokenbench.methods as methods_pkg

    (tmp_path / "tb_broken_dep.py").write_text('"""x"""\nimport os\nimport tb_no_such_dependency\n')
    (tmp_path / "tb_broken_syntax.py").write_text("def f(:\n    pass\n")
    monkeypatch.setattr(methods_pkg, "__path__", [*methods_pkg.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "methods_dir", lambda: tmp_path)
    monkeypatch.setattr(registry, "_LOADED", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_BROKEN", {})
    with pytest.warns(UserWarning) as caught:
        names = registry.load_methods()
    assert "tome" in names                                   # the others still load
    lines = sorted(str(w.message) for w in caught)
    assert len(lines) == 2 and not any("\n" in ln for ln in lines)
    assert "tb_broken_dep.py does not import: ModuleNotFoundError" in lines[0] and "(line 3)" in lines[0]
    assert "tb_broken_syntax.py does not import: SyntaxError: invalid syntax (line 1)" in lines[1]
    with pytest.raises(UserError, match="tb_broken_dep.py does not import"):   # not 'unknown method'
        registry.get_method("tb_broken_dep")


def test_every_method_file_of_the_project_imports():
    registry.load_methods()
    assert not registry._BROKEN


def _toy(knob_param: registry.Param, **attrs) -> type:
    def apply(self, model, **p):
        from tokenbench.backbones import prepare  # (the method itself checks nothing)

        prepare(model, self.name)
        return model

    body = {"name": "tb_toy", "params": (knob_param,), "knob": knob_param.name, "apply": apply, **attrs}
    return type("Toy", (registry.Method,), body)


def test_reduces_by_default_unless_the_knob_is_at_its_identity():
    keep = _toy(registry.Param("keep_rate", "float", 0.7, "kept", min=0.0, max=1.0, identity=1.0))
    assert keep.reduces({"keep_rate": 0.5}) and not keep.reduces({"keep_rate": 1.0})
    merge = _toy(registry.Param("r", "int_or_list", 4, "merged", min=0, identity=0))
    assert merge.reduces({"r": 2}) and merge.reduces({"r": [0, 1]})
    assert not merge.reduces({"r": 0}) and not merge.reduces({"r": [0, 0, 0]})
    assert _toy(registry.Param("k", "int", 4, "no identity declared")).reduces({"k": 0})
    assert not _toy(registry.Param("k", "int", 4, "x", identity=4), family="none").reduces({"k": 0})
    for name, cls in registry.load_methods().items():  # the built-ins: at the identity, nothing is removed
        ident = cls.param(cls.knob).identity if cls.knob else None
        if ident is not None and name != "diffrate":
            assert not cls.reduces({**cls.defaults(), cls.knob: ident}), name
            assert cls.reduces(cls.defaults()), name


def test_the_harness_refuses_a_model_without_the_class_token_a_method_declares(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry.load_methods()))

    toy = _toy(registry.Param("keep_rate", "float", 0.5, "kept", min=0.0, max=1.0, identity=1.0),
               needs_class_token=True)
    registry.register(toy)
    with pytest.raises(UserError, match="tb_toy needs a class token"):
        registry.apply(tiny_vit(class_token=False, global_pool="avg"), "tb_toy")
    registry.apply(tiny_vit(), "tb_toy")
    # needed on some families only (DynamicViT's journal version on ConvNeXt has none)
    monkeypatch.setattr(toy, "needs_class_token", ("swin",))
    registry.apply(tiny_vit(class_token=False, global_pool="avg"), "tb_toy")
    monkeypatch.setattr(toy, "needs_class_token", ("vit",))
    with pytest.raises(UserError, match="tb_toy needs a class token"):
        registry.apply(tiny_vit(class_token=False, global_pool="avg"), "tb_toy")


def test_convert_checkpoint_is_a_declared_hook(monkeypatch):
    from tokenbench.checkpoint import official_layout

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry.load_methods()))
    assert registry.Method().convert_checkpoint(tiny_vit(), {}) is None
    m = registry.apply(tiny_vit(), "topk")  # no conversion of its own: the backbone's
    sd = m.state_dict()
    assert official_layout(m, sd).keys() == sd.keys()

    def convert(self, model, state):
        return {k.removeprefix("official."): v for k, v in state.items()}

    registry.register(_toy(registry.Param("k", "int", 1, "x"), convert_checkpoint=convert))
    m = registry.apply(tiny_vit(), "tb_toy")
    assert official_layout(m, {"official." + k: v for k, v in sd.items()}).keys() == sd.keys()


def test_one_import_name_per_method_file():
    from pathlib import Path

    for name, cls in registry.load_methods().items():
        if registry._SOURCES.get(name, "").endswith(".py"):
            assert cls.__module__ == "tokenbench.methods." + registry._SOURCES[name].rsplit("/", 1)[1][:-3]
    assert not [m for m in sys.modules if m.startswith(("tokenbench_methods", "tokenbench.builtin_methods"))]
    import tokenbench

    assert not (Path(tokenbench.__file__).parent / "vit.py").exists()  # the ViT surgery is tokenbench.backbones
    assert not hasattr(registry.Method, "search_param")


def test_installs_map_methods_to_the_one_package_name():
    """pyproject ships ``methods/`` as ``tokenbench.methods`` (and nothing else under another name)."""
    import tomllib
    from pathlib import Path

    cfg = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"] == {"tokenbench.methods": "methods"}
    assert "tokenbench.methods" in cfg["packages"] and not [p for p in cfg["packages"] if "builtin" in p]


def _contract_fields() -> set:
    return {k for k in registry.Method.__annotations__}


def test_every_declared_field_and_hook_of_the_contract_is_documented():
    """Each class attribute of ``Method`` and each hook is named in its docstring and in the
    method author's page."""
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "adding-a-method.md").read_text()
    hooks = {"apply", "expected_tokens", "reduces", "convert_checkpoint", "train_setup", "param_groups",
             "train_step"}
    for name in _contract_fields() | hooks:
        assert f"``{name}``" in registry.Method.__doc__ or f":meth:`{name}`" in registry.Method.__doc__, name
        assert f"`{name}`" in page, name


def test_the_harness_reads_contract_fields_as_declared_never_with_getattr():
    """``getattr(cls, "family", None)`` would hide a field missing from the contract: every field
    the harness reads is declared on ``Method`` and read as an attribute."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    fields = _contract_fields()
    found = []
    for f in [*root.joinpath("tokenbench").rglob("*.py"), *root.joinpath("docs").rglob("*.py"),
              root / "bench.py", root / "bench_gpu.py"]:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr") \
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in fields:
                found.append(f"{f.relative_to(root)}:{node.lineno} {node.args[1].value}")
    assert not found, found
