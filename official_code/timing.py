"""``bench.py --official DIR``: the official model of a setting, checked equal to ours, then the
two timed interleaved (``tokenbench.measure.timing.speedup``: ours over the official, round by round,
on one input), in each of bench.py's modes."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from . import BUILDERS, max_abs_diff

CHECK_IMAGES = 2      # images of the fp32 equality check before timing
CHECK_TOL = 1e-4      # max abs logit difference allowed, times max(1, largest logit)


def official_of(method: str):
    return BUILDERS.get(method)


def check_equal(ours: torch.nn.Module, official: torch.nn.Module, seed: int = 0) -> tuple[float, float, bool]:
    """(max abs logit difference, largest logit, within tolerance) on random images, fp32, CPU."""
    from tokenbench.measure.forward import example_input

    x = example_input(ours, batch=CHECK_IMAGES)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x.shape, generator=g)
    with torch.inference_mode():
        a, b = ours(x), official(x)
    diff = max_abs_diff(a, b)
    scale = a.abs().max().item()
    return diff, scale, diff <= CHECK_TOL * max(1.0, scale)


HOST_ROUNDS = 3        # host-time measurements of each model, alternating ours and the official's


def host_cost(ours: torch.nn.Module, official: torch.nn.Module) -> dict:
    """Operators per forward and host milliseconds (``tokenbench.measure.overhead``) of ours and of
    the official model; the host times measured alternately, the fastest of each kept (other work
    only ever adds to it).  A forward that cannot run on an empty batch has no host time (None)."""
    from tokenbench.measure.overhead import host_time_ms, operator_count

    fastest = {"ours": [], "official": []}
    for _ in range(HOST_ROUNDS):
        for side, net in (("ours", ours), ("official", official)):
            ms = host_time_ms(net)["host_ms"]
            if ms is not None:
                fastest[side].append(ms)
    return {"aten_ops": operator_count(ours)["aten_ops"], "official_aten_ops": operator_count(official)["aten_ops"],
            "host_ms": min(fastest["ours"], default=None), "official_host_ms": min(fastest["official"], default=None)}


def official_rows(model_name: str, settings: list, batches: list[int], modes: list, timing: dict,
                  min_run_time: float, root: Path, log: Callable[[str], None],
                  late: Callable[[], Optional[str]] = lambda: None) -> tuple[list[dict], list[str]]:
    """One row per (setting with official code, batch): the equality check and, per timing mode
    (bench.py's ``(column suffix, timing keyword arguments)``: eager, CUDA graphs, compiled), ours
    over the official (median and quartiles over rounds) and both throughputs.  Returns the rows
    and the lines saying what could not be built, checked or timed (a missing clone: one line).
    ``late()``: why the next setting is not started (bench.py's deadline), or None."""
    from tokenbench.api import load
    from tokenbench.measure.env import attention_kernel
    from tokenbench.measure.timing import speedup
    from tokenbench.report.render import params_json, quartiles_text

    rows, notes = [], []
    for method, params in settings:
        off = official_of(method)
        if off is None:
            continue
        why = late()
        if why:
            line = f"official {off.label} on {model_name} {params_json(params, compact=True)}: not timed ({why})"
            notes.append(line)
            log(line)
            continue
        clone = off.clone_in(root)
        if clone is None:
            line = off.missing_line(root)
            if line not in notes:
                notes.append(line)
                log(line)
            continue
        try:
            ours, prov = load(model_name, method, params)
            dense = load(model_name)[0]
            official = off.build(dense, ours, clone, **prov["params"])
        except Exception as e:  # e.g. DynamicViT's 14 x 14 grid on another model
            line = f"official {off.label} on {model_name}: cannot build ({type(e).__name__}: {e})"
            notes.append(line)
            log(line)
            continue
        diff, scale, equal = check_equal(ours, official)
        base = {"model": model_name, "method": method, "params": params_json(params, compact=True),
                "official": off.repo, "max_abs_diff": float(f"{diff:.3g}"), "equal": equal,
                "attention": f"{attention_kernel(ours)} / {off.attention}"}
        if not equal:
            line = (f"official {off.label} on {model_name} {base['params']}: logits differ by {diff:.3g} "
                    f"(largest logit {scale:.3g}); not timed")
            notes.append(line)
            log(line)
            rows.append(base)
            continue
        base.update(host_cost(ours, official))
        for b in batches:
            row = dict(base, batch=b, precision=timing.get("precision"))
            for sfx, how in modes:
                try:
                    r = speedup(ours, official, batch_size=b, min_run_time=2 * min_run_time, **how, **timing)
                except Exception as e:  # e.g. a forward CUDA graphs cannot capture
                    line = (f"official {off.label} on {model_name} {base['params']} b={b}: {sfx.strip('_') or 'eager'} "
                            f"not timed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
                    notes.append(line)
                    log(line)
                    continue
                row.update({f"official_img_per_s{sfx}": round(r["baseline_img_per_s"], 1),
                            f"img_per_s{sfx}": round(r["img_per_s"], 1),
                            f"vs_official{sfx}": round(r["speedup"], 3),
                            f"vs_official_iqr{sfx}": quartiles_text(r["speedup_q1"], r["speedup_q3"])})
                row["busy"] = bool(row.get("busy")) or bool(r["env"].get("busy"))
            row["busy"] = row.pop("busy", None)  # None: no mode was timed
            rows.append(row)
            log(f"{model_name:<24} {method:<10} {row['params']:<18} b={b:<3} official diff {diff:.2g}  " +
                "  ".join(f"{sfx.strip('_') or 'eager'} ours/official x{row['vs_official' + sfx]:.2f}"
                          for sfx, _ in modes if "vs_official" + sfx in row))
        del ours, official, dense
    return rows, notes


def official_table(rows: list[dict], notes: list[str], root: Optional[Path]) -> str:
    """The Markdown section: ours against the official code, and what was not timed."""
    if root is None:
        return ""
    import pandas as pd

    head = (f"Ours against the official code ({root}): the same weights, logits checked equal first "
            f"(fp32, {CHECK_IMAGES} images, max abs difference); vs_official = our throughput over the "
            "official's, timed interleaved (median over rounds, quartiles beside it); aten_ops and host_ms of "
            "each as in the table above, the host times measured alternately; attention = ours / the official's "
            "(sdpa: PyTorch's fused kernel, which ours uses where timm's switch fused_attn is on, as the dense "
            "model does; explicit: softmax(q k^T) v written out, as the official code always does; "
            "TIMM_FUSED_ATTN=0 puts timm's models, ours among them, on the explicit product)")
    body = "(nothing timed)"
    if rows:
        try:
            body = pd.DataFrame(rows).to_markdown(index=False)
        except ImportError:  # no tabulate
            body = pd.DataFrame(rows).to_string(index=False)
    tail = "".join(f"\n- {n}" for n in notes)
    return f"{head}\n\n{body}\n{tail}"
