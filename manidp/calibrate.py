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
from typing import Optional

import torch
import torch.nn as nn

from .flops import count_macs

__all__ = ["calibrate_bn", "calibrate_keep_ratio", "calibrate_target_macs", "midpoint_threshold", "RANDOM_GATE_CLAMP"]

# Upper clamp of the gate values of a calibrated random model: the kept values average 1 after
# calibration, so this saturates only those above twice the mean (calibrate_bn).
RANDOM_GATE_CLAMP = 2.0


def midpoint_threshold(g: torch.Tensor, keep: float) -> float:
    """A threshold keeping about ``keep`` of the positive entries of ``g``.

    It sits in the middle of the widest gap between neighbouring values near the
    requested quantile, so that rounding differences between implementations
    cannot move an instance across it.
    """
    v = g.detach().flatten().float().sort(descending=True).values
    v = v[v > 0]
    if v.numel() == 0 or keep <= 0:
        return float("inf")
    n = v.numel()
    k = min(max(int(round(keep * n)), 1), n)
    if k == n:
        return float(v[-1]) / 2.0
    lo, hi = max(k - max(n // 50, 1), 1), min(k + max(n // 50, 1), n - 1)
    ks = torch.arange(lo, hi + 1)
    gaps = (v[ks - 1] - v[ks]) / v[ks - 1]
    best = int(ks[int(gaps.argmax())])
    return float(v[best - 1] + v[best]) / 2.0


def _top_mean(g: torch.Tensor, keep: Optional[float]) -> float:
    """Mean of the positive gate values a threshold at ``keep`` would pass (all positive if None)."""
    v = g[g > 0].flatten().sort(descending=True).values
    if keep is not None:
        v = v[: max(int(round(keep * v.numel())), 1)]
    return float(v.mean()) if v.numel() else 0.0


def _patch_gates(gates, method: str, make):
    """Temporarily replace ``method`` of each gate by ``make(gate, original)``; returns an undo."""
    for gate in gates:
        setattr(gate, method, types.MethodType(make(gate, getattr(gate, method)), gate))

    def undo():
        for gate in gates:
            delattr(gate, method)  # drop the instance attribute, back to the class method
    return undo


def _unit_mean(keep: Optional[float]):
    def make(gate, original):
        """gate_values that first rescales fc2 so the gate values it will keep average 1."""
        def gate_values(self, pooled):
            g = original(pooled)
            mean = _top_mean(g, keep)
            if mean > 0:
                self.fc2.weight.mul_(1.0 / mean)
                self.fc2.bias.mul_(1.0 / mean)
                g = original(pooled)
            return g
        return gate_values
    return make


def _at_keep(keep: float):
    def make(gate, original):
        def active(self, g):
            self.threshold.fill_(midpoint_threshold(g, keep))
            return original(g)
        return active
    return make


@torch.no_grad()
def _calibration_pass(model: nn.Module, x: torch.Tensor, keep: Optional[float], bn: bool,
                      gate_scale: bool) -> None:
    """One eval forward pass in which, in forward order, BN statistics (``bn``), gate scales
    (``gate_scale``) and thresholds (``keep``) are set from what each layer sees."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)] if bn else []
    saved = [(m.momentum, m.training) for m in bns]
    gates = list(model.gates())
    sums = [g.mask_sum.clone() for g in gates]
    undos = []
    if gate_scale:
        undos.append(_patch_gates(gates, "gate_values", _unit_mean(keep)))
    if keep is not None:
        undos.append(_patch_gates(gates, "active", _at_keep(keep)))
    was_training = model.training
    model.eval()
    counts = {}  # BN module -> values per channel it normalised

    def count(m, inp, out):
        counts[m] = inp[0].numel() // inp[0].shape[1]
    hooks = [m.register_forward_hook(count) for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch sets the statistics exactly
            m.train()
        model(x)
        # BN normalises the batch by its biased variance but records the unbiased one; on small
        # maps the two differ by percents, which would move eval-mode gate values across the
        # thresholds just set.  Record the variance the pass normalised with.
        for m, n in counts.items():
            if n > 1:
                m.running_var.mul_((n - 1) / n)
    finally:
        for h in hooks:
            h.remove()
        for undo in undos:
            undo()
        for m, (momentum, training) in zip(bns, saved):
            m.momentum = momentum
            m.train(training)
        for g, s in zip(gates, sums):
            g.mask_sum.copy_(s)
        model.train(was_training)


def calibrate_bn(model: nn.Module, x: torch.Tensor, keep: Optional[float] = None) -> None:
    """Make a random-weight model behave like a trained one on batch ``x``.

    A freshly initialised deep ResNet has unit BN running variances and gates
    whose values are far from 1, so eval-mode activations grow block after
    block and overflow.  In one pass, in forward order, this sets every BN's
    running statistics to the batch statistics and rescales each gate's fc2 so
    its positive values average 1 (a positive scale does not change which
    channels a threshold keeps).  With ``keep`` it also sets the thresholds.

    Every gate's ``clamp_max`` is then lowered to :data:`RANDOM_GATE_CLAMP`.  A
    random gate's value grows in proportion to its input, so a block's residual
    branch grows with the square of the block's input: on images a little
    larger than the calibration batch the activations of a deep network
    (ResNet-56) overflow within a few blocks.  Trained gates are bounded by their
    training; this bound plays that part for random ones.

    The model is marked, so that later :func:`calibrate_keep_ratio` calls
    recompute the BN statistics together with the new thresholds (closing
    channels changes what every later BN sees).
    """
    _calibration_pass(model, x, keep, bn=True, gate_scale=True)
    for gate in model.gates():
        gate.clamp_max = min(gate.clamp_max, RANDOM_GATE_CLAMP)
    model._manidp_random_bn = True


def calibrate_keep_ratio(model: nn.Module, x: torch.Tensor, keep: float) -> None:
    """Set every gate's threshold so it keeps about ``keep`` of its channels on batch ``x``.

    Gates are calibrated in forward order within one pass, so each sees the
    inputs its predecessors' new thresholds produce.  On a model that went
    through :func:`calibrate_bn`, BN statistics and gate scales are recomputed in
    the same pass (a random gate's output grows with its input, so without that
    closing channels would feed back into ever larger activations).
    """
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep ratio must be in [0, 1]; got {keep}")
    random_init = getattr(model, "_manidp_random_bn", False)
    _calibration_pass(model, x, keep, bn=random_init, gate_scale=random_init)


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
