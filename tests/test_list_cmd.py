"""`tokenbench list` reads at 80 columns (one short entry per method); `list METHOD` shows one in full."""

import json

from tokenbench.registry import list_methods


def test_list_fits_80_columns_one_entry_per_method(cli):
    code, out, err = cli("list")
    assert code == 0, err
    lines = out.splitlines()
    methods = list_methods()
    assert max(len(ln) for ln in lines) <= 80
    assert "…" not in out
    assert len(lines) <= 6 * len(methods)
    starts = {ln.split()[0] for ln in lines if ln and not ln.startswith(" ")}
    assert {m["name"] for m in methods} <= starts


def test_list_method_shows_every_parameter_whole(cli):
    code, out, err = cli("list", "mctf")
    assert code == 0, err
    assert max(len(ln) for ln in out.splitlines()) <= 80
    mctf = next(m for m in list_methods() if m["name"] == "mctf")
    for p in mctf["params"]:
        assert f"  {p['name']}" in out
    assert "r (the knob)" in out
    code, out, err = cli("list", "mctf", "--json")
    assert code == 0 and json.loads(out)["name"] == "mctf"
    code, out, err = cli("list", "mctff")
    assert code == 2 and err.startswith("error: unknown method 'mctff'") and "did you mean 'mctf'" in err
