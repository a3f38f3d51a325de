"""Re-running a sweep's settings for ``tokenbench analyze``, with the surgery's bookkeeping on.

One pass of a setting over the evaluated images gives, per image: the prediction, the final
class-token (or pooled) features (timm's ``forward_features`` then ``forward_head(pre_logits=
True)``), the tokens entering each block and each MLP, and, after each comparison block,
which original patches survive (merged tokens count for the patches they cover) and which
are still their own token.  The source map and its per-stage snapshots of
:mod:`tokenbench.backbones`, traced and analysed by :mod:`tokenbench.visual.trace` (which alone reads
the model's geometry), say which.

Images run in dataset order at the sweep's evaluation batch size, as the evaluation did, so
a seeded method draws what it drew for the records; :func:`trace_setting`'s
caller checks the predictions against the records.  Each pass is cached in a ``.npz`` file
keyed by everything that determines it (:func:`cache_key`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from .metrics import surviving_patches

TRACE_VERSION = 2  # raise when what a pass computes changes: older cache files are then ignored


# --------------------------------------------------------------------------- data

def evaluated_dataset(net: nn.Module, data: dict, limit: Optional[int] = None):
    """The sweep's evaluated images for ``net`` (its preprocessing), the first ``limit`` of them.

    ``data``: name, split, dir, limit (the sweep's subset size), seed.  Returns (dataset, DataSpec
    of the sweep's subset).
    """
    from torch.utils.data import Subset

    from ..data import build_dataset

    ds, spec = build_dataset(data["name"], data.get("split") or "test", data.get("dir"), model=net,
                             limit=data.get("limit"), seed=int(data.get("seed") or 0))
    if limit is not None and limit < len(ds):
        ds = Subset(ds, list(range(limit)))
    return ds, spec


def dataset_labels(ds) -> np.ndarray:
    """Every image's label, read without decoding images where the dataset allows it."""
    from torch.utils.data import Subset

    if isinstance(ds, Subset):
        return dataset_labels(ds.dataset)[np.asarray(ds.indices, dtype=np.int64)]
    for attr in ("labels", "targets"):
        v = getattr(ds, attr, None)
        if v is not None and len(v) == len(ds):
            return np.asarray(v, dtype=np.int64)
    return np.asarray([int(ds[i][1]) for i in range(len(ds))], dtype=np.int64)


# --------------------------------------------------------------------------- the pass

def comparison_blocks(depth: int) -> list[int]:
    """Where reduction patterns are compared: after each reduction site (the quarter points of
    the depth) and after the last block."""
    from ..backbones.vit import quarter_sites

    return sorted(set(quarter_sites(depth)) | {depth - 1})


def _per_image(counts: list, b: int) -> np.ndarray:
    """Token counts per block as [b, blocks]: an int is every image's count, a [b] tensor each one's."""
    cols = []
    for c in counts:
        if torch.is_tensor(c) and c.numel() == b:
            cols.append(c.detach().cpu().numpy().astype(np.int32).reshape(b))
        else:
            cols.append(np.full(b, int(c), dtype=np.int32))
    return np.stack(cols, 1) if cols else np.zeros((b, 0), dtype=np.int32)


def _real_counts(st, b: int, mlp: bool) -> np.ndarray:
    """Each image's own token counts per block [b, blocks]: a padded batch (per-image counts)
    counts its real tokens, not the batch's longest sequence."""
    per = st.tokens_per_image(mlp=mlp)
    if per is not None:
        return per.detach().cpu().numpy().astype(np.int32).reshape(b, -1)
    return _per_image(st.tokens_mlp if mlp else st.tokens, b)


def _features_and_logits(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's pooled pre-logit features and the logits, from one pass through the blocks."""
    feats = net.forward_features(x)
    return net.forward_head(feats, pre_logits=True), net.forward_head(feats)


@torch.no_grad()
def trace_batch(net: nn.Module, x: torch.Tensor, blocks: list[int]) -> dict[str, np.ndarray]:
    """One batch through ``net`` with the source map on: predictions, features, token counts, patterns."""
    from ..visual.trace import analyse, run_with_sources, token_geometry

    (pre, logits), st = run_with_sources(net, lambda m: _features_and_logits(m, x))
    b = x.shape[0]
    geo = token_geometry(net)
    n_patches = geo.n_patches
    stages = analyse(st, geo)
    out = {"pred": logits.argmax(-1).cpu().numpy().astype(np.int64),
           "features": pre.float().cpu().numpy(),
           "tokens": _real_counts(st, b, mlp=False), "tokens_mlp": _real_counts(st, b, mlp=True)}
    for blk in blocks:
        done = [s for s in stages if s.block <= blk]
        if done:
            s = done[-1]
            assign, role = s.assign.numpy(), s.role.numpy()
            out[f"survive_{blk}"] = surviving_patches(assign, role, merged=True)
            out[f"alone_{blk}"] = surviving_patches(assign, role, merged=False)
        else:
            out[f"survive_{blk}"] = np.ones((b, n_patches), dtype=bool)
            out[f"alone_{blk}"] = np.ones((b, n_patches), dtype=bool)
    return out


def trace_setting(net: nn.Module, ds, batch_size: int, blocks: list[int],
                  on_batch: Optional[Callable[[int], None]] = None) -> dict[str, np.ndarray]:
    """Every image of ``ds``, in order, in batches of ``batch_size``: :func:`trace_batch`'s arrays, joined."""
    from torch.utils.data import DataLoader

    from ..backbones import image_ids
    from ..measure.forward import eval_mode

    # Say which images a batch holds (each image's index in the evaluated set, so that a seeded
    # method's draw follows the image), as the evaluation does.
    parts: list[dict] = []
    seen = 0
    with eval_mode(net):
        for x, _ in DataLoader(ds, batch_size=batch_size, shuffle=False):
            ids = torch.arange(seen, seen + len(x))
            with image_ids(net, ids):
                parts.append(trace_batch(net, x, blocks))
            seen += len(x)
            if on_batch:
                on_batch(len(x))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def per_image_gflops(net: nn.Module, tokens: np.ndarray, tokens_mlp: np.ndarray, gflops: float) -> np.ndarray:
    """FLOPs per image: the run's fvcore count, shifted by the analytic cost (linear layers,
    attention, MLP per block) of the difference between this image's token counts and the
    mean counts.  Exactly the fvcore count wherever counts are constant."""
    from ..backbones import backbone_of

    bb = backbone_of(net)

    def cost(t, m):
        c = bb.block_cost([float(v) for v in t], [float(v) for v in m])
        return 0.0 if c is None else c

    rows = np.concatenate([tokens, tokens_mlp], 1)
    uniq, inv = np.unique(rows, axis=0, return_inverse=True)
    depth = tokens.shape[1]
    base = cost(tokens.mean(0), tokens_mlp.mean(0))
    per = np.array([cost(u[:depth], u[depth:]) - base for u in uniq])
    return gflops + per[np.asarray(inv).reshape(-1)] / 1e9


# --------------------------------------------------------------------------- cache

def cache_key(record_keys: dict, data: dict, n_images: int, batch_size: int, blocks: list[int]) -> str:
    """The cache key of one pass: the records it re-runs (their keys cover model, weights, method,
    parameters and code), the data subset, the number of images, batch size and blocks."""
    from ..store import record_key

    return record_key({"kind": "analysis-trace", "version": TRACE_VERSION, "records": dict(sorted(record_keys.items())),
                       "data": data, "n_images": n_images, "batch_size": batch_size, "blocks": list(blocks)})


def load_cached(cache_dir: Path, key: str) -> Optional[dict[str, np.ndarray]]:
    p = Path(cache_dir) / f"{key}.npz"
    if not p.is_file():
        return None
    try:
        with np.load(p) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError):
        return None  # damaged: computed again and overwritten


def save_cached(cache_dir: Path, key: str, arrays: dict[str, np.ndarray]) -> Path:
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    ignore = cache_dir / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# tokenbench analyze's cache of model re-runs: not results\n*\n")
    p = cache_dir / f"{key}.npz"
    tmp = cache_dir / f".{key}.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, p)
    return p
