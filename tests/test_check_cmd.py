"""`tokenbench check METHOD` runs the shared adapter checks on one method, a plugin included."""

import json

import pytest

from tokenbench import registry


@pytest.fixture
def dense_claim(monkeypatch):
    registry.load_methods()
    base = registry.get_method("topk")

    class DenseClaim(base):
        """top-k pruning that declares the dense schedule whatever its keep rate."""

        name = "dense_claim_check"

        def expected_tokens(self, model, **params):
            return super().expected_tokens(model, **{**params, "keep_rate": 1.0})

    monkeypatch.setitem(registry._REGISTRY, DenseClaim.name, DenseClaim)
    return DenseClaim.name


def test_check_passes_a_sound_method(cli):
    code, out, err = cli("check", "topk", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["passed"] and len(res["checks"]) == 7 and all(c["ok"] for c in res["checks"])
    code, out, err = cli("check", "dynamicvit", "--json")
    assert code == 0 and len(json.loads(out)["checks"]) == 8                # learned: the training step too


def test_check_names_what_a_faulty_method_gets_wrong(cli, dense_claim):
    code, out, err = cli("check", dense_claim)
    assert code == 1
    assert "FAIL  shapes_schedule_and_batch: expected_tokens declares" in out
    assert "ok    declaration" in out and f"{dense_claim}: 6 of 7 checks passed" in out


def test_check_unknown_method_is_one_line(cli):
    code, out, err = cli("check", "tomee")
    assert code == 2 and err.startswith("error: unknown method 'tomee'") and "did you mean 'tome'" in err
