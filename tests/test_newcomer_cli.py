"""Issue 13, the command line a newcomer meets: compact schedules as input (item 10),
``--debug`` anywhere (item 11), run directories that are never overwritten (item 5),
quiet install and API (item 8), cheap checks and defaults (item 12)."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenbench.registry import get_method, parse_set
from tokenbench.report import _parse_selector
from tokenbench.sweep import fmt_value

TINY = "tb_tiny_newcomer"


# --------------------------------------------------------------------------- item 10: r=[3x3,2x9]

def test_compact_schedule_accepted_by_set_and_compare():
    want = [3, 3, 3] + [2] * 9
    assert parse_set(["r=[3x3,2x9]"]) == {"r": want}
    assert parse_set(["r=[5,4x11]"])["r"] == [5] + [4] * 11
    assert get_method("tome").validate(parse_set(["r=[3x3,2x9]"]))["r"] == want
    assert _parse_selector("tome:r=[3x3,2x9],prop_attn=true") == ("tome", {"r": want, "prop_attn": True})
    # what is not a schedule stays a string, for the method's own validation to refuse
    assert parse_set(["r=[3x,2]"])["r"] == "[3x,2]"
    assert parse_set(["name=x3"])["name"] == "x3"


@given(st.one_of(st.lists(st.integers(0, 40), max_size=14),
                 st.lists(st.sampled_from([0.5, 0.7, 0.25, 1.0]), max_size=6),
                 st.integers(0, 100), st.sampled_from([0.7, 0.48, 1.0])))
def test_printed_values_read_back(value):
    """Whatever a table prints (fmt_value) --set and compare read back as the same value."""
    printed = fmt_value(value)
    assert parse_set([f"k={printed}"])["k"] == value
    assert _parse_selector(f"tome:k={printed}")[1]["k"] == value


# --------------------------------------------------------------------------- item 11: --debug anywhere

@pytest.mark.parametrize("where", ["first", "after the command", "last"])
def test_debug_works_where_a_user_appends_it(where):
    import traceback

    from tokenbench.cli import main
    from tokenbench.errors import UserError

    args = ["flops", "default", "-m", "tome", "-s", "r=-1"]
    args = {"first": ["--debug"] + args, "after the command": args[:1] + ["--debug"] + args[1:],
            "last": args + ["--debug"]}[where]
    with pytest.raises(UserError) as exc:
        main(args)
    tb = "".join(traceback.format_exception(exc.value))
    assert tb.startswith("Traceback") and "r=-1 is out of range" in tb


def test_without_debug_the_error_is_one_line(cli):
    code, out, err = cli("flops", "default", "-m", "tome", "-s", "r=-1")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


# --------------------------------------------------------------------------- item 8: a quiet install and API

def test_pyproject_gives_setuptools_nothing_to_warn_about():
    """The license is an SPDX string (a table is deprecated) and every folder of files under
    tokenbench/ is a listed package (else setuptools warns "Package would be ignored")."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = tomllib.loads((root / "pyproject.toml").read_text())
    assert isinstance(cfg["project"]["license"], str)
    packages = set(cfg["tool"]["setuptools"]["packages"])
    data = cfg["tool"]["setuptools"].get("package-data", {})
    for d in (root / "tokenbench").iterdir():
        if d.is_dir() and d.name != "__pycache__" and any(f.is_file() for f in d.iterdir()):
            name = f"tokenbench.{d.name}"
            assert name in packages, f"{name} missing from [tool.setuptools] packages"
            shipped = {f.name for pat in data.get(name, []) for f in d.glob(pat)}
            assert shipped >= {f.name for f in d.iterdir() if f.is_file()}, f"{name}: files not in package-data"


def test_python_api_prints_no_third_party_notices():
    """flops (fvcore: torch.jit deprecation) and throughput (torch.utils.benchmark: "No CUDA
    runtime is found") leave stderr empty, even with every warning shown."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import tokenbench\n"
            "m, _ = tokenbench.load('default')\n"
            "tokenbench.flops(m)\n"
            "tokenbench.throughput(m, batch_size=1, min_run_time=0.01, warmup_s=0.0, latency=False, threads=1)\n"
            "import warnings; warnings.warn('still shown', UserWarning)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "still shown" in lines[0], p.stderr  # other warnings still pass
