#!/usr/bin/env python
"""Speed of every method adapter against the dense model and against its FLOPs.

For each model and each method setting: GFLOPs, the FLOPs reduction (dense / method),
the measured throughput and the realised speedup, and their ratio: the share of the FLOPs
saving that turns into time.  An efficiency well below 1 means the adapter loses its
savings to overhead.  The speedup is a paired timing (:func:`tokenbench.measure.speedup`):
the method and the dense model timed interleaved in rounds, in one process, on one input,
so that what else the machine does slows both alike; its interquartile range over rounds
is printed beside it.

    python bench.py                              # DeiT-S and the embedded model, batch 1 and 16, CPU
    python bench.py --models deit_small_patch16_224 --batch-sizes 16,64 --device cuda

Never run it while something else computes: the machine's load is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SETTINGS = [
    ("none", {}),
    ("tome", {"r": 8}),
    ("tome", {"r": 13}),
    ("evit", {"keep_rate": 0.7}),
    ("evit", {"keep_rate": 0.5}),
    ("topk", {"keep_rate": 0.7}),
    ("random", {"keep_rate": 0.7}),
    ("dynamicvit", {"keep_rate": 0.7}),
    ("dynamicvit", {"keep_rate": 0.5}),
]
# The embedded model has 49 patch tokens: ToMe's r scaled to the same FLOPs range.
SETTINGS_SMALL = [(m, ({"r": max(1, p["r"] // 4)} if "r" in p else p)) for m, p in SETTINGS]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="deit_small_patch16_224,default")
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--min-run-time", type=float, default=2.0)
    ap.add_argument("--methods", default=None, help="comma-separated subset of methods")
    ap.add_argument("--out", default="results/bench", help="where to write bench.md / bench.csv / bench.json")
    args = ap.parse_args(argv)

    import torch

    from tokenbench import measure
    from tokenbench.api import load

    threads = args.threads or measure.default_threads()
    torch.set_num_threads(threads)
    rows = []
    load0 = os.getloadavg()[0]
    for model_name in args.models.split(","):
        settings = SETTINGS_SMALL if model_name == "default" else SETTINGS
        if args.methods:
            keep = set(args.methods.split(",")) | {"none"}
            settings = [s for s in settings if s[0] in keep]
        dense = {}
        dense_net = None
        for method, params in settings:
            try:
                net, prov = load(model_name, method, params)
            except Exception as e:  # e.g. the embedded checkpoint missing
                print(f"skip {model_name}/{method}: {e}", file=sys.stderr)
                continue
            f = measure.flops(net)
            for b in [int(x) for x in args.batch_sizes.split(",")]:
                if method == "none":
                    r = measure.throughput(net, batch_size=b, device=args.device, threads=threads,
                                           min_run_time=args.min_run_time, latency=False)
                    dense[b] = f["gflops"]
                    speed_x, q1, q3 = 1.0, 1.0, 1.0
                else:
                    if dense_net is None:
                        print(f"skip {model_name}/{method}: no dense model to pair with", file=sys.stderr)
                        continue
                    r = measure.speedup(net, dense_net, batch_size=b, device=args.device, threads=threads,
                                        min_run_time=2 * args.min_run_time)
                    speed_x, q1, q3 = r["speedup"], r["speedup_q1"], r["speedup_q3"]
                g0 = dense.get(b)
                flops_x = g0 / f["gflops"] if g0 else float("nan")
                rows.append({
                    "model": model_name, "method": method, "params": json.dumps(params, separators=(",", ":")),
                    "batch": b, "gflops": round(f["gflops"], 3), "flops_reduction": round(flops_x, 3),
                    "img_per_s": round(r["img_per_s"], 1), "speedup": round(speed_x, 3),
                    "speedup_iqr": f"[{q1:.2f}, {q3:.2f}]", "iqr_pct": round(100 * r["spread"], 1),
                    "efficiency": round(speed_x / flops_x, 3) if g0 else float("nan"),
                    "busy": r["env"].get("busy"), "other_cores": r["env"].get("other_cores"),
                })
                print(_fmt_row(rows[-1]), file=sys.stderr, flush=True)
            if method == "none":
                dense_net = net
            else:
                del net
    import pandas as pd

    df = pd.DataFrame(rows)
    env = measure.env_info(measure.resolve_device(args.device), threads)
    head = (f"device {env['device_name']} ({env['device']}), {threads} threads, torch {env['torch']}, "
            f"timm {env['timm']}; load average {load0:.2f} before, {os.getloadavg()[0]:.2f} after")
    table = df.to_markdown(index=False) if hasattr(df, "to_markdown") and _has_tabulate() else df.to_string(index=False)
    print(head)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "bench.csv", index=False)
    (out / "bench.md").write_text(f"{head}\n\n{table}\n")
    (out / "bench.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401

        return True
    except ImportError:
        return False


def _fmt_row(r: dict) -> str:
    return (f"{r['model']:<24} {r['method']:<10} {r['params']:<18} b={r['batch']:<3} {r['gflops']:7.3f} GFLOPs "
            f"x{r['flops_reduction']:.2f} FLOPs  {r['img_per_s']:8.1f} img/s  x{r['speedup']:.2f} speed  "
            f"eff {r['efficiency']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
