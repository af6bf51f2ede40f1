"""Gate kernel (Triton, docs/DESIGN.md 1.1, 7.4): pooling + fc1 + relu + fc2 + bias + relu + clamp +
threshold + compaction.

Input is the per-tile channel sums ``part`` (N, T, CIN) fp32 that the previous
conv's epilogue wrote (or a plain sum, T = 1); the pooled input is
``sum_t part[n, t, :] / HW``.  One program handles ``BLOCK_B`` instances, so the
fc weights are read once per group and the two fc layers are fp32 matrix
products (``input_precision="ieee"``: thresholds compare in full fp32, as in
training).

Outputs:

* ``g``   (N, C) fp32 gate values of the active channels, zero for the others (conv2 reads its
  active channels from ``g > 0``);
* ``idx`` (N, C) int32, per instance a permutation of ``0..C-1``: the active
  channels (``g >= thr`` and ``g > 0``) ascending, then the inactive ones
  (in descending order, filled from the end);
* ``cnt`` (N,) int32 active counts.

The compaction is an in-register prefix sum per chunk of ``BLOCK_C`` channels
with running counts carried across chunks, so the whole gate is one pass.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._launch import TritonKernel

__all__ = ["gate_kernel"]


def _gate(
    part_ptr, fc1_ptr, fc2_ptr, bias_ptr, thr_ptr, g_ptr, idx_ptr, cnt_ptr,
    NB, T, CIN, HID, C, HW, NB_BUCKET, clamp_max,
    HID_P: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rb = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = rb < NB
    rb64 = rb.to(tl.int64)
    rh = tl.arange(0, HID_P)
    h_ok = rh < HID

    # fc1 on the pooled input, CIN in chunks.
    h = tl.zeros((BLOCK_B, HID_P), dtype=tl.float32)
    for c0 in range(0, CIN, BLOCK_CI):
        rc = c0 + tl.arange(0, BLOCK_CI)
        c_ok = rc < CIN
        s = tl.zeros((BLOCK_B, BLOCK_CI), dtype=tl.float32)
        for t in range(0, T):
            s += tl.load(part_ptr + (rb64[:, None] * T + t) * CIN + rc[None, :],
                         mask=b_ok[:, None] & c_ok[None, :], other=0.0)
        # Round-to-nearest division: the active set must match the CPU kernels' fp32 pooling exactly
        # (Triton's default fp32 division is approximate).
        s = tl.math.div_rn(s, tl.full((BLOCK_B, BLOCK_CI), HW, tl.float32))
        w1 = tl.load(fc1_ptr + rh[None, :] * CIN + rc[:, None], mask=c_ok[:, None] & h_ok[None, :], other=0.0)
        h = tl.dot(s, w1, h, input_precision="ieee")
    h = tl.maximum(h, 0.0)

    thr = tl.load(thr_ptr)
    run_a = tl.zeros((BLOCK_B,), dtype=tl.int32)
    run_i = tl.zeros((BLOCK_B,), dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        rc = c0 + tl.arange(0, BLOCK_C)
        c_ok = rc < C
        w2 = tl.load(fc2_ptr + rc[None, :] * HID + rh[:, None], mask=h_ok[:, None] & c_ok[None, :], other=0.0)
        bias = tl.load(bias_ptr + rc, mask=c_ok, other=0.0)
        g = tl.dot(h, w2, input_precision="ieee") + bias[None, :]
        g = tl.minimum(tl.maximum(g, 0.0), clamp_max)
        valid = b_ok[:, None] & c_ok[None, :]
        act = (g >= thr) & (g > 0.0) & c_ok[None, :]
        ai = act.to(tl.int32)
        ii = (c_ok[None, :] & ~act).to(tl.int32)  # NaN gates compare false: inactive
        ea = tl.cumsum(ai, axis=1) - ai
        ei = tl.cumsum(ii, axis=1) - ii
        pos = tl.where(act, run_a[:, None] + ea, C - 1 - (run_i[:, None] + ei))
        tl.store(g_ptr + rb64[:, None] * C + rc[None, :], tl.where(act, g, 0.0), mask=valid)
        tl.store(idx_ptr + rb64[:, None] * C + pos, (rc[None, :] + 0 * pos).to(tl.int32), mask=valid)
        run_a += tl.sum(ai, axis=1)
        run_i += tl.sum(ii, axis=1)
    tl.store(cnt_ptr + rb, run_a, mask=b_ok)


def _configs():
    return [triton.Config({"BLOCK_B": 16, "BLOCK_CI": 32, "BLOCK_C": 64}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_B": 16, "BLOCK_CI": 32, "BLOCK_C": 64}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_B": 16, "BLOCK_CI": 64, "BLOCK_C": 64}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_B": 16, "BLOCK_CI": 32, "BLOCK_C": 32}, num_warps=4, num_stages=2)]


def warps_for(hid_p: int) -> int:
    """4 warps, 8 for hidden layers of 128 or more (the fp32 fc products spill with 4 on sm_90)."""
    return 8 if hid_p >= 128 else 4


def _prune(configs, named_args, **kwargs):
    """The warp count of :func:`warps_for`."""
    warps = warps_for(int(kwargs.get("HID_P", named_args.get("HID_P", 16))))
    return [c for c in configs if c.num_warps == warps] or configs[:1]


def fixed_config(args) -> "triton.Config":
    """The one config of the fixed mode: 16 instances, 32-channel input and 64-channel output chunks."""
    return triton.Config({"BLOCK_B": 16, "BLOCK_CI": 32, "BLOCK_C": 64}, num_warps=warps_for(int(args["HID_P"])),
                         num_stages=2)


gate_kernel = TritonKernel(_gate, _configs(), key=["NB_BUCKET", "CIN", "HID", "C"],
                           interp_config={"BLOCK_B": 16, "BLOCK_CI": 16, "BLOCK_C": 16},
                           fixed_config=fixed_config, prune=_prune, do_not_specialize=("NB", "T", "HW", "NB_BUCKET"))
