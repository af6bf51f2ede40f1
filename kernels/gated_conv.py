"""Gathered implicit-GEMM convolution with the fused epilogues of docs/DESIGN.md 3.2 (Triton, 7.4).

One program computes a ``BLOCK_M x BLOCK_N`` tile of one instance's output
(``BLOCK_M`` output pixels times ``BLOCK_N`` output columns), or, with split-K,
one share of that tile's reduction.  The reduction runs over ``KS*KS`` taps times
the instance's input-channel count, in ``BLOCK_K`` chunks (one flat loop, so the
software pipeline spans taps).  Layouts:

* ``x`` (N, H, W, CIN_BUF) channels-last, compute dtype.  GEMM column ``k`` of
  instance ``n`` is ``x[..., k]``: all ``CIN`` channels of a dense input, or the
  first ``in_cnt[n]`` positions of a compact conv1 output (``HAS_IN_IDX``), which
  conv1 follows with zeros up to the next multiple of ``CHANNEL_PAD`` (16), so the
  input tile is read 16 bytes at a time whatever the count.
* ``w`` for the plain and conv1 modes: (COUT, KS*KS, CIN), rows read through the
  output list (contiguous along the input channels); for conv2: (KS*KS, CIN,
  COUT), rows (tap, input channel) read through ``in_idx`` and contiguous along
  the output channels (docs/DESIGN.md 7.4 says why).

Modes (``MODE``, numbered in :mod:`manidp.kernels.build_config`):

* plain: conv + bias, dense output (the 1x1 strided shortcut).
* conv1: output column ``j`` is channel ``oc = out_idx[n, j]``;
  ``relu(g[oc] * (acc + b[oc]))`` stored compact at position ``j`` for
  ``j < out_cnt[n]``, zeros from there up to the next multiple of 16.  Writes the
  per-tile channel sums ``part[n, tile, oc]`` in full channel space (zero for
  inactive channels) for gate2.
* conv2: output column ``j`` is channel ``j``; channel ``j`` is active when
  ``g[n, j] > 0`` (the gate writes zero for inactive channels):
  ``relu(res + g * (acc + b))`` there, ``relu(res)`` elsewhere.  Tiles holding no
  active channel skip the reduction.  Writes channel sums of the block output
  (for the next block's gate1).

Grids are sized for the full channel count and nothing is read back to the host.
With ``SPLIT > 1`` the ``SPLIT`` programs of a tile each reduce a contiguous share of
the steps into a float32 workspace; the last to finish (a per-tile counter) adds
the shares in split order, so the result does not depend on arrival order, and
runs the epilogue.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import build_config
from ._launch import TritonKernel

__all__ = ["gated_conv_kernel", "fixed_config", "warps_for"]

# Kernels read module globals only as constexprs.
PLAIN = tl.constexpr(build_config.MODE_PLAIN)
CONV1 = tl.constexpr(build_config.MODE_CONV1)
CONV2 = tl.constexpr(build_config.MODE_CONV2)
CHANNEL_PAD = tl.constexpr(build_config.CHANNEL_PAD)


@triton.jit
def _round_up(v, m: tl.constexpr):
    """``v`` rounded up to a multiple of ``m`` (Triton then knows it divides by ``m``)."""
    return (v + m - 1) // m * m


@triton.jit
def _input_tile(x_base, oh, ow, m_ok, tap, rk, k_lim, H, W, CIN_BUF,
                STRIDE: tl.constexpr, KS: tl.constexpr, PAD: tl.constexpr):
    """The A tile of one step: ``x`` at the tiles' pixels shifted by ``tap``, columns ``rk < k_lim``; zero elsewhere."""
    kh = tap // KS
    kw = tap - kh * KS
    ih = oh * STRIDE - PAD + kh
    iw = ow * STRIDE - PAD + kw
    pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return tl.load(x_base + ((ih * W + iw) * CIN_BUF)[:, None] + rk[None, :],
                   mask=pix_ok[:, None] & (rk < k_lim)[None, :], other=0.0)


@triton.jit
def _weight_tile(w_ptr, tap, ic, k_ok, oc, j_ok, CIN, COUT, KSQ: tl.constexpr, MODE: tl.constexpr):
    """The B tile of one step: weights of ``tap`` for input channels ``ic`` (rows) and output channels ``oc``."""
    if MODE == CONV2:  # (KS*KS, CIN, COUT): 16-byte loads along the output channels
        ptrs = w_ptr + (tap * CIN + ic)[:, None] * COUT + oc[None, :]
    else:              # (COUT, KS*KS, CIN): 16-byte loads along the input channels
        ptrs = w_ptr + (oc[None, :] * KSQ + tap) * CIN + ic[:, None]
    return tl.load(ptrs, mask=k_ok[:, None] & j_ok[None, :], other=0.0)


@triton.jit
def _sum_splits(acc, ws_ptr, sem_ptr, tile, split, rm, rj, m_ok, j_ok, n64, SPLIT, HWO, COUT):
    """Store this program's share of a split tile; for the last of the tile's programs, the sum of all shares.

    Returns ``(sum, last)``.  The workspace is (N, SPLIT, HWO, COUT) float32; ``sem_ptr`` holds one
    counter per tile, zero before the launch and reset to zero by the last program.
    """
    ok = m_ok[:, None] & j_ok[None, :]
    offs = rm[:, None] * COUT + rj[None, :]
    ws_n = ws_ptr + n64 * SPLIT * HWO * COUT
    tl.store(ws_n + split * HWO * COUT + offs, acc, mask=ok)
    # Every thread's share is stored before one thread releases the counter.
    tl.debug_barrier()
    arrived = tl.atomic_add(sem_ptr + tile, 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLIT - 1
    total = tl.zeros_like(acc)
    if last:
        for s in range(0, SPLIT):
            # .cg: the other shares were written by other programs; read them from L2, not L1.
            total += tl.load(ws_n + s * HWO * COUT + offs, mask=ok, other=0.0, cache_modifier=".cg")
        tl.store(sem_ptr + tile, 0)  # left zero for the autotuner's repeated launches of one call
    return total, last


@triton.jit
def _epilogue(acc, n64, pid_m, rm, m_ok, rj, j_ok, oc, cnt_out, bias_ptr, gate_ptr, res_ptr, out_ptr, part_ptr,
              HWO, COUT, T, MODE: tl.constexpr, WRITE_PART: tl.constexpr):
    """Bias, then the mode's epilogue (module docstring), stores and per-tile channel sums.

    The gate values are read here rather than kept in registers through the main loop.
    """
    bias = tl.load(bias_ptr + oc, mask=j_ok, other=0.0)
    v = acc + bias[None, :]
    out_base = out_ptr + n64 * HWO * COUT
    ok = m_ok[:, None] & j_ok[None, :]
    if MODE == PLAIN:
        tl.store(out_base + rm[:, None] * COUT + oc[None, :], v.to(out_ptr.dtype.element_ty), mask=ok)
    if MODE == CONV1:
        j_act = rj < cnt_out
        g = tl.load(gate_ptr + n64 * COUT + oc, mask=j_act, other=0.0)
        v = tl.where(j_act[None, :], tl.maximum(v * g[None, :], 0.0), 0.0)
        vq = v.to(out_ptr.dtype.element_ty)
        # Zeros after the active channels, up to the next multiple of CHANNEL_PAD: conv2 reads them.
        written = rj < tl.minimum(_round_up(cnt_out, CHANNEL_PAD), COUT)
        tl.store(out_base + rm[:, None] * COUT + rj[None, :], vq, mask=m_ok[:, None] & written[None, :])
        if WRITE_PART:
            s = tl.sum(tl.where(m_ok[:, None] & j_act[None, :], vq.to(tl.float32), 0.0), axis=0)
            tl.store(part_ptr + (n64 * T + pid_m) * COUT + oc, s, mask=j_ok)
    if MODE == CONV2:
        g = tl.load(gate_ptr + n64 * COUT + oc, mask=j_ok, other=0.0)
        r = tl.load(res_ptr + n64 * HWO * COUT + rm[:, None] * COUT + oc[None, :], mask=ok,
                    other=0.0).to(tl.float32)
        v = tl.maximum(tl.where((g > 0.0)[None, :], r + v * g[None, :], r), 0.0)
        vq = v.to(out_ptr.dtype.element_ty)
        tl.store(out_base + rm[:, None] * COUT + oc[None, :], vq, mask=ok)
        if WRITE_PART:
            s = tl.sum(tl.where(m_ok[:, None], vq.to(tl.float32), 0.0), axis=0)
            tl.store(part_ptr + (n64 * T + pid_m) * COUT + oc, s, mask=j_ok)


@triton.jit
def _tile_is_live(gate_ptr, n64, rj, j_ok, cnt_out, pid_c, COUT, MODE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Whether the channel tile holds an active output channel (a dead tile runs no reduction step)."""
    if MODE == CONV2:
        g = tl.load(gate_ptr + n64 * COUT + rj, mask=j_ok, other=0.0)
        return tl.max((g > 0.0).to(tl.int32), axis=0) > 0
    return pid_c * BLOCK_N < cnt_out


def _gated_conv(
    x_ptr, w_ptr, bias_ptr, in_idx_ptr, in_cnt_ptr, out_idx_ptr, out_cnt_ptr, gate_ptr, res_ptr,
    out_ptr, part_ptr, ws_ptr, sem_ptr,
    NB, H, W, HO, WO, CIN_BUF, CIN, COUT, T, NB_BUCKET, SPLIT,
    STRIDE: tl.constexpr, KS: tl.constexpr, PAD: tl.constexpr, MODE: tl.constexpr,
    HAS_IN_IDX: tl.constexpr, WRITE_PART: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0) // SPLIT
    split = tl.program_id(0) - pid_m * SPLIT
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    n64 = n.to(tl.int64)
    HWO = HO * WO

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < HWO
    j_ok = rj < COUT
    # Output columns: conv1 reads its channels through the output list; conv2 and plain are dense, so
    # every weight column of a tile is read and the mask does not split the 16-byte loads.
    if MODE == CONV1:
        cnt_out = tl.load(out_cnt_ptr + n)
        oc = tl.load(out_idx_ptr + n64 * COUT + rj, mask=j_ok, other=0)
        w_cols = rj < cnt_out
    else:
        cnt_out = COUT
        oc = rj
        w_cols = j_ok
    # Input columns: a compact input is read up to its zero padding (a multiple of CHANNEL_PAD).
    if HAS_IN_IDX:
        cnt_in = tl.load(in_cnt_ptr + n)
        k_lim = tl.minimum(_round_up(cnt_in, CHANNEL_PAD), CIN_BUF)
    else:
        cnt_in = CIN
        k_lim = CIN
    nkb = tl.cdiv(cnt_in, BLOCK_K)
    live = _tile_is_live(gate_ptr, n64, rj, j_ok, cnt_out, pid_c, COUT, MODE, BLOCK_N)
    steps = tl.where(live, nkb * (KS * KS), 0)
    first = split * steps // SPLIT
    stop = (split + 1) * steps // SPLIT

    oh = rm // WO
    ow = rm % WO
    x_base = x_ptr + n64 * H * W * CIN_BUF
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(first, stop):
        tap = step // nkb
        rk = (step - tap * nkb) * BLOCK_K + tl.arange(0, BLOCK_K)
        a = _input_tile(x_base, oh, ow, m_ok, tap, rk, k_lim, H, W, CIN_BUF, STRIDE, KS, PAD)
        k_ok = rk < cnt_in
        if HAS_IN_IDX:
            ic = tl.load(in_idx_ptr + n64 * CIN + rk, mask=k_ok, other=0)
        else:
            ic = rk
        b = _weight_tile(w_ptr, tap, ic, k_ok, oc, w_cols, CIN, COUT, KS * KS, MODE)
        if UPCAST:  # the interpreter's bf16 dot is wrong (triton 3.8); never set for compiled kernels
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)

    # A runtime branch, not a specialisation: split and unsplit launches share one compile.
    if SPLIT > 1:
        tile = (n64 * (tl.num_programs(0) // SPLIT) + pid_m) * tl.num_programs(1) + pid_c
        total, last = _sum_splits(acc, ws_ptr, sem_ptr, tile, split, rm, rj, m_ok, j_ok, n64, SPLIT, HWO, COUT)
        if last:
            _epilogue(total, n64, pid_m, rm, m_ok, rj, j_ok, oc, cnt_out, bias_ptr, gate_ptr, res_ptr, out_ptr,
                      part_ptr, HWO, COUT, T, MODE, WRITE_PART)
    else:
        _epilogue(acc, n64, pid_m, rm, m_ok, rj, j_ok, oc, cnt_out, bias_ptr, gate_ptr, res_ptr, out_ptr, part_ptr,
                  HWO, COUT, T, MODE, WRITE_PART)


def _configs():
    # The autotuning space (MANIDP_TRITON_AUTOTUNE=1).  No BLOCK_N = 128 configs: they spill on sm_90
    # (docs/DESIGN.md 7.4); 8 warps for 128-row tiles, whose conv2 spills with 4.
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
    channel class, split or not)."""
    bn = 64 if int(args["COUT"]) >= 64 else 32
    bk = 16 if int(args["CIN"]) <= 16 else 32
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps_for(int(args["BLOCK_M"])), num_stages=3)


# Shapes that vary per layer and batch are not specialised on (one compile serves them); the channel
# counts are, for their divisibility by 16 (vector loads).
SHAPE_ARGS = ("NB", "H", "W", "HO", "WO", "T", "NB_BUCKET", "SPLIT")

gated_conv_kernel = TritonKernel(
    _gated_conv, _configs(),
    key=["NB_BUCKET", "HO", "WO", "CIN", "COUT", "STRIDE", "BLOCK_M", "MODE", "HAS_IN_IDX", "SPLIT"],
    interp_config={"BLOCK_N": 16, "BLOCK_K": 16},
    fixed_config=fixed_config, prune=_prune, do_not_specialize=SHAPE_ARGS)
