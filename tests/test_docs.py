"""The documentation site builds with --strict (a broken link or a missing page fails it), and
the README stays short, with the method table `tokenbench list --markdown` writes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("mkdocs")
pytest.importorskip("material")


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=config.parent, capture_output=True, text=True, timeout=300, env=env)


def test_site_builds_strict(tmp_path):
    out = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert out.returncode == 0, out.stderr[-3000:]
    from tokenbench.registry import list_methods

    for m in list_methods():  # one generated page per registered method
        page = (tmp_path / "site" / "methods" / m["name"] / "index.html").read_text()
        assert m["summary"].split(":")[0] in page
    assert (tmp_path / "site" / "reference" / "default" / "index.html").is_file()


def test_a_broken_link_fails_the_build(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# x\n\n[gone](missing.md)\n")
    (tmp_path / "mkdocs.yml").write_text("site_name: x\n")
    out = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert out.returncode != 0 and "missing.md" in out.stderr


def test_readme_is_short_and_lists_every_method(cli):
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    code, table, err = cli("list", "--markdown")
    assert code == 0, err
    assert table.strip() in readme  # regenerate with `tokenbench list --markdown`


def test_the_tutorial_runs_as_written(tmp_path):
    """The example method of docs/adding-a-method.md registers and counts its FLOPs on the embedded model."""
    import json
    import re

    text = (ROOT / "docs" / "adding-a-method.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "halve.py").write_text(code)
    script = ("import halve\nfrom tokenbench.cli.main import main\n"
              "main(['flops', 'default', '--method', 'halve', '--set', 'keep_every=3', '--json'])\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", TOKENBENCH_QUIET="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert res["tokens"][-1] < res["tokens"][0]  # it reduced tokens
