"""Set gate thresholds from sample data: a fixed keep ratio, or a target MAC fraction.

Used by the benchmarks (random-weight models at a chosen sparsity) and by the
tests.  Calibration runs one eval forward pass in which every gate, in forward
order, picks its threshold from the gate values it sees on that batch, halfway
between two neighbouring values so that no instance sits exactly on it (an
exact tie would make the active set depend on rounding).
"""

from __future__ import annotations

import math
import types
from typing import Iterable, Optional

import torch
import torch.nn as nn

from .flops import count_macs

__all__ = ["calibrate_bn", "calibrate_keep_ratio", "calibrate_target_macs", "midpoint_threshold"]


def midpoint_threshold(g: torch.Tensor, keep: float) -> float:
    """A threshold keeping about ``keep`` of the positive entries of ``g``, midway between values."""
    v = g.detach().flatten().float().sort(descending=True).values
    v = v[v > 0]
    if v.numel() == 0 or keep <= 0:
        return float("inf")
    k = min(max(int(round(keep * v.numel())), 1), v.numel())
    if k == v.numel():
        return float(v[-1]) / 2.0
    return float(v[k - 1] + v[k]) / 2.0


@torch.no_grad()
def calibrate_bn(model: nn.Module, x: torch.Tensor) -> None:
    """Set BN running statistics to those of batch ``x`` (for random-weight models).

    A freshly initialised deep ResNet has unit running variances, so eval-mode
    activations grow block after block and overflow; data statistics keep a
    random model's features, gates and timings realistic.  Gate statistics
    (``mask_sum``) are left as they were.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(bn.momentum, bn.training) for bn in bns]
    sums = [g.mask_sum.clone() for g in model.gates()] if hasattr(model, "gates") else []
    was_training = model.training
    model.eval()
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: one batch sets the statistics exactly
            bn.train()
        model(x)
    finally:
        for bn, (momentum, training) in zip(bns, saved):
            bn.momentum = momentum
            bn.train(training)
        for g, s in zip(model.gates() if sums else [], sums):
            g.mask_sum.copy_(s)
        model.train(was_training)


@torch.no_grad()
def calibrate_keep_ratio(model: nn.Module, x: torch.Tensor, keep: float,
                         gates: Optional[Iterable[nn.Module]] = None) -> None:
    """Set every gate's threshold so it keeps about ``keep`` of its channels on batch ``x``.

    Gates are calibrated in forward order within one pass, so each sees the
    inputs its predecessors' new thresholds produce.
    """
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep ratio must be in [0, 1]; got {keep}")
    gates = list(model.gates() if gates is None else gates)
    originals = []
    for gate in gates:
        originals.append(gate.active)

        def active(self, g, _orig=gate.active):
            self.threshold.fill_(midpoint_threshold(g, keep))
            return _orig(g)
        gate.active = types.MethodType(active, gate)
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        for gate in gates:
            del gate.active  # drop the instance attribute, back to the class method
        model.train(was_training)


@torch.no_grad()
def calibrate_target_macs(model: nn.Module, x: torch.Tensor, target: float, tol: float = 0.01,
                          max_iter: int = 20) -> float:
    """Calibrate thresholds so mean dynamic MACs on ``x`` are about ``target`` x dense.

    Bisects the per-gate keep ratio; returns the achieved fraction.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target MAC fraction must be in (0, 1]; got {target}")
    lo, hi, frac = 0.0, 1.0, math.nan
    for _ in range(max_iter):
        keep = (lo + hi) / 2
        calibrate_keep_ratio(model, x, keep)
        frac = 1.0 - count_macs(model, x).reduction
        if abs(frac - target) <= tol:
            break
        lo, hi = (keep, hi) if frac < target else (lo, keep)
    return frac
