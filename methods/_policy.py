"""DynamicViT's masked softmax, shared by the methods that train with a soft keep policy
(DynamicViT, DiffRate's search): installed as ``plan.policy_softmax``, it makes every block's
attention honour ``TokenState.policy``.

Not a method (discovery skips files whose name starts with ``_``).
"""

from __future__ import annotations

import torch


def softmax_with_policy(attn: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Attention logits [B, H, N, N] -> probabilities where dropped tokens (``policy`` [B, N, 1]
    at 0) are not attended to, except by themselves."""
    b, n, _ = policy.shape
    attn_policy = policy.reshape(b, 1, 1, n)
    eye = torch.eye(n, dtype=attn_policy.dtype, device=attn_policy.device).view(1, 1, n, n)
    attn_policy = attn_policy + (1.0 - attn_policy) * eye
    max_att = torch.max(attn, dim=-1, keepdim=True)[0]
    attn = attn - max_att
    attn = attn.to(torch.float32).exp_() * attn_policy.to(torch.float32)
    attn = (attn + eps / n) / (attn.sum(dim=-1, keepdim=True) + eps)
    return attn.type_as(max_att)
