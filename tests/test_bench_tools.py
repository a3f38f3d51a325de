"""bench.py's ``--methods`` choice of settings, and profile_method.py (where a method's time goes):
what they time and write, and bad input as one line.  No timing is checked."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tokenbench.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_methods_picks_listed_settings_or_names_one():
    bench = _script("bench")
    listed = bench.SETTINGS
    chosen, keep = bench.chosen_settings(listed, "topk,tome:r=13:prop_attn=false,evit:keep_rate=0.7")
    assert chosen == [("none", {}), ("topk", {"keep_rate": 0.7}), ("tome", {"r": 13, "prop_attn": False}),
                      ("evit", {"keep_rate": 0.7})]
    assert keep == {"none", "topk", "tome", "evit"}
    chosen, _ = bench.chosen_settings(listed, "tome")                   # a bare name: its listed settings
    assert chosen == [("none", {}), ("tome", {"r": 8}), ("tome", {"r": 13})]
    chosen, _ = bench.chosen_settings(listed, "tome,tome:r=8")          # nothing timed twice
    assert chosen == [("none", {}), ("tome", {"r": 8}), ("tome", {"r": 13})]
    for bad, msg in (("tome:q=3", "unknown parameter 'q'"), ("bogus:r=1", "unknown method 'bogus'"),
                     ("tome:r", "KEY=VALUE")):
        with pytest.raises(UserError, match=msg):
            bench.chosen_settings(listed, bad)


def test_bench_times_a_named_setting(tmp_path):
    bench = _script("bench")
    out = tmp_path / "b"
    args = ["--models", "default", "--methods", "tome:r=1", "--batch-sizes", "2", "--min-run-time", "0.02",
            "--compile", "none", "--threads", "1", "--out", str(out)]
    assert bench.main(args) == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [(r["method"], r["params"]) for r in rows] == [("none", "{}"), ("tome", '{"r":1}')]
    assert rows[0]["dense_img_per_s"] == rows[0]["img_per_s"]           # the dense row: its own run
    assert rows[1]["dense_img_per_s"] > 0                                # a method: the dense model of its pairing
    assert rows[0]["notes"] == rows[1]["notes"] == ""                    # static token counts: nothing to say
    from conftest import tiny_vit
    from tokenbench import registry

    notes = bench._Bench.notes("ats", {}, registry.apply(tiny_vit(), "ats"), {"precision_note": "emulated"})
    assert notes[0].startswith("per-image token counts: FLOPs of one random image") and notes[1] == "emulated"
    code = json.loads((out / "bench.json").read_text())["env"]["code"]     # which code made the table
    assert code["commit"] and (out / "bench.md").read_text().splitlines()[0].count(f"code {code['commit'][:7]}") == 1
    assert bench.cli(args[:3] + ["tome:r=-1"] + args[4:]) == 2        # out of range: one line, exit 2


def test_profile_method_reports_each_setting(tmp_path, capsys):
    prof = _script("profile_method")
    out = tmp_path / "p.md"
    assert prof.main(["default", 'tome:{"r":2}', "topk", "--batch-size", "2", "--steps", "1", "--top", "3",
                      "--threads", "1", "--out", str(out)]) == 0
    md = out.read_text()
    assert md.strip() == capsys.readouterr().out.strip()
    assert md.startswith("# Profile: default, batch 2, fp32, eager")
    assert "not interleaved" in md.splitlines()[2] and "bench.py (paired)" in md   # unpaired speeds say so
    assert "; code " in md.splitlines()[2]                                 # which code made it
    for label in ("none", 'tome {"r":2}', "topk"):
        assert f"\n## {label}\n" in md and f"| {label} |" in md
    summary = [line for line in md.splitlines() if line.startswith("| none |")][0]
    assert "| 1.00 | 1.00 |" in summary                                  # dense: speed x1, efficiency 1
    assert md.count("| ms / forward | share | calls | name |") == 3
    assert "aten::" in md                                              # CPU: operators by self time
    assert "device ms" not in md and "operators' own time" in md       # no device / host split on a CPU


def test_code_line_names_the_commit_and_what_differs_from_it():
    from tokenbench.store import OUTPUT_DIRS, code_line, git_commit

    assert code_line({"commit": "80e147ca732c", "dirty": False}) == "code 80e147c"
    assert code_line({"commit": "80e147ca732c", "dirty": True, "changed": ["a.py", "b.py"]}) == \
        "code 80e147c + uncommitted changes to a.py, b.py"
    assert code_line({"commit": None, "dirty": None}) == "code: not a git checkout"
    many = code_line({"commit": "80e147ca732c", "dirty": True, "changed": [f"f{i}.py" for i in range(8)]})
    assert many.endswith("to f0.py, f1.py, f2.py, f3.py, f4.py and 3 more")
    here = git_commit(changed=True)
    assert not any(f.split("/")[0] in OUTPUT_DIRS for f in here["changed"] or [])   # outputs are not code


def test_profile_method_bad_input_is_one_line(capsys):
    prof = _script("profile_method")
    assert prof.cli(["default", "tome:{r:1}"]) == 2
    assert prof.cli(["default", "bogus"]) == 2
    assert prof.cli(["default", "--batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "must be a JSON object" in err and "unknown method 'bogus'" in err


def test_bench_bad_input_is_one_line(tmp_path, capsys):
    bench = _script("bench")
    bad = (["--batch-sizes", "1,x"], ["--models", "defualt"], ["--precision", "fp8"], ["--min-run-time", "-1"],
           ["--threads", "0"], ["--compile", "bogus"])
    for args in bad:
        assert bench.cli(["--models", "default", *args, "--out", str(tmp_path / "b")]) == 2, args
    assert bench.cli(["--redraw", str(tmp_path)]) == 2                    # no bench.json there
    err = capsys.readouterr().err
    assert err.count("\n") == len(bad) + 1 and err.count("error: ") == len(bad) + 1, err
    for said in ("'x' is neither", "did you mean 'default'", "--precision fp8", "--min-run-time -1", "--threads 0",
                 "or none for eager", "no bench.json"):
        assert said in err
    assert not (tmp_path / "b").exists()                                 # refused before anything ran


def test_redraw_keeps_the_settings_not_timed(tmp_path):
    bench = _script("bench")
    missed = [{"model": "default", "method": "tome", "params": '{"r":1}', "columns": "all",
               "reason": "time: about 9 s needed, 1 s left"}]
    row = {"model": "default", "method": "none", "params": "{}", "batch": 2, "img_per_s": 10.0}
    (tmp_path / "bench.json").write_text(json.dumps({"env": {}, "head": "# Bench", "rows": [row],
                                                     "not_reached": missed}))
    assert bench.main(["--redraw", str(tmp_path), "--out", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "bench.json").read_text())["not_reached"] == missed
    assert "Not timed" in (tmp_path / "again" / "bench.md").read_text()
    assert bench.main(["--redraw", str(tmp_path)]) == 0                  # without --out: into the folder itself,
    assert "Not timed" in (tmp_path / "bench.md").read_text()            # never over results/bench


def test_an_official_setting_no_mode_could_time_is_listed_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import official_code
    from official_code import timing

    def copy_of_ours(dense, ours, clone, **params):
        import copy

        return copy.deepcopy(ours)

    (tmp_path / "a+b").mkdir()
    monkeypatch.setitem(official_code.BUILDERS, "tome", official_code.Official("a+b", copy_of_ours, "ToMe"))
    lines = []
    rows, notes = timing.official_rows("default", [("tome", {"r": 1})], [2], [("", {"no_such_option": 1})],
                                       {}, 0.01, tmp_path, lines.append)
    assert len(rows) == 1 and rows[0]["equal"] and rows[0]["busy"] is None and "vs_official" not in rows[0]
    assert len(notes) == 1 and "eager not timed" in notes[0] and lines[0] == notes[0]
    rows, notes = timing.official_rows("default", [("tome", {"r": 1})], [2], [("", {})], {}, 0.01, tmp_path,
                                       lines.append, late=lambda: "time: about 9 s needed, 1 s left")
    assert rows == [] and notes == ['official ToMe on default {"r":1}: not timed (time: about 9 s needed, 1 s left)']
