"""A method whose declared token schedule (expected_tokens) is not what its forward keeps is
diagnosed: by `flops` (a warning and a record flag) and by the matched-FLOPs search."""

import json

import pytest

from tokenbench import registry
from tokenbench.checks import schedule_disagreement

from conftest import register_tiny_timm

TINY = register_tiny_timm("tiny_vit_schedule_check")


def _liar():
    base = registry.get_method("topk")

    class DenseClaim(base):
        """top-k pruning that declares the dense schedule whatever its keep rate."""

        name = "dense_claim"

        def expected_tokens(self, model, **params):
            return super().expected_tokens(model, **{**params, "keep_rate": 1.0})

    return DenseClaim


@pytest.fixture
def liar(monkeypatch):
    registry.load_methods()
    cls = _liar()
    monkeypatch.setitem(registry._REGISTRY, cls.name, cls)
    return cls


def test_agreeing_schedules_say_nothing():
    assert schedule_disagreement(([65, 65], [65, 65]), [65, 65], [65, 65]) is None
    assert schedule_disagreement(None, [65, 33], [65, 33]) is None
    assert "declared [65,65], traced [65,33]" in schedule_disagreement(([65, 65], [65, 65]), [65, 33], [65, 33])


def test_flops_warns_and_flags_a_disagreeing_schedule(cli, liar, tmp_path):
    code, out, err = cli("flops", TINY, "--method", "dense_claim", "--set", "keep_rate=0.5", "--json",
                         "--results", str(tmp_path))
    assert code == 0, err
    pub = json.loads(out)
    assert any("declared token schedule" in w for w in pub["warnings"])
    code, out, err = cli("flops", TINY, "--method", "dense_claim", "--set", "keep_rate=0.5")
    assert code == 0 and "warning: the method's declared token schedule" in err
    rec = json.loads(next((tmp_path / "records").rglob("*.json")).read_text())
    assert rec["metrics"]["schedule_mismatch"] is True
    from tokenbench.report.rows import row_from_records

    row = row_from_records("dense_claim", rec["spec"], {"flops": rec}, ["flops"], [], None, 0.03)
    assert "schedule-mismatch" in row.flags
    code, out, err = cli("flops", TINY, "--method", "topk", "--set", "keep_rate=0.5", "--json")
    assert code == 0 and "declared token schedule" not in err


def test_matched_flops_search_reports_the_diagnosis(liar):
    from tokenbench.sweep.search import FlopsSearch

    res = FlopsSearch().search(TINY, None, liar, {}, "keep_rate", 0.5)
    assert res.miss
    assert res.warning and "declared token schedule" in res.warning
    ok = FlopsSearch().search(TINY, None, registry.get_method("topk"), {}, "keep_rate", 0.5)
    assert not ok.miss and ok.warning is None
