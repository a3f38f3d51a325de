"""Architecture checks on the source, read with ``ast`` (nothing is imported).

Helpers first (reusable by further checks), then the checks and the helpers' own tests.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Optional

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "tokenbench"


def module_files(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Every module of the package, subpackages included: dotted name -> file."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(path: Path, module: str, is_package: bool) -> set[str]:
    """Absolute dotted names that ``path`` imports anywhere (module level, in functions, in
    classes), leaving out ``if TYPE_CHECKING:`` blocks, which never run.

    ``from a import b`` yields ``a.b`` (``b`` may be a module, or a name defined in ``a``).
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module.split(".") if is_package else module.split(".")[:-1]  # the importer's package
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                parts = base + (node.module.split(".") if node.module else [])
            else:
                parts = node.module.split(".")
            names.update(".".join(parts + [a.name]) for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


@functools.lru_cache(maxsize=None)
def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, frozenset[str]]:
    """module -> the package's own modules it imports (its deepest known module per import)."""
    files = module_files(package_dir)
    graph = {}
    for module, path in files.items():
        deps = set()
        for name in imported_names(path, module, path.name == "__init__.py"):
            parts = name.split(".")
            while parts and ".".join(parts) not in files:
                parts.pop()
            # `a.b` where b is a name defined in module a: the edge goes to a
            target = ".".join(parts)
            if target and target != module:
                deps.add(target)
        graph[module] = frozenset(deps)
    return graph


def find_cycle(graph: dict[str, frozenset[str]]) -> Optional[list[str]]:
    """One import cycle as ``[a, b, ..., a]``, or None where the graph has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def dfs(node: str) -> Optional[list[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = dfs(start)
            if found:
                return found
    return None


# --------------------------------------------------------------------------- checks

def test_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# A family of modules is a package, never a set of flat modules sharing a prefix; a package's
# __init__ holds its docstring only (each name is imported from the module that defines it).
FAMILY_PACKAGES = {"cli": "cli_", "report": "report_", "figures": "figure_", "visual": "visual_",
                   "analysis": "analysis_"}
DOCSTRING_ONLY_INITS = (*FAMILY_PACKAGES, "measure")
DATA_FOLDERS = ("recipes",)


def flat_family_modules(package_dir: Path = PACKAGE_DIR) -> list[str]:
    return sorted(p.name for p in package_dir.glob("*.py")
                  if any(p.stem == family or p.stem.startswith(prefix) for family, prefix in FAMILY_PACKAGES.items()))


def init_statements(path: Path) -> list[str]:
    """What a package's __init__ does besides its docstring (and ``from __future__``)."""
    tree = ast.parse(path.read_text())
    body = tree.body[1:] if tree.body and isinstance(tree.body[0], ast.Expr) else tree.body
    return [ast.unparse(n) for n in body if not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]


def test_families_are_packages_and_their_inits_export_nothing():
    assert flat_family_modules() == []
    for family in DOCSTRING_ONLY_INITS:
        init = PACKAGE_DIR / family / "__init__.py"
        assert init.is_file(), family
        assert init_statements(init) == [], family


def test_data_folders_hold_no_code_and_shadow_no_module():
    modules = module_files()
    for folder in DATA_FOLDERS:
        assert not list((PACKAGE_DIR / folder).rglob("*.py")), folder
        assert f"tokenbench.{folder}" not in modules
    assert (PACKAGE_DIR / "recipes" / "sweeps" / "default.toml").is_file()
    assert (PACKAGE_DIR / "recipes" / "figures" / "published.csv").is_file()
    # every folder under tokenbench/ is a package or a data folder (a name used twice would mislead)
    folders = {p.name for p in PACKAGE_DIR.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert all((PACKAGE_DIR / f / "__init__.py").is_file() or f in DATA_FOLDERS for f in folders), folders


# --------------------------------------------------------------------------- the helpers' own tests

def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None       # a diamond is fine
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y"}}) == ["y", "y"]


def test_import_graph_sees_function_level_and_subpackage_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .deep import thing\n")
    (pkg / "sub" / "deep.py").write_text("def f():\n    from ..top import g\n")
    (pkg / "top.py").write_text("import pkg.sub\nfrom typing import TYPE_CHECKING\n"
                                "if TYPE_CHECKING:\n    from .other import T\n"
                                "class C:\n    def m(self):\n        from pkg import other\n")
    (pkg / "other.py").write_text("from . import top\n")
    graph = import_graph(pkg)
    assert graph == {"pkg": set(), "pkg.sub": {"pkg.sub.deep"}, "pkg.sub.deep": {"pkg.top"},
                     "pkg.top": {"pkg.sub", "pkg.other"}, "pkg.other": {"pkg.top"}}
    assert find_cycle(graph) == ["pkg.other", "pkg.top", "pkg.other"]


def test_every_package_and_data_folder_is_installed():
    """pyproject lists each package and each recipes folder (a package left out is missing from a wheel)."""
    import tomllib

    cfg = tomllib.loads((PACKAGE_DIR.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {".".join(p.relative_to(PACKAGE_DIR.parent).parts[:-1]) for p in PACKAGE_DIR.rglob("__init__.py")}
    packages |= {f"tokenbench.{folder}.{p.name}" for folder in DATA_FOLDERS for p in (PACKAGE_DIR / folder).iterdir()
                 if p.is_dir()}
    assert packages - {"tokenbench.methods"} <= set(cfg["packages"]), packages - set(cfg["packages"])
    assert "tokenbench.methods" in cfg["packages"]


def test_the_family_checks_can_fail(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "report_extra.py").write_text("")
    (pkg / "cli.py").write_text("")
    (pkg / "reporting.py").write_text("")
    assert flat_family_modules(pkg) == ["cli.py", "report_extra.py"]
    init = pkg / "__init__.py"
    init.write_text('"""doc"""\nfrom __future__ import annotations\nfrom .report_extra import x  # noqa\n')
    assert init_statements(init) == ["from .report_extra import x"]


@pytest.mark.parametrize("module", ["tokenbench.models", "tokenbench.train"])
def test_import_graph_reads_the_real_package(module):
    graph = import_graph()
    assert module in graph and "tokenbench.errors" in graph[module]
