"""docs/method_flops.json (each method page's FLOPs on DeiT-S) is current: counted by the code of
this checkout, so `make docs` on a fresh clone recounts nothing and leaves git status clean."""

import json
from pathlib import Path

from tokenbench.identity import method_code
from tokenbench.registry import get_method, list_methods

ROOT = Path(__file__).resolve().parent.parent


def test_every_vit_methods_committed_flops_are_counted_by_this_code():
    counted = json.loads((ROOT / "docs" / "method_flops.json").read_text())
    vit = [m["name"] for m in list_methods() if "vit" in (m.get("backbones") or ("vit",))
           and (ROOT / "methods" / f"{m['name']}.py").is_file() or m["name"] == "none"]
    stale = [name for name in vit if counted.get(name, {}).get("code") != method_code(get_method(name))]
    assert not stale, f"run `python docs/gen_method_flops.py` and commit docs/method_flops.json: {stale}"
