"""ManiDP training losses, exactly as docs/DESIGN.md 1.3.

    t      = thre_cls * L_prev
    w_i    = [ce_i < t] * clamp((t - ce_i) / t, min=1e-10) ** gamma
    L_cplx = sum_over_gates mean_i(lasso_i * w_i)
    L_sim  = || G(feat) - G(g) ||_F^2 / N^2,  G(F) = normalize_rows(F) @ normalize_rows(F).T
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["complexity_weights", "complexity_loss", "similarity_loss", "gram"]


def complexity_weights(ce: torch.Tensor, mean_prev_loss: float, thre_cls: float = 0.5,
                       gamma: float = 1.0) -> torch.Tensor:
    """Per-instance weights of the complexity (sparsity) loss.

    Args:
        ce: per-instance cross-entropy (N,).
        mean_prev_loss: mean per-instance training loss of the previous epoch (``L_prev``).
        thre_cls: fraction of ``L_prev`` under which an instance counts as easy.
        gamma: exponent sharpening the weights.

    Returns:
        (N,) weights, zero for instances with ``ce_i >= t``, growing towards 1 as
        ``ce_i`` goes to 0.  They carry no gradient.
    """
    ce = ce.detach()
    t = float(thre_cls) * float(mean_prev_loss)
    if not t > 0:  # no previous loss information (or a zero loss): nothing counts as easy
        return torch.zeros_like(ce)
    easy = (ce < t).to(ce.dtype)
    return easy * torch.clamp((t - ce) / t, min=1e-10) ** gamma


def complexity_loss(lassos: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_over_gates mean_i(lasso_i * w_i)``; ``lassos`` holds one (N,) tensor per gate."""
    if len(lassos) == 0:
        return weights.new_zeros(())
    w = weights.detach()
    return torch.stack([(lasso * w).mean() for lasso in lassos]).sum()


def gram(features: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Cosine-similarity matrix of the rows of ``features`` (N, C).

    An all-zero row (for instance a gate that closed every channel) normalises to
    zero instead of NaN, so its similarities are 0.
    """
    f = F.normalize(features, p=2, dim=1, eps=eps)
    return f @ f.t()


def similarity_loss(g: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
    """Manifold similarity of one gate: ``||G(feat) - G(g)||_F^2 / N^2``.

    Args:
        g: the gate's pre-threshold values (N, C).
        feat: the matching pooled feature (N, C).
    Neither side is detached.
    """
    if g.shape[0] != feat.shape[0]:
        raise ValueError(f"g and feat must have the same batch size; got {tuple(g.shape)} and {tuple(feat.shape)}")
    n = g.shape[0]
    diff = gram(feat.float()) - gram(g.float())
    return (diff * diff).sum() / (n * n)
