"""`random`: keep a uniformly random subset of the patch tokens (the control for pruning).

The same sites and counts as ``topk`` (inside blocks 3, 6 and 9 of a 12-block ViT,
between attention and MLP, ``int(N0 * keep_rate ** s)`` patch tokens at stage ``s``),
the subset drawn independently per image.  A generator seeded from ``seed`` is reset at
the start of every forward, on the input's device, so the same seed and input give the
same output.  Prefix tokens (if any) are always kept; no class token is needed, and
average pooling needs no size weighting since nothing is merged.

Kept tokens stay in their original (spatial) order.
"""

from __future__ import annotations

import torch

from tokenbench import vit
from tokenbench.registry import Method, Param, register




def _make_on_start(seed: int):
    def on_start(model, x, st: vit.TokenState) -> None:
        st.extra["random_n0"] = x.shape[1] - st.n_prefix
        g = torch.Generator(device=x.device)
        g.manual_seed(seed)
        st.extra["random_gen"] = g
    return on_start


def _make_hook(stage: int, keep_rate: float):
    ratio = keep_rate ** (stage + 1)

    def hook(block, x: torch.Tensor, st: vit.TokenState, info) -> torch.Tensor:
        npf = st.n_prefix
        b, n, _ = x.shape
        k = max(1, int(st.extra["random_n0"] * ratio))
        if k >= n - npf:  # nothing to prune (keep_rate == 1)
            return x
        noise = torch.rand(b, n - npf, generator=st.extra["random_gen"], device=x.device)
        keep_idx = noise.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
        if npf:
            prefix = torch.arange(npf, device=x.device, dtype=keep_idx.dtype).expand(b, npf)
            keep_idx = torch.cat([prefix, keep_idx + npf], dim=1)
        return st.keep(x, keep_idx)

    return hook


@register
class RandomPrune(Method):
    name = "random"
    summary = "Keep a random subset of patch tokens in blocks 3, 6, 9 (keep_rate ** s of them), per image."
    params = (
        Param("keep_rate", "float", 0.7, "fraction of patch tokens kept at each of the three stages",
              min=0.0, max=1.0, min_exclusive=True),
        Param("seed", "int", 0, "seed of the random choice (reset at every forward)"),
    )
    learned = False
    needs_class_token = False
    deterministic = False
    search_param = "keep_rate"

    def apply(self, model, keep_rate: float = 0.7, seed: int = 0, **params):
        plan = vit.prepare(model, self.name)
        plan.on_start.append(_make_on_start(seed))
        for s, i in enumerate(vit.depth_sites(len(model.blocks))):
            plan.mid[i] = _make_hook(s, keep_rate)
        return model

    def expected_tokens(self, model, keep_rate: float = 0.7, **params):
        return vit.staged_schedule(model, keep_rate, "mid")
