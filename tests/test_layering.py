"""The two layering rules, checked on the source:

- no module outside ``tokenbench/backbones/`` (the harness and the method files in
  ``methods/``) reads a model's insides (an attribute of a ViT, ConvNeXt or Swin model);
- no harness module names a method or a method's parameter (what differs between methods is
  read from their declarations).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tokenbench"
METHODS = PACKAGE.parent / "methods"
# Attributes of timm's VisionTransformer, ConvNeXt and SwinTransformer (and their blocks) only
# a backbone may read.
MODEL_INSIDES = {"blocks", "embed_dim", "patch_embed", "num_prefix_tokens", "cls_token", "pos_embed",
                 "fc1", "attn_pool", "norm_pre", "grid_size", "global_pool", "dist_token", "reg_token",
                 "downsample", "conv_dw", "feature_info", "norm1", "norm2", "qkv", "shift_size", "window_size"}
# Family attributes whose names also mean something else (``TokenState.stages``, ``Path.stem``):
# counted where they are read from a model.
MODEL_ONLY_INSIDES = {"stages", "layers", "stem", "head"}
MODEL_NAMES = {"model", "net", "teacher", "student", "owner", "m"}
# Words the harness uses for its own concepts, whichever method also names a parameter so.
HARNESS_WORDS = {"seed", "ratio", "target", "limit", "threshold", "search", "prune"}


def harness_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py")
                  if "backbones" not in p.relative_to(PACKAGE).parts
                  and p.relative_to(PACKAGE).parts[0] != "methods")


def method_files() -> list[Path]:
    return sorted(METHODS.glob("*.py"))


def _names_a_model(node: ast.AST) -> bool:
    """``model``, ``net``, ..., or ``<anything>.model``."""
    return (isinstance(node, ast.Name) and node.id in MODEL_NAMES) or \
        (isinstance(node, ast.Attribute) and node.attr == "model")


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body:
            first = n.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def model_attribute_reads(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    hits = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and not isinstance(n.ctx, ast.Store) and (n.attr in MODEL_INSIDES or
                                             (n.attr in MODEL_ONLY_INSIDES and _names_a_model(n.value))):
            hits.append(f"{path.name}:{n.lineno} .{n.attr}")
        if isinstance(n, ast.Call) and getattr(n.func, "id", "") in ("getattr", "hasattr", "setattr") \
                and len(n.args) > 1 and isinstance(n.args[1], ast.Constant) and n.args[1].value in MODEL_INSIDES:
            hits.append(f"{path.name}:{n.lineno} {n.func.id}(..., {n.args[1].value!r})")
    return hits


def method_names_used(path: Path, methods: set[str], params: set[str]) -> list[str]:
    """String constants naming a method or a parameter, outside docstrings.  A one-letter
    parameter name (ToMe's ``r``) counts only where it indexes or names something
    (``p["r"]``, ``p.get("r")``, a dict key), not as, e.g., a LaTeX column letter."""
    tree = ast.parse(path.read_text())
    docs = _docstrings(tree)
    keyish: set[int] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Subscript):
            keyish.add(id(n.slice))
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("get", "pop") and n.args:
            keyish.add(id(n.args[0]))
        elif isinstance(n, ast.Dict):
            keyish.update(id(k) for k in n.keys if k is not None)
        elif isinstance(n, ast.Compare):
            keyish.update(id(c) for c in [n.left, *n.comparators])
    hits = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            v = n.value
            if v in methods or (v in params and (len(v) > 1 or id(n) in keyish)):
                hits.append(f"{path.name}:{n.lineno} {v!r}")
    return hits


@pytest.mark.parametrize("path", harness_modules() + method_files(), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_model_insides_outside_the_backbones(path):
    assert model_attribute_reads(path) == []


@pytest.mark.parametrize("path", harness_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_method_names_in_the_harness(path):
    from tokenbench.registry import _SOURCES, load_methods

    reg = load_methods()
    shipped = {n for n, s in _SOURCES.items() if s}
    # "none" is the dense baseline every comparison needs (the contract's own name for it);
    # "seed" is also the data subset's seed, "ratio" a FLOPs search's achieved ratio, "prune" the
    # command that removes superseded records (harness
    # words that a method may also use as a parameter name).
    names = {n for n in shipped if n != "none"}
    params = {p.name for n in shipped for p in (*reg[n].params, *reg[n].train_params)} - HARNESS_WORDS
    assert method_names_used(path, names, params) == []


def test_the_checks_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('def f(model, p):\n    """keep_rate in a docstring is fine"""\n'
                   '    return len(model.blocks), p["r"], p.get("keep_rate"), "tome", "{r}".format(r=1)\n')
    assert model_attribute_reads(bad) == ["bad.py:3 .blocks"]
    family = tmp_path / "family.py"
    family.write_text("def f(model, st, path):\n    return model.stages, self.model.layers[0].downsample, st.stages, path.stem\n")
    assert sorted(model_attribute_reads(family)) == ["family.py:2 .downsample", "family.py:2 .layers", "family.py:2 .stages"]
    assert sorted(method_names_used(bad, {"tome"}, {"r", "keep_rate"})) == [
        "bad.py:3 'keep_rate'", "bad.py:3 'r'", "bad.py:3 'tome'"]


def test_the_checks_read_every_family_package():
    """The rules above cover the subpackages, not only the top-level modules."""
    checked = {p.relative_to(PACKAGE).parts[0] for p in harness_modules()}
    assert {"cli", "report", "figures", "visual", "analysis", "measure", "sweep"} <= checked
    assert "backbones" not in checked and "methods" not in checked
