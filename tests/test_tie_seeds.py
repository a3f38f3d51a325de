"""A method whose seed only breaks ties (dpcknn) is measured at one seed, and the sweep says so."""

import json

from tokenbench.registry import get_method

from conftest import register_tiny_timm

TINY = register_tiny_timm("tiny_vit_tie_seeds")


def test_dpcknn_declares_its_seed_breaks_ties_only():
    assert get_method("dpcknn").seed_breaks_ties and not get_method("random").seed_breaks_ties


def test_sweep_measures_a_tie_breaking_seed_once_and_says_so(cli, tmp_path):
    code, out, err = cli("run", "--model", TINY, "-m", "dpcknn", "-m", "random", "--set", "keep_rate=0.7",
                         "--measure", "flops", "--out", str(tmp_path / "o"), "--dry-run", "--json")
    assert code == 0, err
    runs = json.loads(out)["runs"]
    assert [r["params"]["seed"] for r in runs if r["method"] == "dpcknn"] == [0]
    assert sorted(r["params"]["seed"] for r in runs if r["method"] == "random") == [0, 1, 2]
    assert "note: dpcknn: its seed only breaks exact ties" in err and "random:" not in err
