"""Gathered implicit-GEMM convolution with the fused epilogues of DESIGN 3.2 (Triton).

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

Modes (``MODE``):

0. plain conv + bias, dense output (the 1x1 strided shortcut).
1. conv1: ``relu(g[oc] * (acc + b[oc]))`` stored compact at position ``j``
   (``out`` is (N, HO, WO, COUT), only ``j < out_cnt[n]`` written).  Writes
   the per-tile channel sums ``part[n, tile, oc]`` in full channel space
   (zero for inactive channels) for gate2.
2. conv2: ``relu(res[oc] + g[oc] * (acc + b[oc]))`` for active ``j``,
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

from ._launch import TritonKernel

__all__ = ["gated_conv_kernel", "MODE_PLAIN", "MODE_CONV1", "MODE_CONV2"]

MODE_PLAIN, MODE_CONV1, MODE_CONV2 = 0, 1, 2


def _gated_conv(
    x_ptr, w_ptr, bias_ptr, in_idx_ptr, in_cnt_ptr, out_idx_ptr, out_cnt_ptr, gate_ptr, res_ptr,
    out_ptr, part_ptr,
    NB, H, W, HO, WO, CIN_BUF, CIN, COUT, T,
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
    if MODE == 0:
        tl.store(out_base + rm[:, None] * COUT + oc[None, :], v.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & j_ok[None, :])
    if MODE == 1:
        g = tl.load(gate_ptr + n64 * COUT + oc, mask=j_act, other=0.0)
        v = tl.maximum(v * g[None, :], 0.0)
        vq = v.to(out_ptr.dtype.element_ty)
        tl.store(out_base + rm[:, None] * COUT + rj[None, :], vq, mask=m_ok[:, None] & j_act[None, :])
        if WRITE_PART:
            s = tl.sum(tl.where(m_ok[:, None] & j_act[None, :], vq.to(tl.float32), 0.0), axis=0)
            tl.store(part_ptr + (n64 * T + pid_m) * COUT + oc, s, mask=j_ok)
    if MODE == 2:
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
    # Few configs on purpose: every (dtype, mode, stride, BLOCK_M) variant compiles each of them
    # (~1-2 s apiece) the first time it is autotuned.
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
            for bn, bk, warps, stages in [(64, 32, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3),
                                          (32, 32, 4, 3), (64, 16, 4, 3), (32, 16, 4, 3)]]


def _prune(configs, named_args, **kwargs):
    """Tiles no wider than the layer (ResNet channel counts are powers of two); BLOCK_K 16 only for 16 channels."""
    cout, cin = int(named_args["COUT"]), int(named_args["CIN"])
    max_n = max(32, triton.next_power_of_2(cout))
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= max_n and (c.kwargs["BLOCK_K"] == 16) == (cin <= 16)]
    return kept or configs[:1]


gated_conv_kernel = TritonKernel(
    _gated_conv, _configs(),
    key=["NB", "H", "W", "HO", "WO", "CIN", "COUT", "BLOCK_M", "MODE", "HAS_IN_IDX"],
    interp_config={"BLOCK_N": 16, "BLOCK_K": 16},
    prune=_prune)
