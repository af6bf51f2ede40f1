"""What the GPU backends (``triton`` and ``cuda``) share: op contract, shapes, weight layouts, block driver.

Both backends expose the same two ops with the same semantics (``manidp::triton_*``
and ``manidp::cuda_*``); this module runs a gated block (DESIGN 3.2) on any
object providing them, so the two backends differ only in their kernels.

Op contract (all tensors on one device, contiguous):

``gate(part, hw, fc1, fc2, fc2_bias, threshold, clamp_max) -> (g, idx, cnt)``
    ``part`` (N, T, Cin) fp32 channel sums of the gate's input over ``T`` pixel
    tiles (pooled input = ``part.sum(1) / hw``); ``fc1`` (hidden, Cin), ``fc2``
    (C, hidden), ``fc2_bias`` (C,), ``threshold`` () fp32.  Returns ``g`` (N, C)
    fp32 gate values, ``idx`` (N, C) int32 -- per instance the active channels
    ascending, then every inactive channel -- and ``cnt`` (N,) int32.

``gated_conv(x, w, bias, in_idx, in_cnt, out_idx, out_cnt, gate, res, stride, ksize, mode, block_m,
write_part, tf32) -> (out, part)``
    ``x`` (N, H, W, Cbuf) channels-last; ``w`` (Cout, ksize*ksize, Cin); ``bias``
    (Cout,) fp32; ``in_idx``/``in_cnt``: GEMM column ``k < in_cnt[n]`` reads
    ``x[..., k]`` and weight column ``in_idx[n, k]`` (None: all ``Cin``
    columns, identity); ``out_idx``/``out_cnt``: a gate's ``idx``/``cnt`` (None:
    every row).  ``mode`` 0: ``out = conv + bias`` (dense); 1: conv1 epilogue,
    ``out[n, :, :, j] = relu(g[n, o] * (conv_o + b_o))`` for ``o = out_idx[n, j]``,
    ``j < out_cnt[n]`` (compact); 2: conv2 epilogue,
    ``out[..., o] = relu(res[..., o] + g[n, o] * (conv_o + b_o))`` for active ``o``
    and ``relu(res[..., o])`` for the others.  ``part`` (N, T, Cout) fp32 with
    ``T = ceil(HO*WO / block_m)``: per pixel tile, sums of the stored output in
    full channel space (zero for inactive channels) when ``write_part`` (else T = 0).
    ``tf32``: allow tf32 for fp32 inputs (Triton only).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .backends import BlockResult

__all__ = ["MODE_PLAIN", "MODE_CONV1", "MODE_CONV2", "conv_out_hw", "num_part_tiles", "choose_block_m",
           "prepare_gpu_weights", "GPUBlockRunner", "conv_output_shapes"]

MODE_PLAIN, MODE_CONV1, MODE_CONV2 = 0, 1, 2


def conv_out_hw(h: int, w: int, ksize: int, stride: int) -> Tuple[int, int]:
    pad = ksize // 2
    return (h + 2 * pad - ksize) // stride + 1, (w + 2 * pad - ksize) // stride + 1


def num_part_tiles(hwo: int, block_m: int) -> int:
    return -(-hwo // block_m)


def conv_output_shapes(x: torch.Tensor, w: torch.Tensor, stride: int, ksize: int, block_m: int,
                       write_part: bool):
    """Shapes of ``(out, part)`` of ``gated_conv`` (shared by kernels and fake implementations)."""
    n, h, wd, _ = x.shape
    ho, wo = conv_out_hw(h, wd, ksize, stride)
    cout = w.shape[0]
    t = num_part_tiles(ho * wo, block_m) if write_part else 0
    return (n, ho, wo, cout), (n, t, cout)


def choose_block_m(n: int, hwo: int, cout: int, sms: int) -> int:
    """Pixel-tile height: 128 for large maps, halved (down to 32) until the grid has ~2 programs per SM.

    ``tl.dot`` / the MMA paths need at least 16 rows; tiles never exceed the map by much.
    """
    bm = 128
    while bm > 32 and bm >= 2 * hwo:
        bm //= 2
    while bm > 32 and n * num_part_tiles(hwo, bm) * max(1, -(-cout // 64)) < 2 * sms:
        bm //= 2
    return bm


def prepare_gpu_weights(engine, dtype: torch.dtype) -> None:
    """Put each block's conv weights in the (Cout, k*k, Cin) compute-dtype layout the kernels read."""
    for blk in engine.blocks:
        c: dict = {}
        for part in ("conv1", "conv2", "shortcut"):
            if part == "shortcut" and not blk.has_shortcut:
                continue
            p = getattr(blk, part)
            w = p.weight
            c[part + ".w"] = w.permute(0, 2, 3, 1).reshape(w.shape[0], w.shape[2] * w.shape[3], w.shape[1]) \
                .to(dtype).contiguous()
            c[part + ".b"] = p.bias.float().contiguous()
        for part in ("gate1", "gate2"):
            gt = getattr(blk, part)
            c[part] = (gt.fc1.float().contiguous(), gt.fc2.float().contiguous(),
                       gt.fc2_bias.float().contiguous(), gt.threshold.float().reshape(()).contiguous(),
                       float(gt.clamp_max))
        blk.cache["gpu"] = c


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) contiguous view of an NCHW-shaped tensor (no copy if it is channels-last)."""
    y = x.permute(0, 2, 3, 1)
    return y if y.is_contiguous() else y.contiguous()


class GPUBlockRunner:
    """Runs gated blocks through an ops object (``gate`` and ``gated_conv`` callables).

    Block outputs are channels-last tensors returned as (N, C, H, W) views.  The
    channel sums the conv2 epilogue writes are carried to the next block's
    gate1 when its input is that very tensor; otherwise (first block) the input
    is pooled with one reduction.
    """

    def __init__(self, gate, gated_conv, sms_fn, tf32_fn=lambda dtype: False):
        self.gate = gate
        self.gated_conv = gated_conv
        self.sms_fn = sms_fn
        self.tf32_fn = tf32_fn
        self._carry: Optional[tuple] = None

    def pooled_parts(self, x_nchw: torch.Tensor, x: torch.Tensor):
        carry = self._carry
        if carry is not None and carry[0] is x_nchw:
            return carry[1], carry[2]
        n, h, w, c = x.shape
        return x.float().sum(dim=(1, 2)).reshape(n, 1, c), h * w

    def block(self, blk, x_nchw: torch.Tensor) -> BlockResult:
        c = blk.cache["gpu"]
        x = _nhwc(x_nchw)
        n, h, w, _ = x.shape
        ho, wo = conv_out_hw(h, w, 3, blk.stride)
        sms = self.sms_fn(x.device)
        bm = choose_block_m(n, ho * wo, blk.planes, sms)
        tf32 = bool(self.tf32_fn(x.dtype))
        part_in, hw_in = self.pooled_parts(x_nchw, x)
        g1, idx1, cnt1 = self.gate(part_in, hw_in, *c["gate1"])
        a, part_a = self.gated_conv(x, c["conv1.w"], c["conv1.b"], None, None, idx1, cnt1, g1, None,
                                    blk.stride, 3, MODE_CONV1, bm, True, tf32)
        g2, idx2, cnt2 = self.gate(part_a, ho * wo, *c["gate2"])
        if blk.has_shortcut:
            res, _ = self.gated_conv(x, c["shortcut.w"], c["shortcut.b"], None, None, None, None, None, None,
                                     blk.stride, 1, MODE_PLAIN, bm, False, tf32)
        else:
            res = x
        out, part_out = self.gated_conv(a, c["conv2.w"], c["conv2.b"], idx1, cnt1, idx2, cnt2, g2, res,
                                        1, 3, MODE_CONV2, bm, True, tf32)
        out_nchw = out.permute(0, 3, 1, 2)
        self._carry = (out_nchw, part_out, ho * wo)
        return BlockResult(out_nchw, idx1, cnt1, idx2, cnt2)
