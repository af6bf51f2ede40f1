"""What the GPU backends (``triton`` and ``cuda``) share: weight layouts and the block driver.

Both backends implement the GPU op contracts ``gpu_gate`` and ``gated_conv``
(schemas in ``csrc/registration.cpp``, semantics in docs/DESIGN.md 7.2): the ``cuda``
backend with the CUDA kernels of ``manidp::gpu_gate`` / ``manidp::gated_conv``, the
``triton`` backend with ``manidp::triton_gpu_gate`` / ``manidp::triton_gated_conv``.
:class:`GPUBlockRunner` runs a gated block (docs/DESIGN.md 3.2) on either pair, so the two
backends differ only in their kernels.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from ..flops import conv_out_size
from ..kernels.build_config import MODE_CONV1, MODE_CONV2, MODE_PLAIN
from ..kernels.fake import part_tiles
from .backends import BlockResult

__all__ = ["num_sms", "min_block_m", "choose_block_m", "weights_by_output", "weights_by_input", "prepare_gpu_weights",
           "channels_last", "debug_checks", "check_gate_permutation", "GPUBlockRunner"]

_SMS: Dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Multiprocessor count of a CUDA device; 1 for CPU tensors (the Triton interpreter: big tiles)."""
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def min_block_m(device: torch.device) -> int:
    """Fewest tile rows on ``device``: 64 from sm_90 on (wgmma works on 64-row tiles; smaller ones fall
    back to mma.sync and add compiles), 32 elsewhere (CPU tensors included)."""
    if device.type != "cuda":
        return 32
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return 64 if torch.cuda.get_device_capability(idx)[0] >= 9 else 32


def choose_block_m(n: int, hwo: int, cout: int, sms: int, min_rows: int = 32) -> int:
    """Pixel-tile height: 128 for large maps, halved (down to ``min_rows``) until the grid has ~2 programs per SM.

    ``tl.dot`` / the MMA paths need at least 16 rows; tiles never exceed the map by much.
    """
    bm = 128
    while bm > min_rows and bm >= 2 * hwo:
        bm //= 2
    while bm > min_rows and n * part_tiles(hwo, bm) * max(1, -(-cout // 64)) < 2 * sms:
        bm //= 2
    return bm


def weights_by_output(w: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, k, k) -> (Cout, k*k, Cin): the plain and conv1 layout of ``gated_conv``, rows read through the
    output list and contiguous along the input channels."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], w.shape[2] * w.shape[3], w.shape[1]).contiguous()


def weights_by_input(w: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, k, k) -> (k*k, Cin, Cout): the conv2 layout of ``gated_conv``, rows (tap, input channel) read
    through the active-input list and contiguous along the output channels (docs/DESIGN.md 7.4)."""
    return w.permute(2, 3, 1, 0).reshape(w.shape[2] * w.shape[3], w.shape[1], w.shape[0]).contiguous()


def prepare_gpu_weights(engine, dtype: torch.dtype) -> None:
    """Put each block's conv weights in the compute-dtype layouts the kernels read: conv1 and the shortcut
    :func:`weights_by_output`, conv2 :func:`weights_by_input`."""
    for blk in engine.blocks:
        c: dict = {}
        for part in ("conv1", "conv2", "shortcut"):
            if part == "shortcut" and not blk.has_shortcut:
                continue
            p = getattr(blk, part)
            layout = weights_by_input if part == "conv2" else weights_by_output
            c[part + ".w"] = layout(p.weight.to(dtype))
            c[part + ".b"] = p.bias.float().contiguous()
        for part in ("gate1", "gate2"):
            gt = getattr(blk, part)
            c[part] = (gt.fc1.float().contiguous(), gt.fc2.float().contiguous(),
                       gt.fc2_bias.float().contiguous(), gt.threshold.float().reshape(()).contiguous(),
                       float(gt.clamp_max))
        blk.cache["gpu"] = c


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last memory format: the layout the GPU backends' stem and blocks read (no copy if it is)."""
    return x.contiguous(memory_format=torch.channels_last)


def debug_checks() -> bool:
    """``MANIDP_DEBUG_CHECKS=1``: check every gate's output on the host (synchronises; never inside a capture)."""
    return os.environ.get("MANIDP_DEBUG_CHECKS", "0") not in ("", "0")


def check_gate_permutation(idx: torch.Tensor, cnt: torch.Tensor) -> None:
    """RuntimeError unless each row of ``idx`` is a permutation of ``0..C-1`` whose first ``cnt`` entries ascend.

    The conv kernels read ``idx`` as a full permutation (docs/DESIGN.md 7.2): a repeated or missing
    channel would write one output channel twice and leave another unwritten.
    """
    n, c = idx.shape
    ar = torch.arange(c, device=idx.device, dtype=idx.dtype)
    if not torch.equal(idx.sort(dim=1).values, ar.expand(n, c)):
        raise RuntimeError("gate index output is not a permutation of the channels in every row")
    if bool(((cnt < 0) | (cnt > c)).any()):
        raise RuntimeError(f"gate counts out of [0, {c}]: {cnt.tolist()}")
    pos = torch.arange(c, device=idx.device).expand(n, c)
    active = pos < cnt.long()[:, None]
    rising = idx[:, 1:] > idx[:, :-1]
    if not bool((rising | ~(active[:, 1:])).all()):
        raise RuntimeError("gate active channels are not in ascending order")


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) contiguous view of an NCHW-shaped tensor (no copy if it is channels-last)."""
    y = x.permute(0, 2, 3, 1)
    return y if y.is_contiguous() else y.contiguous()


def _tf32(dtype: torch.dtype) -> bool:
    """TF32 for fp32 convs unless torch's fp32 matmul precision is "highest" (the CUDA kernels ignore it)."""
    return dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"


class GPUBlockRunner:
    """Runs gated blocks through a ``gate`` and a ``gated_conv`` op of the GPU contract.

    Block outputs are channels-last tensors returned as (N, C, H, W) views.  The
    channel sums the conv2 epilogue writes are carried to the next block's
    gate1 when its input is that very tensor; otherwise (first block) the input
    is pooled with one reduction.
    """

    def __init__(self, gate, gated_conv, sms: Optional[int] = None, min_rows: Optional[int] = None):
        self.gate = gate
        self.gated_conv = gated_conv
        # The GPU the tile rows are chosen for (multiprocessors, fewest rows); None: the input's device.
        self.sms = sms
        self.min_rows = min_rows
        self._carry: Optional[tuple] = None

    def pooled_parts(self, x_nchw: torch.Tensor, x: torch.Tensor):
        carry = self._carry
        if carry is not None and carry[0] is x_nchw:
            return carry[1], carry[2]
        n, h, w, c = x.shape
        return x.float().sum(dim=(1, 2)).reshape(n, 1, c), h * w

    def _gate(self, part: torch.Tensor, hw: int, params: tuple):
        g, idx, cnt = self.gate(part, hw, *params)
        if debug_checks():
            check_gate_permutation(idx, cnt)
        return g, idx, cnt

    def block(self, blk, x_nchw: torch.Tensor) -> BlockResult:
        c = blk.cache["gpu"]
        x = _nhwc(x_nchw)
        n, h, w, _ = x.shape
        ho, wo = conv_out_size(h, 3, blk.stride, 1), conv_out_size(w, 3, blk.stride, 1)
        bm = choose_block_m(n, ho * wo, blk.planes, self.sms or num_sms(x.device),
                            self.min_rows or min_block_m(x.device))
        tf32 = _tf32(x.dtype)
        part_in, hw_in = self.pooled_parts(x_nchw, x)
        g1, idx1, cnt1 = self._gate(part_in, hw_in, c["gate1"])
        a, part_a = self.gated_conv(x, c["conv1.w"], c["conv1.b"], None, None, idx1, cnt1, g1, None,
                                    blk.stride, 3, MODE_CONV1, bm, True, tf32)
        g2, _, cnt2 = self._gate(part_a, ho * wo, c["gate2"])
        if blk.has_shortcut:
            res, _ = self.gated_conv(x, c["shortcut.w"], c["shortcut.b"], None, None, None, None, None, None,
                                     blk.stride, 1, MODE_PLAIN, bm, False, tf32)
        else:
            res = x
        # conv2 reads its active output channels from g2 > 0 (the gate zeroes the others).
        out, part_out = self.gated_conv(a, c["conv2.w"], c["conv2.b"], idx1, cnt1, None, None, g2, res,
                                        1, 3, MODE_CONV2, bm, True, tf32)
        out_nchw = out.permute(0, 3, 1, 2)
        self._carry = (out_nchw, part_out, ho * wo)
        return BlockResult(out_nchw, cnt1, cnt2)
