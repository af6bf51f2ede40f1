"""The C++ custom ops of ``manidp._C`` (``torch.ops.manidp.*``) and their fake kernels.

Importing this module loads the extension, whose static initialisers register the
op schemas and the CPU kernels (``csrc/registration.cpp``).  Fake (meta) kernels
are registered here, so ``torch.compile`` and ``torch.export`` can trace code that
calls the ops without running them.

Ops (see the schemas in ``csrc/registration.cpp``):

``gate_compact(pooled, fc1, fc2, fc2_bias, threshold, clamp_max) -> (g, idx, cnt)``
    The gate of DESIGN 1.1 on pooled inputs ``(N, Cin)``: ``g`` (N, C) fp32 gate values
    (before the threshold), ``idx`` (N, C) int32 with each row's active channels
    (``g >= threshold and g > 0``) first in ascending order, then -1, ``cnt`` (N,) int32.

``gated_block(x, w1, b1, w2, b2, ws, bs, g1_fc1, g1_fc2, g1_bias, g1_threshold, g2_fc1, g2_fc2,
g2_bias, g2_threshold, clamp_max, stride, mode=0) -> (out, idx1, cnt1, idx2, cnt2)``
    One gated basic block (DESIGN 3.2) with BN-folded fp32 weights; outputs follow the
    :class:`~manidp.deploy.backends.BlockResult` contract.  ``mode`` (see :data:`MODES`): 0 lets the
    kernel choose, 1 one compact conv per instance (the AVX-512 or AVX2 gathered conv where available),
    2 one batched library conv over the union of the batch's active channels, 3 one compact
    library conv per instance on gathered weights.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["HAVE_CPU_OPS", "IMPORT_ERROR", "gate_compact", "gated_block", "MODES"]

MODES = {"auto": 0, "instance": 1, "union": 2, "library": 3}

try:
    from .. import _C  # noqa: F401  (loading the library registers the ops)
    IMPORT_ERROR: Optional[BaseException] = None
except ImportError as e:  # extension not built: the cpu backend reports itself unavailable
    IMPORT_ERROR = e

HAVE_CPU_OPS = IMPORT_ERROR is None and hasattr(torch.ops.manidp, "gated_block")


def _register_fakes() -> None:
    @torch.library.register_fake("manidp::gate_compact")
    def _gate_compact_fake(pooled, fc1, fc2, fc2_bias, threshold, clamp_max):
        n, c = pooled.shape[0], fc2.shape[0]
        return (pooled.new_empty((n, c), dtype=torch.float32), pooled.new_empty((n, c), dtype=torch.int32),
                pooled.new_empty((n,), dtype=torch.int32))

    @torch.library.register_fake("manidp::gated_block")
    def _gated_block_fake(x, w1, b1, w2, b2, ws, bs, g1_fc1, g1_fc2, g1_bias, g1_threshold, g2_fc1, g2_fc2,
                          g2_bias, g2_threshold, clamp_max, stride, mode=0):
        n, _, h, w = x.shape
        c = w1.shape[0]
        ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1  # 3x3 conv, padding 1
        idx = x.new_empty((n, c), dtype=torch.int32)
        cnt = x.new_empty((n,), dtype=torch.int32)
        return x.new_empty((n, c, ho, wo)), idx, cnt, torch.empty_like(idx), torch.empty_like(cnt)


if HAVE_CPU_OPS:
    _register_fakes()


def gate_compact(pooled: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor, fc2_bias: torch.Tensor,
                 threshold: torch.Tensor, clamp_max: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.manidp.gate_compact``: gate values, compacted active ids and counts."""
    return torch.ops.manidp.gate_compact(pooled, fc1, fc2, fc2_bias, threshold, float(clamp_max))


def gated_block(x: torch.Tensor, w1, b1, w2, b2, ws, bs, gate1, gate2, clamp_max: float, stride: int,
                mode: str = "auto"):
    """``torch.ops.manidp.gated_block`` with each gate given as ``(fc1, fc2, fc2_bias, threshold)``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}; got {mode!r}")
    return torch.ops.manidp.gated_block(x, w1, b1, w2, b2, ws, bs, *gate1, *gate2, float(clamp_max), int(stride),
                                        MODES[mode])
