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
