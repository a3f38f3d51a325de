"""`dct`: compress the patch tokens along the sequence with a truncated discrete cosine transform.

Before blocks 3, 6 and 9 of 12 (the quarter points of other depths), the ``n`` patch
tokens (the prefix tokens are kept as they are) are transformed along the token axis
with the orthonormal DCT-II, only the ``K = ceil(keep_rate * n)`` lowest frequencies are
kept, and the orthonormal inverse transform of length ``K`` turns them back into ``K``
tokens: a low-pass resampling of the token sequence (in raster order of the patch grid).
The whole block, attention included, then runs on ``prefix + K`` tokens.

Source: the sequence-downsampling operator of the Fourier Transformer (He et al., "Fourier
Transformer: Fast Long Range Modeling by Removing Sequence Redundancy with FFT Operator",
Findings of ACL 2023, arXiv:2305.15099; code https://github.com/LUMIA-Group/FourierTransformer,
``LRA/code/attention_dct.py``; no license file in the repository, its fairseq part is
MIT).  Its ``DCTAttention`` keeps the class token, takes ``dct(x, norm='ortho')`` over the
tokens, keeps the first ``ceil(T * dct_percentage)`` coefficients and applies ``idct(...,
norm='ortho')`` of that length: the output is a *resampled K-token sequence*, not the K
coefficients.  We keep that choice: the following blocks (LayerNorm, MLP, attention
with pretrained weights) expect tokens that look like tokens, and the resampled
sequence is a smooth interpolation of the old tokens (an old token and the new tokens
near its place in the sequence stay alike), while the coefficients (the first one is
``sqrt(n)`` times the mean token) are not.  That paper trains its models with the
operator; no paper we found defines it for a pretrained ViT without training, so the
following are our choices for the training-free setting:

- ``rescale`` (default on): the output is multiplied by ``sqrt(K / n)``, so that a
  constant sequence stays the same constant (the orthonormal pair otherwise scales the
  mean token by ``sqrt(n / K)``, which a pretrained model has never seen).  Off, the
  operator is the official one exactly;
- the residual stream ``x`` itself is resampled, before the block (the official block
  resamples its LayerNorm output and carries that as the residual: a trained-in quirk
  that would break a pretrained model);
- ``K = ceil(keep_rate * n)`` counts the patch tokens entering the site (the official
  ``T`` counts the class token as well);
- three sites (blocks 3, 6, 9), as the staged pruning methods of this benchmark; the
  official code takes a list of layers per task.

Implementation: the transform, truncation and inverse are one precomputed matrix ``M``
[K, n] (``M = sqrt(K/n) * C_K^T C_n[:K]``, ``C_m`` the orthonormal DCT-II matrix of
size ``m``), applied as ``M @ x`` (``TokenState.mix``).  fvcore counts that matmul natively
(``K * n * C`` multiply-adds per image), so the transform's cost is in the FLOPs.

Tokens are combined linearly (family "merging"); the weights are the interpolation
kernel of the truncated DCT, so some are negative.  Bookkeeping (sizes, sources, for
pictures) follows each old token to the new token it weighs most in (``TokenState.mix``).
Deterministic, training-free, static token counts (compiles as one graph).
"""

from __future__ import annotations

import math
import torch

from tokenbench.backbones import TokenState, backbone_of
from tokenbench.methods._knobs import keep_rate_param
from tokenbench.registry import GridRestore, Method, Param, register


# --------------------------------------------------------------------------- algorithm

def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal DCT-II matrix [n, n]: ``C[k, t] = a_k cos(pi (t + 1/2) k / n)``,
    ``a_0 = sqrt(1/n)``, ``a_k = sqrt(2/n)``; ``C @ x`` transforms along the first axis, ``C.T`` inverts."""
    t = torch.arange(n, dtype=torch.float64)
    k = torch.arange(n, dtype=torch.float64)[:, None]
    c = torch.cos(math.pi * (t + 0.5) * k / n) * math.sqrt(2.0 / n)
    c[0] = math.sqrt(1.0 / n)
    return c.to(dtype)


def resampler(n: int, k: int, rescale: bool = True, dtype=torch.float32, device=None) -> torch.Tensor:
    """The matrix [k, n] that maps ``n`` tokens to ``k``: DCT-II of length ``n``, keep the ``k``
    lowest frequencies, inverse DCT of length ``k`` (times ``sqrt(k/n)`` with ``rescale``).
    Built in float64, then cast."""
    m = dct_matrix(k).T @ dct_matrix(n)[:k]
    if rescale:
        m = m * math.sqrt(k / n)
    return m.to(dtype=dtype, device=device)


def n_kept(keep_rate: float, n: int) -> int:
    """Tokens kept of ``n``: ``ceil(keep_rate * n)``, at least 1."""
    return max(1, math.ceil(keep_rate * n))


def dct_compress(x: torch.Tensor, n_prefix: int, k: int, rescale: bool = True) -> torch.Tensor:
    """``x`` [B, N, C] with its ``N - n_prefix`` patch tokens resampled to ``k`` (prefix kept)."""
    n = x.shape[1] - n_prefix
    m = resampler(n, k, rescale, x.dtype, x.device)
    return torch.cat([x[:, :n_prefix], torch.matmul(m, x[:, n_prefix:])], dim=1)


# --------------------------------------------------------------------------- hook

def _dct_hook(keep_rate: float, rescale: bool, n_site: int):
    """The hook of one site; its matrix for the expected ``n_site`` patch tokens is built once
    (in float64; outside any traced graph, so FLOPs counts see only ``M @ x``)."""
    built = {n_site: resampler(n_site, n_kept(keep_rate, n_site), rescale, torch.float64)}

    def pre(block, x: torch.Tensor, st: TokenState) -> torch.Tensor:
        n = int(x.shape[1]) - st.n_prefix  # a plain int, also under torch.jit.trace (fvcore)
        k = n_kept(keep_rate, n)
        if k >= n:
            return x
        m = built.get(n)
        if m is None:  # another input size than the model's own
            m = built[n] = resampler(n, k, rescale, torch.float64)
        return st.mix(x, m.to(dtype=x.dtype, device=x.device))

    return pre


@register
class DCT(Method):
    name = "dct"
    version = "1"
    summary = "Truncated-DCT resampling of the patch tokens along the sequence (before blocks 3, 6, 9)."
    family = "merging"
    params = (
        keep_rate_param("fraction of the patch tokens kept at each of the three sites "
                        "(the lowest ceil(keep_rate * n) DCT frequencies)"),
        Param("rescale", "bool", True, "multiply the output by sqrt(K/n) so a constant sequence is unchanged "
                                       "(off: the official orthonormal pair)"),
    )
    knob = "keep_rate"
    restores_grid = GridRestore.UNMERGE

    def apply(self, model, keep_rate=0.7, rescale=True, **params):
        bb = backbone_of(model, self.name)
        plan = bb.prepare(self.name)
        if keep_rate < 1:
            tokens, _ = self.expected_tokens(model, keep_rate, rescale)
            for i in bb.sites("quarters"):
                plan.pre[i] = _dct_hook(float(keep_rate), bool(rescale), tokens[i - 1] - bb.n_prefix)
        return model

    def expected_tokens(self, model, keep_rate=0.7, rescale=True, **params):
        bb = backbone_of(model, self.name)
        p, n = bb.n_prefix, bb.num_patches
        sites = set(bb.sites("quarters")) if keep_rate < 1 else set()
        tokens, tokens_mlp = [], []
        for i in range(bb.depth):
            if i in sites:
                n = min(n, n_kept(float(keep_rate), n))
            tokens.append(n + p)
            tokens_mlp.append(n + p)
        return tokens, tokens_mlp
