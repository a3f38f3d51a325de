"""`tokenbench flops --data`: FLOPs averaged over real images, with the spread per image.

A method whose token count depends on the image (``expected_tokens`` None) is counted on
the images of ``--data``; the record's key carries the data's identity and subset (like an
accuracy record), so another ``--limit`` is another record and the same one is reused.
Without ``--data`` such a method is counted on one synthetic image, with a warning.
"""

from __future__ import annotations

import json

from conftest import register_tiny_timm
from tokenbench.runner import SYNTHETIC_FLOPS, Settings, key_fields
from tokenbench.store import Store

TINY = register_tiny_timm("tb_tiny_flops_data_vit")


def test_flops_on_data_gives_mean_and_spread_and_reuses(cli, tmp_path):
    res = tmp_path / "res"
    args = ("flops", TINY, "--method", "ats", "--data", "synthetic", "--results", str(res), "--json")
    code, out, err = cli(*args, "--limit", "16")
    assert code == 0, err
    first = json.loads(out)
    spread = first["gflops_per_image"]
    assert first["flops_images"] == 16
    assert set(spread) == {"mean", "std", "min", "max"}
    assert spread["min"] <= spread["mean"] <= spread["max"] and spread["std"] >= 0
    assert first["gflops"] == spread["mean"]
    assert first["data"]["name"] == "synthetic" and first["data"]["limit"] == 16
    assert SYNTHETIC_FLOPS not in first["warnings"]

    assert first["reused"] is False and first["recorded_in"] == str(res)
    code, out, err = cli(*args, "--limit", "16")                 # the same record, reused
    assert code == 0, err
    assert json.loads(out) == {**first, "reused": True}
    code, out, err = cli(*args[:-1], "--limit", "16")           # the text line says so too
    assert code == 0 and f"(reused from {res})" in out.splitlines()[0], err
    assert len(Store(res).records("flops")) == 1

    code, out, err = cli(*args, "--limit", "8")                  # another subset: another record
    assert code == 0, err
    assert json.loads(out)["key"] != first["key"]
    assert json.loads(out)["flops_images"] == 8
    assert len(Store(res).records("flops")) == 2


def test_per_image_method_without_data_warns(cli, tmp_path):
    code, out, err = cli("flops", TINY, "--method", "ats", "--json")
    assert code == 0, err
    assert SYNTHETIC_FLOPS in json.loads(out)["warnings"]
    code, out, err = cli("flops", TINY, "--method", "ats")
    assert code == 0
    assert SYNTHETIC_FLOPS in err
    code, out, err = cli("flops", TINY, "--method", "topk", "--json")   # a declared schedule: no warning
    assert code == 0, err
    assert SYNTHETIC_FLOPS not in json.loads(out)["warnings"]


def test_flops_keys_without_data_are_unchanged():
    spec = {"model": TINY, "method": "ats", "params": {"keep_rate": 1.0}, "img_size": None}
    plain = key_fields("flops", spec, "random-init:seed0", Settings())
    assert "data" not in plain and "limit" not in plain
    # a sweep's settings carry data for accuracy: its FLOPs keys stay those of one synthetic image
    assert key_fields("flops", spec, "random-init:seed0", Settings(data="synthetic", limit=16)) == plain
    on_data = key_fields("flops", spec, "random-init:seed0", Settings(data="synthetic", limit=16, flops_on_data=True))
    assert on_data["data_id"] == "synthetic:v1" and on_data["limit"] == 16
    assert key_fields("flops", spec, "random-init:seed0",
                      Settings(data="synthetic", flops_on_data=True))["limit"] == 64


def test_bad_data_options_are_one_line(cli):
    code, out, err = cli("flops", TINY, "--method", "ats", "--limit", "8")
    assert code == 2 and "--data" in err
    code, out, err = cli("flops", TINY, "--method", "ats", "--data", "fashion-mnits")
    assert code == 2 and "unknown dataset" in err
    code, out, err = cli("flops", TINY, "--method", "ats", "--data", "synthetic", "--limit", "0")
    assert code == 2 and "--limit" in err
