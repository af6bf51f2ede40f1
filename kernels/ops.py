"""The Triton kernels as ``torch.library`` ops: ``manidp::triton_gate`` and ``manidp::triton_gated_conv``.

Semantics: see :mod:`manidp.deploy.gpu_common`.  Registered with
:func:`torch.library.triton_op` (the kernels are visible to ``torch.compile`` /
``torch.export``; their fake implementation is the same Python function run on
fake tensors) when this torch has it, else with :func:`torch.library.custom_op`
plus ``register_fake``.  No op reads anything back to the host, so a sequence
of them can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton

from ..deploy.gpu_common import conv_output_shapes
from ._launch import interpreter_enabled, is_fake, num_sms
from .gate import gate_kernel
from .gated_conv import gated_conv_kernel

__all__ = ["triton_gate", "triton_gated_conv"]

try:
    from torch.library import triton_op, wrap_triton
except ImportError:  # pragma: no cover - torch < 2.6
    triton_op = None
    wrap_triton = None


def _register(name: str, fake_needed: bool = True):
    def deco(fn):
        if triton_op is not None:
            return triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        return op
    return deco


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _gate_impl(part: torch.Tensor, hw: int, fc1: torch.Tensor, fc2: torch.Tensor, fc2_bias: torch.Tensor,
               threshold: torch.Tensor, clamp_max: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(part.dim() == 3 and part.dtype == torch.float32, "part must be (N, T, Cin) float32")
    n, t, cin = part.shape
    c, hid = fc2.shape
    _check(fc1.shape == (hid, cin), f"fc1 must be ({hid}, {cin}); got {tuple(fc1.shape)}")
    g = torch.empty((n, c), device=part.device, dtype=torch.float32)
    idx = torch.empty((n, c), device=part.device, dtype=torch.int32)
    cnt = torch.empty((n,), device=part.device, dtype=torch.int32)
    if n == 0 or (is_fake(part) and part.device.type != "cuda"):
        return g, idx, cnt
    hid_p = max(16, triton.next_power_of_2(hid))
    args = (part.contiguous(), fc1.contiguous(), fc2.contiguous(), fc2_bias.contiguous(), threshold.contiguous(),
            g, idx, cnt, n, t, cin, hid, c, hw, float(clamp_max), hid_p)
    gate_kernel.launch(part.device, lambda meta: (triton.cdiv(n, meta["BLOCK_B"]),), args, wrap=wrap_triton)
    return g, idx, cnt


def _conv_impl(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, in_idx: Optional[torch.Tensor],
               in_cnt: Optional[torch.Tensor], out_idx: Optional[torch.Tensor], out_cnt: Optional[torch.Tensor],
               gate: Optional[torch.Tensor], res: Optional[torch.Tensor], stride: int, ksize: int, mode: int,
               block_m: int, write_part: bool, tf32: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    _check(x.dim() == 4 and w.dim() == 3 and w.shape[1] == ksize * ksize,
           "x must be (N, H, W, C) and w (Cout, k*k, Cin)")
    _check(x.dtype == w.dtype, f"x and w dtypes differ ({x.dtype}, {w.dtype})")
    _check(mode in (0, 1, 2), f"mode must be 0, 1 or 2; got {mode}")
    _check(block_m in (16, 32, 64, 128, 256), f"block_m must be a power of two in [16, 256]; got {block_m}")
    _check((in_idx is None) == (in_cnt is None), "in_idx and in_cnt go together")
    _check((out_idx is None) == (out_cnt is None), "out_idx and out_cnt go together")
    _check(mode == 0 or (out_idx is not None and gate is not None), "modes 1 and 2 need out_idx/out_cnt and gate")
    _check(mode != 2 or res is not None, "mode 2 needs res")
    out_shape, part_shape = conv_output_shapes(x, w, stride, ksize, block_m, write_part and mode != 0)
    n, h, wd, cbuf = x.shape
    _, ho, wo, cout = out_shape
    cin = w.shape[2]
    _check(in_idx is not None or cbuf >= cin, f"x has {cbuf} channels; the weights want {cin}")
    _check(res is None or tuple(res.shape) == tuple(out_shape), f"res must have shape {out_shape}")
    out = torch.empty(out_shape, device=x.device, dtype=x.dtype)
    part = torch.empty(part_shape, device=x.device, dtype=torch.float32)
    if n == 0 or (is_fake(x) and x.device.type != "cuda"):
        return out, part
    dummy_i = torch.empty((1,), device=x.device, dtype=torch.int32)
    dummy_f = torch.empty((1,), device=x.device, dtype=torch.float32)
    args = (x.contiguous(), w.contiguous(), bias.contiguous(),
            in_idx.contiguous() if in_idx is not None else dummy_i,
            in_cnt.contiguous() if in_cnt is not None else dummy_i,
            out_idx.contiguous() if out_idx is not None else dummy_i,
            out_cnt.contiguous() if out_cnt is not None else dummy_i,
            gate.contiguous() if gate is not None else dummy_f,
            res.contiguous() if res is not None else out,
            out, part if part.numel() else dummy_f,
            n, h, wd, ho, wo, cbuf, cin, cout, part_shape[1],
            stride, ksize, ksize // 2, mode, in_idx is not None, out_idx is not None, part.numel() > 0,
            "tf32" if (tf32 and x.dtype == torch.float32) else "ieee",
            x.dtype == torch.bfloat16 and (x.device.type != "cuda" or interpreter_enabled()), block_m)
    grid = lambda meta: (triton.cdiv(ho * wo, block_m), triton.cdiv(cout, meta["BLOCK_N"]), n)  # noqa: E731
    gated_conv_kernel.launch(x.device, grid, args, wrap=wrap_triton)
    return out, part


triton_gate = _register("manidp::triton_gate")(_gate_impl)
triton_gated_conv = _register("manidp::triton_gated_conv")(_conv_impl)

if triton_op is None:  # pragma: no cover
    @triton_gate.register_fake
    def _(part, hw, fc1, fc2, fc2_bias, threshold, clamp_max):
        n, c = part.shape[0], fc2.shape[0]
        return (part.new_empty((n, c)), part.new_empty((n, c), dtype=torch.int32),
                part.new_empty((n,), dtype=torch.int32))

    @triton_gated_conv.register_fake
    def _(x, w, bias, in_idx, in_cnt, out_idx, out_cnt, gate, res, stride, ksize, mode, block_m, write_part, tf32):
        o, p = conv_output_shapes(x, w, stride, ksize, block_m, write_part and mode != 0)
        return x.new_empty(o), x.new_empty(p, dtype=torch.float32)


def sms(device: torch.device) -> int:
    return num_sms(device)
