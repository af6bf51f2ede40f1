"""The Triton kernels as ``torch.library`` ops: ``manidp::triton_gpu_gate`` and ``manidp::triton_gated_conv``.

They implement the contracts of the GPU ops ``manidp::gpu_gate`` and ``manidp::gated_conv``
(docs/DESIGN.md 7.2) and take those ops' schemas, defined in ``csrc/registration.cpp``; their
fake kernels are the ones of :mod:`manidp.kernels.fake`.  Registered with
:func:`torch.library.triton_op` where torch has it (``torch.compile`` then sees the kernels),
else with :func:`torch.library.custom_op`.  No op reads anything back to the host, so a
sequence of them can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton

from manidp.deploy.gpu_common import num_sms

from . import fake
from .build_config import CONV_MODES, MODE_CONV1, MODE_CONV2
from ._launch import INTERPRET, batch_bucket, is_fake, recording
from .fake import conv_weight_dims
from .gate import gate_kernel
from .gated_conv import fixed_config, gated_conv_kernel

__all__ = ["triton_gpu_gate", "triton_gated_conv", "gpu_gate_impl", "gated_conv_impl", "split_k"]


def _register(name: str, contract: str, fn, fake_fn):
    """``fn`` as op ``manidp::<name>`` with the schema of ``manidp::<contract>`` and the fake ``fake_fn``."""
    schema = str(getattr(torch.ops.manidp, contract).default._schema)
    schema = schema[schema.index("("):]  # arguments and returns, without the op's name
    make = getattr(torch.library, "triton_op", None) or torch.library.custom_op  # triton_op: torch >= 2.6
    op = make(f"manidp::{name}", fn, mutates_args=(), schema=schema)
    op.register_fake(fake_fn)
    return op


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _skip_launch(t: torch.Tensor, n: int) -> bool:
    """No launch for an empty batch, nor for fake tensors off CUDA (the interpreter would read them).

    While compile keys are recorded, meta tensors "launch": the launch only records its key.
    """
    return n == 0 or (is_fake(t) and t.device.type != "cuda" and not recording())


def gpu_gate_impl(part: torch.Tensor, hw: int, fc1: torch.Tensor, fc2: torch.Tensor, fc2_bias: torch.Tensor,
              threshold: torch.Tensor, clamp_max: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(part.dim() == 3 and part.dtype == torch.float32, "part must be (N, T, Cin) float32")
    n, t, cin = part.shape
    c, hid = fc2.shape
    _check(fc1.shape == (hid, cin), f"fc1 must be ({hid}, {cin}); got {tuple(fc1.shape)}")
    g, idx, cnt = fake.gpu_gate(part, hw, fc1, fc2, fc2_bias, threshold, clamp_max)
    if _skip_launch(part, n):
        return g, idx, cnt
    hid_p = max(16, triton.next_power_of_2(hid))
    args = (part.contiguous(), fc1.contiguous(), fc2.contiguous(), fc2_bias.contiguous(), threshold.contiguous(),
            g, idx, cnt, n, t, cin, hid, c, hw, batch_bucket(n), float(clamp_max), hid_p)
    gate_kernel.launch(part.device, lambda meta: (triton.cdiv(n, meta["BLOCK_B"]),), args)
    return g, idx, cnt


def _check_conv_args(x, w, in_idx, in_cnt, out_idx, out_cnt, gate, res, ksize, mode, block_m) -> None:
    _check(mode in CONV_MODES.values(), f"mode must be one of {sorted(CONV_MODES.values())}; got {mode}")
    layout = "(k*k, Cin, Cout) in the conv2 mode" if mode == MODE_CONV2 else "(Cout, k*k, Cin)"
    _check(x.dim() == 4 and w.dim() == 3 and conv_weight_dims(w.shape, mode)[1] == ksize * ksize,
           f"x must be (N, H, W, C) and w {layout}; got {tuple(x.shape)} and {tuple(w.shape)}")
    _check(x.dtype == w.dtype, f"x and w dtypes differ ({x.dtype}, {w.dtype})")
    _check(block_m in (16, 32, 64, 128, 256), f"block_m must be a power of two in [16, 256]; got {block_m}")
    _check((in_idx is None) == (in_cnt is None), "in_idx and in_cnt go together")
    _check((out_idx is None) == (out_cnt is None), "out_idx and out_cnt go together")
    _check(mode == MODE_CONV1 or out_idx is None, "out_idx/out_cnt belong to the conv1 mode (conv2 reads the "
           "active output channels from gate > 0)")
    _check(mode != MODE_CONV1 or (out_idx is not None and gate is not None), "the conv1 mode needs out_idx/out_cnt "
           "and gate")
    _check(mode != MODE_CONV2 or (gate is not None and res is not None), "the conv2 mode needs gate and res")


INT32_LIMIT = 1 << 31
MAX_GRID_Z = 65535


def _check_int32_offsets(n: int, in_elems: int, out_elems: int) -> None:
    """The kernel indexes within one instance in int32 (the instance offset is int64) and puts instances on grid z."""
    _check(n <= MAX_GRID_Z, f"at most {MAX_GRID_Z} instances per call (grid z); got {n}")
    _check(in_elems < INT32_LIMIT and out_elems < INT32_LIMIT,
           f"one instance's tensors must have < 2^31 elements; got {in_elems} in, {out_elems} out")


MIN_SPLIT_STEPS = 4
"""Fewest reduction steps (at full activity) of a split-K share, so that a share's MACs outweigh its
workspace round trip (a bound to revisit with GPU measurements)."""
MAX_SPLIT = 16


def split_k(programs: int, max_steps: int, sms: int) -> int:
    """Shares each tile's reduction is split into: 1 when the grid fills the ``sms`` multiprocessors once,
    else about enough to fill them, at least :data:`MIN_SPLIT_STEPS` steps each, at most :data:`MAX_SPLIT`.

    Small batches of the 14x14 and 7x7 stages have fewer output tiles than multiprocessors and long
    reductions (docs/DESIGN.md 7.4).
    """
    if programs >= sms:
        return 1
    return max(1, min(sms // programs, max_steps // MIN_SPLIT_STEPS, MAX_SPLIT))


def _launch_split(device: torch.device, n: int, hwo: int, cin: int, cout: int, ksize: int, block_m: int) -> int:
    """:func:`split_k` of a launch, with the tile sizes of the fixed config (autotuned ones differ in speed only)."""
    cfg = fixed_config({"CIN": cin, "COUT": cout, "BLOCK_M": block_m})
    programs = n * triton.cdiv(hwo, block_m) * triton.cdiv(cout, cfg.kwargs["BLOCK_N"])
    return split_k(programs, ksize * ksize * triton.cdiv(cin, cfg.kwargs["BLOCK_K"]), num_sms(device))


def _split_buffers(x: torch.Tensor, n: int, split: int, hwo: int, cout: int, block_m: int):
    """The split-K workspace (N, split, HWO, Cout) float32 and its per-tile counters, zeroed (dummies for split 1).

    The counters are zeroed per call, so concurrent calls never share them; there is one per tile of the
    narrowest channel tile any config uses (16 channels).
    """
    if split == 1:
        dummy = torch.empty((1,), device=x.device, dtype=torch.float32)
        return dummy, dummy.new_empty((1,), dtype=torch.int32)
    tiles = n * triton.cdiv(hwo, block_m) * triton.cdiv(cout, 16)
    return (torch.empty((n, split, hwo, cout), device=x.device, dtype=torch.float32),
            torch.zeros((tiles,), device=x.device, dtype=torch.int32))


def gated_conv_impl(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, in_idx: Optional[torch.Tensor],
                in_cnt: Optional[torch.Tensor], out_idx: Optional[torch.Tensor], out_cnt: Optional[torch.Tensor],
                gate: Optional[torch.Tensor], res: Optional[torch.Tensor], stride: int, ksize: int, mode: int,
                block_m: int, write_part: bool, tf32: bool, impl: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The body of ``manidp::triton_gated_conv`` (``impl`` chooses among the CUDA kernels; there is one Triton
    kernel).  Grids with fewer output tiles than the device has multiprocessors split their reductions
    (:func:`split_k`).  Called directly on meta tensors it records compile keys
    (:class:`._launch.recording_compile_keys`); through the op, meta tensors reach the fake kernel."""
    _check_conv_args(x, w, in_idx, in_cnt, out_idx, out_cnt, gate, res, ksize, mode, block_m)
    out, part = fake.gated_conv(x, w, bias, in_idx, in_cnt, out_idx, out_cnt, gate, res, stride, ksize, mode,
                                block_m, write_part, tf32)
    n, h, wd, cbuf = x.shape
    _, ho, wo, cout = out.shape
    cin = conv_weight_dims(w.shape, mode)[2]
    _check(in_idx is not None or cbuf >= cin, f"x has {cbuf} channels; the weights want {cin}")
    _check(res is None or res.shape == out.shape, f"res must have shape {tuple(out.shape)}")
    _check(gate is None or gate.shape == (n, cout), f"gate must have shape {(n, cout)}")
    _check_int32_offsets(n, h * wd * cbuf, ho * wo * cout)
    if _skip_launch(x, n):
        return out, part
    split = _launch_split(x.device, n, ho * wo, cin, cout, ksize, block_m)
    ws, sem = _split_buffers(x, n, split, ho * wo, cout, block_m)
    dummy_i = torch.empty((1,), device=x.device, dtype=torch.int32)
    dummy_f = torch.empty((1,), device=x.device, dtype=torch.float32)
    args = (x.contiguous(), w.contiguous(), bias.contiguous(),
            in_idx.contiguous() if in_idx is not None else dummy_i,
            in_cnt.contiguous() if in_cnt is not None else dummy_i,
            out_idx.contiguous() if out_idx is not None else dummy_i,
            out_cnt.contiguous() if out_cnt is not None else dummy_i,
            gate.contiguous() if gate is not None else dummy_f,
            res.contiguous() if res is not None else out,
            out, part if part.numel() else dummy_f, ws, sem,
            n, h, wd, ho, wo, cbuf, cin, cout, part.shape[1], batch_bucket(n), split,
            stride, ksize, ksize // 2, mode, in_idx is not None, part.numel() > 0,
            "tf32" if (tf32 and x.dtype == torch.float32) else "ieee",
            x.dtype == torch.bfloat16 and (x.device.type != "cuda" or INTERPRET), block_m)
    grid = lambda meta: (triton.cdiv(ho * wo, block_m) * split, triton.cdiv(cout, meta["BLOCK_N"]), n)  # noqa: E731
    gated_conv_kernel.launch(x.device, grid, args)
    return out, part


triton_gpu_gate = _register("triton_gpu_gate", "gpu_gate", gpu_gate_impl, fake.gpu_gate)
triton_gated_conv = _register("triton_gated_conv", "gated_conv", gated_conv_impl, fake.gated_conv)
