"""The C++ CPU ops of ``manidp._C`` (``torch.ops.manidp.*``), docs/DESIGN.md 7.2.

Importing this module loads the extension, whose static initialisers register the
schema of every op and the CPU (and, where built, CUDA) kernels
(``csrc/registration.cpp``), and :mod:`manidp.kernels.fake`, which registers the
fake kernels, so ``torch.compile`` and ``torch.export`` can trace code that calls
the ops without running them.

Ops (schemas in ``csrc/registration.cpp``):

``gate_compact(pooled, fc1, fc2, fc2_bias, threshold, clamp_max) -> (g, idx, cnt)``
    The gate of docs/DESIGN.md 1.1 on pooled inputs ``(N, Cin)``: ``g`` (N, C) fp32 gate values
    (before the threshold), ``idx`` (N, C) int32 with each row's active channels
    (``g >= threshold and g > 0``) first in ascending order, then -1, ``cnt`` (N,) int32.

``gated_block(x, w1, b1, w2, b2, ws, bs, g1_fc1, g1_fc2, g1_bias, g1_threshold, g2_fc1, g2_fc2,
g2_bias, g2_threshold, clamp_max, stride, mode=0) -> (out, cnt1, cnt2)``
    One gated basic block (docs/DESIGN.md 3.2) with BN-folded fp32 weights; outputs follow the
    :class:`~manidp.deploy.backends.BlockResult` contract.  ``mode`` (see :data:`MODES`): ``auto``
    lets the kernel choose, ``instance`` one compact conv per instance (the AVX-512 or AVX2 gathered
    conv where available), ``union`` one batched library conv over the union of the batch's active
    channels, ``library`` one compact library conv per instance on gathered weights.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..kernels.build_config import BLOCK_MODES

__all__ = ["HAVE_CPU_OPS", "IMPORT_ERROR", "gate_compact", "gated_block", "MODES"]

MODES = BLOCK_MODES

try:
    from ..kernels import fake  # noqa: F401  (loads manidp._C, which registers the ops, and their fakes)
    IMPORT_ERROR: Optional[BaseException] = None
except ImportError as e:  # extension not built: the cpu backend reports itself unavailable
    IMPORT_ERROR = e

HAVE_CPU_OPS = IMPORT_ERROR is None and hasattr(torch.ops.manidp, "gated_block")


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
