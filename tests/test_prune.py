"""`tokenbench prune`: stale records replaced by a current one go; a run's only record stays; with
--unplanned, the records the sweep plan does not name go too."""

import json

from tokenbench.identity import PROTOCOLS
from tokenbench.store import Store


def _stale_copy(store: Store, rec: dict, key: str) -> None:
    """The same run measured by other code: its key differs and its code hash is not this checkout's."""
    old = json.loads(json.dumps(rec))
    old["key"] = key
    old["key_fields"]["code"]["source"] = "0" * 16
    store.put(old)


def _one_record(cli, tmp_path):
    """A results directory holding one current record: (the directory, its store, the record)."""
    out = tmp_path / "res"
    code, _, err = cli("flops", "default", "--method", "topk", "--set", "keep_rate=0.7", "--results", str(out))
    assert code == 0, err
    store = Store(out)
    (current,) = store.records()
    return out, store, current


def test_prune_removes_only_superseded_stale_records(cli, tmp_path):
    out, store, current = _one_record(cli, tmp_path)
    _stale_copy(store, current, "a" * 20)                       # replaced by `current`
    lone = json.loads(json.dumps(current))
    lone["spec"]["params"] = {"keep_rate": 0.5}                 # another run: its only record
    _stale_copy(store, lone, "b" * 20)
    code, out_text, _ = cli("prune", str(out), "--dry-run")
    assert code == 0 and "a" * 20 in out_text and "b" * 20 not in out_text
    assert len(store.records()) == 3
    code, out_text, _ = cli("prune", str(out))
    assert code == 0 and "1 superseded" in out_text
    assert sorted(r["key"] for r in store.records()) == sorted([current["key"], "b" * 20])


def test_prune_refuses_a_folder_without_records(cli, tmp_path):
    code, _, err = cli("prune", str(tmp_path))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


def test_prune_unplanned_removes_the_records_the_plan_does_not_name(cli, tmp_path):
    out, store, current = _one_record(cli, tmp_path)
    other = json.loads(json.dumps(current))          # the same run on weights trained earlier
    other["key"] = "c" * 20
    other["spec"]["checkpoint"] = "earlier-weights"
    store.put(other)
    code, _, err = cli("prune", str(out), "--unplanned")  # no plan: nothing to tell them apart by
    assert code == 2 and err.startswith("error: ") and "sweep.json" in err and err.count("\n") == 1, err
    assert len(store.records()) == 2
    (out / "sweep.json").write_text(json.dumps({"runs": [{"method": "topk", "keys": {"flops": current["key"]}}]}))
    code, out_text, _ = cli("prune", str(out), "--unplanned", "--dry-run")
    assert code == 0 and "c" * 20 in out_text and "1 record(s) no run of the plan names (dry run)" in out_text
    assert len(store.records()) == 2
    code, out_text, _ = cli("prune", str(out))                 # without the flag: a current record stays
    assert code == 0 and len(store.records()) == 2
    code, out_text, _ = cli("prune", str(out), "--unplanned")
    assert code == 0 and [r["key"] for r in store.records()] == [current["key"]]


def test_a_stale_timing_of_another_mode_or_kernel_is_not_superseded(cli, tmp_path):
    # a current eager, fused-kernel timing replaces its stale twin, never a compiled or explicit one
    out, store, current = _one_record(cli, tmp_path)
    timing = json.loads(json.dumps(current))
    timing["kind"], timing["key"] = "throughput", "d" * 20
    timing["key_fields"].update(protocol=PROTOCOLS["throughput"], device="cpu", device_name="cpu",
                                precision="fp32", threads=1, batch_size=2)
    store.put(timing)
    on_images = {"input": {"data": "fashion-mnist", "split": "test", "batch_size": 2, "data_seed": 0}}
    for key, extra in (("e", {"attention": "explicit"}), ("f", {"compile": "default"}), ("h", on_images),
                       ("g", {})):
        twin = json.loads(json.dumps(timing))
        twin["key_fields"].update(extra)
        _stale_copy(store, twin, key * 20)
    code, out_text, _ = cli("prune", str(out))
    assert code == 0 and "1 superseded" in out_text
    assert sorted(r["key"] for r in store.records()) == sorted([current["key"], "d" * 20, "e" * 20, "f" * 20,
                                                                "h" * 20])


def test_stale_flops_counted_on_images_are_not_replaced_by_flops_on_the_synthetic_input(cli, tmp_path):
    out, store, current = _one_record(cli, tmp_path)            # FLOPs on the synthetic input
    on_data = json.loads(json.dumps(current))
    on_data["key_fields"].update(data="fashion-mnist", data_id="x", split="test", limit=64, data_seed=0)
    _stale_copy(store, on_data, "i" * 20)
    newer_data = json.loads(json.dumps(on_data))
    newer_data["key_fields"]["data_id"] = "y"                  # the same subset, older files and code
    _stale_copy(store, newer_data, "j" * 20)
    code, out_text, _ = cli("prune", str(out))
    assert code == 0 and "0 superseded" in out_text
    assert len(store.records()) == 3


def test_a_measurement_of_other_weights_replaces_nothing(cli, tmp_path):
    # a stale record of the trained weights stays beside a current one made on random weights (a
    # checkout without the checkpoint): the two measured different models
    out, store, current = _one_record(cli, tmp_path)
    trained = json.loads(json.dumps(current))
    trained["key_fields"]["weights"] = "sha256:" + "1" * 64
    _stale_copy(store, trained, "k" * 20)
    code, out_text, _ = cli("prune", str(out))
    assert code == 0 and "0 superseded" in out_text and len(store.records()) == 2
