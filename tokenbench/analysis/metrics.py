"""The analyses of ``tokenbench analyze``, as pure functions on arrays.

Nothing here loads a model or reads a file: the re-runs live in
:mod:`tokenbench.analysis.trace`, the tables in :mod:`tokenbench.analysis.tables`, the drawing in
:mod:`tokenbench.analysis.plots`, and the command in :mod:`tokenbench.analysis.analyze`.

- reduction patterns: which original patches survive a stage (:func:`surviving_patches`),
  the intersection over union of two such sets (:func:`iou`) and its chance level
  (:func:`chance_iou`, :func:`pattern_agreement`);
- error agreement: Cohen's kappa on per-image correctness (:func:`cohen_kappa`) and the
  per-class top-1 change against dense (:func:`per_class_top1`);
- representation drift: linear CKA (:func:`linear_cka`) and the mean cosine similarity
  (:func:`mean_cosine`) of two feature matrices over the same images;
- budget spending: the spread of per-image token counts and FLOPs, per class, and its
  relation to correctness (:func:`budget_summary`);
- spatial prior: the average keep map (:func:`keep_map`), a Gaussian centre prior
  (:func:`centre_prior`), their correlation (:func:`pearson`) and how far a map is from
  flat in units of binomial sampling error (:func:`flatness_z`).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np

# Token roles of tokenbench.visualize's stage analysis (kept alone, merged group, EViT's fused token).
KEPT, GROUP, FUSED = 1, 2, 3


# --------------------------------------------------------------------------- reduction patterns

def surviving_patches(assign: np.ndarray, role: np.ndarray, merged: bool = True) -> np.ndarray:
    """Which original patches survive a stage: bool [B, P].

    ``assign`` [B, P]: the token covering each patch (index into the stage's sequence), -1 where
    the patch was dropped; ``role`` [B, N]: each token's role (KEPT, GROUP, FUSED, or a prefix).
    A patch survives when a token stands for it: kept alone, or (``merged``) inside a merged
    group.  A fused token (EViT's pool of the inattentive tokens) is what is left of dropped
    patches, so its patches do not survive.  With ``merged=False`` only patches that are still
    their own token survive (the resolution a merging method has kept).
    """
    assign = np.asarray(assign)
    role = np.asarray(role)
    covered = assign >= 0
    tok_role = np.take_along_axis(role, np.where(covered, assign, 0), axis=1)
    ok = tok_role == KEPT
    if merged:
        ok |= tok_role == GROUP
    return covered & ok


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of two sets per row: bool [..., P] -> float [...].

    Two empty sets agree perfectly (1).
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    inter = (a & b).sum(-1)
    union = (a | b).sum(-1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def mean_iou(a: np.ndarray, b: np.ndarray) -> float:
    """:func:`iou` averaged over images."""
    return float(iou(a, b).mean())


@lru_cache(maxsize=65536)
def chance_iou(n: int, size_a: int, size_b: int) -> float:
    """Expected IoU of two independent uniformly random subsets of sizes ``size_a`` and ``size_b``
    of ``n`` items (the agreement two random choices of those sizes reach by chance).

    The intersection k is hypergeometric, P(k) = C(a, k) C(n - a, b - k) / C(n, b), and the union
    is a + b - k, so E[IoU] = sum_k P(k) k / (a + b - k).  Two empty sets: 1, as in :func:`iou`.
    """
    a, b = int(size_a), int(size_b)
    if not (0 <= a <= n and 0 <= b <= n):
        raise ValueError(f"set sizes {a}, {b} outside 0..{n}")
    if a == 0 and b == 0:
        return 1.0
    total = math.comb(n, b)
    e = 0.0
    for k in range(max(0, a + b - n), min(a, b) + 1):
        e += math.comb(a, k) * math.comb(n - a, b - k) / total * (k / (a + b - k))
    return e


def pattern_agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """IoU of two sets of patches per image (bool [B, P]), beside its chance level and a
    chance-corrected score.

    ``chance``: the mean over images of :func:`chance_iou` at each image's two set sizes.
    ``above_chance``: (IoU - chance) / (1 - chance), 0 for random choices of those sizes, 1 for
    identical sets.  Where, in every image, one of the sets is empty or holds every patch (a
    merging method keeps every patch covered), IoU is fixed by the set sizes: it equals its chance
    level and says nothing about agreement; ``informative`` is then False and the three are NaN.
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    n = a.shape[-1]
    sa, sb = a.sum(-1), b.sum(-1)
    proper = (sa > 0) & (sa < n) & (sb > 0) & (sb < n)
    if not proper.any():
        nan = float("nan")
        return {"iou": nan, "chance": nan, "above_chance": nan, "informative": False}
    v = mean_iou(a, b)
    ch = float(np.mean([chance_iou(n, int(x), int(y)) for x, y in zip(sa.ravel(), sb.ravel())]))
    above = (v - ch) / (1.0 - ch) if ch < 1.0 else float("nan")
    return {"iou": v, "chance": ch, "above_chance": above, "informative": True}


# --------------------------------------------------------------------------- error agreement

def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Cohen's kappa of two raters' binary labels (here: correct / wrong on the same images).

    kappa = (p_o - p_e) / (1 - p_e), p_o the observed agreement, p_e the agreement expected
    from the two marginals alone.  When both are constant and equal (p_e = 1) the formula is
    0/0; they agree on every image, and 1.0 is returned.
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"kappa needs two equally long, non-empty 1-d sequences, got {a.shape} and {b.shape}")
    po = float((a == b).mean())
    pa, pb = float(a.mean()), float(b.mean())
    pe = pa * pb + (1 - pa) * (1 - pb)
    if pe >= 1.0:
        return 1.0
    return (po - pe) / (1 - pe)


def per_class_top1(correct: Sequence[bool], labels: Sequence[int], n_classes: int) -> np.ndarray:
    """Top-1 accuracy in percent per class (NaN for a class with no image): float [n_classes]."""
    correct = np.asarray(correct, dtype=float)
    labels = np.asarray(labels, dtype=int)
    if correct.shape != labels.shape:
        raise ValueError(f"{len(correct)} correctness values for {len(labels)} labels")
    hits = np.bincount(labels, weights=correct, minlength=n_classes)[:n_classes]
    count = np.bincount(labels, minlength=n_classes)[:n_classes]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, 100.0 * hits / np.maximum(count, 1), np.nan)


# --------------------------------------------------------------------------- representation drift

def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear centred kernel alignment of features x [n, d1] and y [n, d2] of the same n images.

    CKA = ||Y'^T X'||_F^2 / (||X'^T X'||_F ||Y'^T Y'||_F), X', Y' centred per column
    (Kornblith et al., 2019).  1 for features equal up to rotation and isotropic scale.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"CKA needs two feature matrices over the same images, got {x.shape} and {y.shape}")
    x = x - x.mean(0, keepdims=True)
    y = y - y.mean(0, keepdims=True)
    cross = np.linalg.norm(y.T @ x) ** 2
    norm = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / norm) if norm > 0 else math.nan


def mean_cosine(x: np.ndarray, y: np.ndarray) -> float:
    """Cosine similarity of each image's two feature vectors, averaged over images."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"cosine similarity needs features of one shape, got {x.shape} and {y.shape}")
    num = (x * y).sum(-1)
    den = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
    return float(np.mean(num / np.maximum(den, 1e-12)))


# --------------------------------------------------------------------------- budget spending

def budget_summary(tokens: np.ndarray, gflops: np.ndarray, labels: np.ndarray, correct: np.ndarray,
                   n_classes: int) -> dict:
    """How a method spends its budget over images.

    ``tokens`` [n]: tokens per image (e.g. the mean sequence length over blocks); ``gflops`` [n]:
    FLOPs per image; ``labels`` [n]; ``correct`` [n] bool.  Returns the mean, spread and range
    of both, whether the count is constant, the mean per class, and the relation to
    correctness: the mean for correct and for wrong images and their point-biserial
    correlation (NaN when either side is constant).
    """
    tokens = np.asarray(tokens, dtype=np.float64)
    gflops = np.asarray(gflops, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    correct = np.asarray(correct, dtype=bool)
    count = np.bincount(labels, minlength=n_classes)[:n_classes]
    per_class = np.bincount(labels, weights=tokens, minlength=n_classes)[:n_classes] / np.maximum(count, 1)
    per_class_g = np.bincount(labels, weights=gflops, minlength=n_classes)[:n_classes] / np.maximum(count, 1)
    per_class = np.where(count > 0, per_class, np.nan)
    per_class_g = np.where(count > 0, per_class_g, np.nan)
    return {
        "n": int(len(tokens)),
        "tokens_mean": float(tokens.mean()), "tokens_std": float(tokens.std()),
        "tokens_min": float(tokens.min()), "tokens_max": float(tokens.max()),
        "gflops_mean": float(gflops.mean()), "gflops_std": float(gflops.std()),
        "gflops_min": float(gflops.min()), "gflops_max": float(gflops.max()),
        "constant": bool(np.ptp(tokens) == 0),
        "tokens_correct": float(tokens[correct].mean()) if correct.any() else math.nan,
        "tokens_wrong": float(tokens[~correct].mean()) if (~correct).any() else math.nan,
        "corr_tokens_correct": pearson(tokens, correct.astype(float)),
        "tokens_per_class": per_class.tolist(),
        "gflops_per_class": per_class_g.tolist(),
    }


# --------------------------------------------------------------------------- spatial prior

def keep_map(survive: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """How often each patch position survives, over images: bool [B, P] -> float [rows, cols]."""
    survive = np.asarray(survive, dtype=np.float64)
    if survive.ndim != 2 or survive.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"keep masks of shape {survive.shape} do not fit a {grid[0]}x{grid[1]} grid")
    return survive.mean(0).reshape(grid)


def centre_prior(grid: tuple[int, int], sigma: float = 0.25) -> np.ndarray:
    """An isotropic Gaussian centred on the grid, ``sigma`` a fraction of its larger side, peak 1."""
    rows, cols = grid
    yy = (np.arange(rows) + 0.5) / rows - 0.5
    xx = (np.arange(cols) + 0.5) / cols - 0.5
    scale = max(rows, cols)
    yy, xx = yy * rows / scale, xx * cols / scale
    d2 = yy[:, None] ** 2 + xx[None, :] ** 2
    return np.exp(-d2 / (2 * sigma ** 2))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equally long arrays (flattened); NaN when either is constant."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"correlation needs arrays of one size, got {a.size} and {b.size}")
    if a.size == 0 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else math.nan


def flatness_z(kmap: np.ndarray, n_images: int) -> float:
    """The largest deviation of a keep map from its own mean, in binomial standard errors.

    Under a flat map (every position kept with the same probability p, independently across
    images) each entry is a binomial proportion over ``n_images`` with standard error
    sqrt(p (1 - p) / n): |z| rarely exceeds 4 for a 7x7 grid.  0 for a map that is all 0 or 1.
    """
    kmap = np.asarray(kmap, dtype=np.float64)
    p = float(kmap.mean())
    se = math.sqrt(p * (1 - p) / max(1, n_images))
    if se == 0:
        return 0.0 if np.ptp(kmap) == 0 else math.inf
    return float(np.abs(kmap - p).max() / se)


# --------------------------------------------------------------------------- FLOPs levels

def flops_level(targets: Sequence[float], flops_rel: Optional[float], sweep_targets: Sequence[float],
                tolerance: float) -> Optional[float]:
    """The matched-FLOPs level a setting belongs to.

    Its own FLOPs target when the plan gave it one; else the sweep's target nearest its measured
    FLOPs ratio, within the tolerance; else the ratio itself, rounded to 0.01 (settings off the
    grid, such as fixed keep rates, then meet others at the same ratio).  None for dense.
    """
    if targets:
        return float(targets[0])
    if flops_rel is None:
        return None
    near = [t for t in sweep_targets if abs(t - flops_rel) <= tolerance + 1e-12]
    if near:
        return float(min(near, key=lambda t: abs(t - flops_rel)))
    return round(float(flops_rel), 2)
