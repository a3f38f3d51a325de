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
