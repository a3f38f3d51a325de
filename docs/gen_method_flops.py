"""Count every registered ViT method's FLOPs at its default setting on DeiT-S (random weights,
224 px, fvcore) into docs/method_flops.json, for the method pages.

An entry is kept while the method's version and source hash are those of this checkout, so a run
counts only what changed (``make docs`` runs it; ``--all`` counts everything again).  Methods whose
token counts depend on the image count the mean over 8 seeded random images.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "method_flops.json"
MODEL = "deit_small_patch16_224"


def main(argv: list[str]) -> int:
    import torch

    from tokenbench import api
    from tokenbench.identity import method_code
    from tokenbench.registry import get_method, list_methods

    torch.set_num_threads(1)
    old = json.loads(OUT.read_text()) if OUT.exists() and "--all" not in argv else {}
    new = {}
    for m in list_methods():
        cls = get_method(m["name"])
        if "vit" not in (m.get("backbones") or ("vit",)):
            continue
        code = method_code(cls)
        if old.get(m["name"], {}).get("code") == code:
            new[m["name"]] = old[m["name"]]
            continue
        try:
            net, prov = api.load(MODEL, m["name"], {})
            inputs = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
            f = api.flops(net, inputs=inputs)
            new[m["name"]] = {"code": code, "params": prov["params"], "gflops": round(f["gflops"], 4)}
        except Exception as e:  # a method that cannot run on DeiT-S: said on its page
            new[m["name"]] = {"code": code, "params": {}, "gflops": None, "error": str(e).splitlines()[0][:200]}
        print(f"{m['name']}: {new[m['name']].get('gflops')}", flush=True)
    OUT.write_text(json.dumps(new, indent=1, sort_keys=True, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
