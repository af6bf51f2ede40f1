"""Fake (meta) kernels of every manidp op, and the output shapes they share with the real kernels.

A fake kernel computes the shapes and dtypes of an op's outputs without running it, so that
``torch.compile`` and ``torch.export`` can trace code that calls the ops (docs/DESIGN.md 7.3).
Importing this module loads ``manidp._C``, which defines the schemas (``csrc/registration.cpp``),
and registers the fakes of the C++ ops; the Triton ops (:mod:`manidp.kernels.ops`) attach
:func:`gpu_gate` and :func:`gated_conv` to themselves, so each GPU contract has one fake.
"""

from __future__ import annotations

from typing import Tuple

import torch

from manidp import _C  # noqa: F401  (defines the schemas the fakes attach to)
from manidp.flops import conv_out_size

from .build_config import MODE_CONV2, MODE_PLAIN

__all__ = ["part_tiles", "conv_weight_dims", "gated_conv_shapes", "gate_compact", "gated_block", "gpu_gate",
           "gated_conv"]

Shape = Tuple[int, ...]


def part_tiles(hwo: int, block_m: int) -> int:
    """Number of ``block_m``-pixel tiles over ``hwo`` output pixels (rows of ``gated_conv``'s ``part``)."""
    return -(-hwo // block_m)


def conv_weight_dims(w_shape: Shape, mode: int) -> Tuple[int, int, int]:
    """``(cout, taps, cin)`` of ``gated_conv``'s weights: (Cout, k*k, Cin), or (k*k, Cin, Cout) in the conv2 mode."""
    if mode == MODE_CONV2:
        taps, cin, cout = w_shape
    else:
        cout, taps, cin = w_shape
    return cout, taps, cin


def gated_conv_shapes(x_shape: Shape, w_shape: Shape, stride: int, ksize: int, mode: int, block_m: int,
                      write_part: bool) -> Tuple[Shape, Shape]:
    """Shapes of ``gated_conv``'s ``(out, part)`` for channels-last ``x`` (N, H, W, Cbuf) and weights ``w``
    (:func:`conv_weight_dims`)."""
    n, h, w, _ = x_shape
    pad = ksize // 2
    ho, wo = conv_out_size(h, ksize, stride, pad), conv_out_size(w, ksize, stride, pad)
    cout = conv_weight_dims(w_shape, mode)[0]
    tiles = part_tiles(ho * wo, block_m) if write_part and mode != MODE_PLAIN else 0
    return (n, ho, wo, cout), (n, tiles, cout)


def gate_compact(pooled, fc1, fc2, fc2_bias, threshold, clamp_max):
    n, c = pooled.shape[0], fc2.shape[0]
    return (pooled.new_empty((n, c), dtype=torch.float32), pooled.new_empty((n, c), dtype=torch.int32),
            pooled.new_empty((n,), dtype=torch.int32))


def gated_block(x, w1, b1, w2, b2, ws, bs, g1_fc1, g1_fc2, g1_bias, g1_threshold, g2_fc1, g2_fc2, g2_bias,
                g2_threshold, clamp_max, stride, mode=0):
    n, _, h, w = x.shape
    ho, wo = conv_out_size(h, 3, stride, 1), conv_out_size(w, 3, stride, 1)
    cnt = x.new_empty((n,), dtype=torch.int32)
    return x.new_empty((n, w1.shape[0], ho, wo)), cnt, torch.empty_like(cnt)


def gpu_gate(part, hw, fc1, fc2, fc2_bias, threshold, clamp_max):
    n, c = part.shape[0], fc2.shape[0]
    return (part.new_empty((n, c), dtype=torch.float32), part.new_empty((n, c), dtype=torch.int32),
            part.new_empty((n,), dtype=torch.int32))


def gated_conv(x, w, bias, in_idx, in_cnt, out_idx, out_cnt, gate, res, stride, ksize, mode, block_m, write_part,
               tf32, impl=0):
    out_shape, part_shape = gated_conv_shapes(x.shape, w.shape, stride, ksize, mode, block_m, write_part)
    return x.new_empty(out_shape), x.new_empty(part_shape, dtype=torch.float32)


for _fake in (gate_compact, gated_block, gpu_gate, gated_conv):
    torch.library.register_fake(f"manidp::{_fake.__name__}")(_fake)
