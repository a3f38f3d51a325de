"""How long a timing ran (``min_run_time``) is not in its key, but a stored timing is reused only
where it ran at least as long as asked: a quick timing never stands in for a full one."""

import json

from tokenbench import runner
from tokenbench.sweep.plan import recorded
from tokenbench.store import Store


def _throughput(cli, results, seconds):
    code, out, err = cli("throughput", "default", "-b", "4", "--threads", "1", "--min-run-time", str(seconds),
                         "--results", str(results), "--json")
    assert code == 0, err
    return json.loads(out)[0] if out.lstrip().startswith("[") else json.loads(out)


def test_a_shorter_timing_is_timed_again_and_a_longer_one_serves(tmp_path, cli):
    res = tmp_path / "res"
    short = _throughput(cli, res, 0.02)
    assert not short["reused"] and short["min_run_time"] == 0.02
    longer = _throughput(cli, res, 0.1)          # asked for longer: measured again, same key, replaced
    assert not longer["reused"] and longer["key"] == short["key"] and longer["min_run_time"] == 0.1
    again = _throughput(cli, res, 0.05)          # a longer timing serves a shorter request
    assert again["reused"] and again["min_run_time"] == 0.1
    store = Store(res)
    assert recorded(longer["key"], store, None, 0.1) and not recorded(longer["key"], store, None, 0.5)
    assert recorded(longer["key"], store, None)  # FLOPs and accuracy records have no length


def test_a_record_without_its_length_is_reused():
    assert not runner.timed_shorter({"metrics": {"img_per_s": 1.0}}, 5.0)
    assert runner.timed_shorter({"metrics": {"min_run_time": 1.0}}, 2.0)
    assert not runner.timed_shorter({"metrics": {"min_run_time": 2.0}}, 2.0)


def test_a_short_timing_here_gives_way_to_the_references_full_one(tmp_path, cli):
    ref, mine = tmp_path / "ref", tmp_path / "mine"
    full = _throughput(cli, ref, 0.1)
    _throughput(cli, mine, 0.02)
    rec, from_ref = runner.stored_record(full["key"], Store(mine), Store(ref), 0.1)
    assert from_ref and rec["metrics"]["min_run_time"] == 0.1
    assert runner.stored_record(full["key"], Store(mine), Store(ref), 0.5) == (None, False)
