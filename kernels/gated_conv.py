"""Gathered implicit-GEMM convolution with the fused epilogues of docs/DESIGN.md 3.2 (Triton, 7.4).

One program computes a ``BLOCK_M x BLOCK_N`` tile of one instance's output:
``BLOCK_M`` output pixels times ``BLOCK_N`` entries of the instance's output
channel list.  The reduction runs over ``KS*KS`` taps times the instance's
input-channel count, in ``BLOCK_K`` chunks (one flat loop, so the software
pipeline spans taps).  Layouts:

* ``x``   (N, H, W, CIN_BUF) channels-last, compute dtype.  Input channel ``k``
  of instance ``n`` is ``x[..., k]`` for ``k < in_cnt[n]`` (dense input: all
  ``CIN``; compact input: the first ``cnt`` positions of a conv1 output).
* ``w``   (COUT, KS*KS, CIN) compute dtype: row ``o``, tap ``t``, input channel
  ``c``.  Column ``k`` of the GEMM reads weight column ``in_idx[n, k]``
  (``HAS_IN_IDX``) or ``k``; output entry ``j`` reads weight row
  ``out_idx[n, j]`` (``HAS_OUT_IDX``) or ``j``.
* ``out_idx`` is a full permutation per instance: the ``out_cnt[n]`` active
  channels ascending, then the inactive ones (as the gate kernels write it).

Modes (``MODE``, numbered in :mod:`manidp.kernels.build_config`):

* plain: conv + bias, dense output (the 1x1 strided shortcut).
* conv1: ``relu(g[oc] * (acc + b[oc]))`` stored compact at position ``j``
   (``out`` is (N, HO, WO, COUT), only ``j < out_cnt[n]`` written).  Writes
   the per-tile channel sums ``part[n, tile, oc]`` in full channel space
   (zero for inactive channels) for gate2.
* conv2: ``relu(res[oc] + g[oc] * (acc + b[oc]))`` for active ``j``,
   ``relu(res[oc])`` for the others: every output channel is written, tiles
   holding no active channel skip the reduction.  Writes channel sums of the
   block output (for the next block's gate1).

Programs whose channel tile starts past the instance's count run zero
reduction steps (grids are sized for the full channel count; nothing is read
back to the host).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import build_config
from ._launch import TritonKernel

__all__ = ["gated_conv_kernel"]

# Kernels read module globals only as constexprs.
PLAIN = tl.constexpr(build_config.MODE_PLAIN)
CONV1 = tl.constexpr(build_config.MODE_CONV1)
CONV2 = tl.constexpr(build_config.MODE_CONV2)


def _gated_conv(
    x_ptr, w_ptr, bias_ptr, in_idx_ptr, in_cnt_ptr, out_idx_ptr, out_cnt_ptr, gate_ptr, res_ptr,
    out_ptr, part_ptr,
    NB, H, W, HO, WO, CIN_BUF, CIN, COUT, T, NB_BUCKET,
    STRIDE: tl.constexpr, KS: tl.constexpr, PAD: tl.constexpr, MODE: tl.constexpr,
    HAS_IN_IDX: tl.constexpr, HAS_OUT_IDX: tl.constexpr, WRITE_PART: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    n64 = n.to(tl.int64)
    HWO = HO * WO

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < HWO
    j_ok = rj < COUT
    if HAS_OUT_IDX:
        cnt_out = tl.load(out_cnt_ptr + n)
        oc = tl.load(out_idx_ptr + n64 * COUT + rj, mask=j_ok, other=0)
    else:
        cnt_out = COUT
        oc = rj
    j_act = rj < cnt_out  # active entries (implies j_ok)
    if HAS_IN_IDX:
        cnt_in = tl.load(in_cnt_ptr + n)
    else:
        cnt_in = CIN
    # Tiles without an active channel run zero reduction steps.
    tile_live = pid_c * BLOCK_N < cnt_out
    nkb = tl.cdiv(cnt_in, BLOCK_K)
    steps = tl.where(tile_live, nkb * (KS * KS), 0)

    oh = rm // WO
    ow = rm % WO
    x_base = x_ptr + n64 * H * W * CIN_BUF
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, steps):
        tap = step // nkb
        kb = step - tap * nkb
        kh = tap // KS
        kw = tap - kh * KS
        ih = oh * STRIDE - PAD + kh
        iw = ow * STRIDE - PAD + kw
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        rk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = rk < cnt_in
        a = tl.load(x_base + ((ih * W + iw) * CIN_BUF)[:, None] + rk[None, :],
                    mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_IN_IDX:
            ic = tl.load(in_idx_ptr + n64 * CIN + rk, mask=k_ok, other=0)
        else:
            ic = rk
        b = tl.load(w_ptr + (oc[None, :] * (KS * KS) + tap) * CIN + ic[:, None],
                    mask=k_ok[:, None] & j_act[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong (triton 3.8); never set for compiled kernels
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)

    bias = tl.load(bias_ptr + oc, mask=j_ok, other=0.0)
    v = acc + bias[None, :]
    out_base = out_ptr + n64 * HWO * COUT
    if MODE == PLAIN:
        tl.store(out_base + rm[:, None] * COUT + oc[None, :], v.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & j_ok[None, :])
    if MODE == CONV1:
        g = tl.load(gate_ptr + n64 * COUT + oc, mask=j_act, other=0.0)
        v = tl.maximum(v * g[None, :], 0.0)
        vq = v.to(out_ptr.dtype.element_ty)
        tl.store(out_base + rm[:, None] * COUT + rj[None, :], vq, mask=m_ok[:, None] & j_act[None, :])
        if WRITE_PART:
            s = tl.sum(tl.where(m_ok[:, None] & j_act[None, :], vq.to(tl.float32), 0.0), axis=0)
            tl.store(part_ptr + (n64 * T + pid_m) * COUT + oc, s, mask=j_ok)
    if MODE == CONV2:
        g = tl.load(gate_ptr + n64 * COUT + oc, mask=j_act, other=0.0)
        res_base = res_ptr + n64 * HWO * COUT
        r = tl.load(res_base + rm[:, None] * COUT + oc[None, :], mask=m_ok[:, None] & j_ok[None, :],
                    other=0.0).to(tl.float32)
        v = tl.maximum(tl.where(j_act[None, :], r + v * g[None, :], r), 0.0)
        vq = v.to(out_ptr.dtype.element_ty)
        tl.store(out_base + rm[:, None] * COUT + oc[None, :], vq, mask=m_ok[:, None] & j_ok[None, :])
        if WRITE_PART:
            s = tl.sum(tl.where(m_ok[:, None], vq.to(tl.float32), 0.0), axis=0)
            tl.store(part_ptr + (n64 * T + pid_m) * COUT + oc, s, mask=j_ok)


def _configs():
    # The autotuning space (MANIDP_TRITON_AUTOTUNE=1).  No BLOCK_N = 128 configs: with the gathered
    # conv2 operands they spill on sm_90 (docs/DESIGN.md 7.4); 8 warps for 128-row tiles, whose
    # conv2 spills with 4.
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
            for bn, bk, warps, stages in [(64, 32, 4, 3), (64, 64, 4, 3), (32, 32, 4, 3), (64, 16, 4, 3),
                                          (32, 16, 4, 3), (64, 32, 8, 3), (64, 16, 8, 3), (32, 32, 8, 3),
                                          (32, 16, 8, 3)]]


def warps_for(block_m: int) -> int:
    """4 warps, 8 for 128-row tiles (the conv2 accumulator and gathered operands spill with 4)."""
    return 8 if block_m >= 128 else 4


def _prune(configs, named_args, **kwargs):
    """Tiles no wider than the layer (ResNet channel counts are powers of two); BLOCK_K 16 only for 16
    channels; the warp count of :func:`warps_for`."""
    cout, cin = int(named_args["COUT"]), int(named_args["CIN"])
    warps = warps_for(int(kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 64))))
    max_n = max(32, triton.next_power_of_2(cout))
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= max_n and (c.kwargs["BLOCK_K"] == 16) == (cin <= 16)
            and c.num_warps == warps]
    return kept or configs[:1]


def fixed_config(args) -> "triton.Config":
    """The one config of the fixed mode: 64-wide channel tiles (32 for narrower layers), K chunks of 32
    (16 for 16-channel inputs), :func:`warps_for` the tile rows, 3 stages.  Depends on the channel
    counts and tile rows only, so a layer compiles once per (dtype, mode, stride, tile rows,
    channel class)."""
    bn = 64 if int(args["COUT"]) >= 64 else 32
    bk = 16 if int(args["CIN"]) <= 16 else 32
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps_for(int(args["BLOCK_M"])), num_stages=3)


# Shapes that vary per layer and batch are not specialised on (one compile serves them); the channel
# counts are, for their divisibility by 16 (vector loads).
SHAPE_ARGS = ("NB", "H", "W", "HO", "WO", "T", "NB_BUCKET")

gated_conv_kernel = TritonKernel(
    _gated_conv, _configs(),
    key=["NB_BUCKET", "HO", "WO", "CIN", "COUT", "STRIDE", "BLOCK_M", "MODE", "HAS_IN_IDX"],
    interp_config={"BLOCK_N": 16, "BLOCK_K": 16},
    fixed_config=fixed_config, prune=_prune, do_not_specialize=SHAPE_ARGS)
