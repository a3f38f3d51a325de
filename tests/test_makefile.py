"""`make setup` on a machine without CUDA installs torch's CPU build from CPU_TORCH_INDEX."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def _install_line(tmp_path, *assignments) -> str:
    venv = tmp_path / "venv"
    out = subprocess.run(["make", "-n", "-B", f"{venv}/.installed", f"VENV={venv}", *assignments], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return next(ln for ln in out.splitlines() if "torch==" in ln)


def test_cpu_build_without_cuda_only(tmp_path):
    idx = "CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu"
    assert "--index-url https://download.pytorch.org/whl/cpu torch==" in _install_line(tmp_path, idx, "HAS_CUDA=")
    assert "--index-url" not in _install_line(tmp_path, idx, "HAS_CUDA=yes")
    assert "--index-url" not in _install_line(tmp_path, "HAS_CUDA=")         # no CPU index: the pins as before


def test_make_test_installs_chromium_and_docs_build_strict():
    """`make test` installs Chromium (the report's browser test) where apt exists; `make docs` builds strict."""
    test = subprocess.run(["make", "-n", "test", "STAMP=/dev/null"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60).stdout
    assert "apt-get install -y -qq chromium" in test
    docs = subprocess.run(["make", "-n", "docs", "STAMP=/dev/null"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60).stdout
    assert "mkdocs build --strict" in docs
