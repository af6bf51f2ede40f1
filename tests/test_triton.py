"""Triton kernels and the ``triton`` backend on CPU tensors, through Triton's interpreter.

Every test runs with ``TRITON_INTERPRET=1`` set by an autouse fixture (the kernel
launcher picks the interpreter per call, so the variable does not leak into
other test modules, e.g. the GPU tests).  Shapes are tiny: the interpreter runs
every program of a grid one after the other in numpy.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from manidp.calibrate import calibrate_bn, calibrate_keep_ratio  # noqa: E402
from manidp.deploy import DynamicResNet, available_backends  # noqa: E402
from manidp.deploy.gpu_common import MODE_CONV1, MODE_CONV2, MODE_PLAIN  # noqa: E402
from manidp.deploy.reference import ReferenceBackend, compact_indices, gate_forward  # noqa: E402
from manidp.deploy.triton_backend import TritonBackend, load_kernels  # noqa: E402
from manidp.models import CifarResNet  # noqa: E402


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def ops():
    return load_kernels()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output"
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


def perm_from_active(active: torch.Tensor):
    """(N, C) bool -> (idx (N, C) int32 permutation: active ascending then inactive, cnt (N,) int32)."""
    n, c = active.shape
    ar = torch.arange(c).expand(n, c)
    key = torch.where(active, ar, ar + c)
    return key.argsort(dim=1).to(torch.int32), active.sum(1).to(torch.int32)


def varied_active(n: int, c: int, gen: torch.Generator) -> torch.Tensor:
    """Active sets with counts 0, c, and distinct counts in between (random channels)."""
    counts = [0, c] + [int(v) for v in torch.randperm(c - 1, generator=gen)[: max(n - 2, 0)] + 1]
    act = torch.zeros(n, c, dtype=torch.bool)
    for i in range(n):
        k = counts[i % len(counts)]
        act[i, torch.randperm(c, generator=gen)[:k]] = True
    return act


# ----------------------------------------------------------------------------- gate kernel
@pytest.mark.parametrize("n,t,cin,c,hid", [(1, 1, 16, 16, 16), (5, 3, 24, 20, 10), (17, 2, 40, 33, 17)])
def test_gate_matches_torch(ops, n, t, cin, c, hid):
    gen = torch.Generator().manual_seed(n * 100 + c)
    part = torch.randn(n, t, cin, generator=gen)
    fc1 = torch.randn(hid, cin, generator=gen) / math.sqrt(cin)
    fc2 = torch.randn(c, hid, generator=gen) / math.sqrt(hid)
    bias = torch.randn(c, generator=gen) * 0.5
    hw = 7
    pooled = part.sum(1) / hw
    g_ref = torch.clamp(F.relu(F.relu(pooled @ fc1.t()) @ fc2.t() + bias), max=0.9)
    vals = g_ref[g_ref > 0].sort().values
    thr = torch.tensor(float(vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2)
    g, idx, cnt = ops.triton_gate(part, hw, fc1, fc2, bias, thr, 0.9)
    assert rel_err(g, g_ref) < 1e-5
    ref_idx, ref_cnt = compact_indices((g_ref >= thr) & (g_ref > 0))
    assert torch.equal(cnt, ref_cnt)
    for i in range(n):
        k = int(cnt[i])
        assert torch.equal(idx[i, :k], ref_idx[i, :k])
        assert torch.equal(idx[i].sort().values, torch.arange(c, dtype=torch.int32))  # a permutation


@pytest.mark.parametrize("case", ["none", "all", "varied"])
def test_gate_edge_counts(ops, case):
    n, c = 6, 24
    gen = torch.Generator().manual_seed(3)
    eye = torch.eye(c)
    if case == "varied":  # identity fcs: g = pooled; instance i keeps exactly i channels
        pooled = torch.rand(n, c, generator=gen) * 0.4
        for i in range(n):
            pooled[i, torch.randperm(c, generator=gen)[:i * 4]] += 1.0
        thr, want = torch.tensor(0.7), torch.arange(n, dtype=torch.int32) * 4
    else:
        pooled = torch.rand(n, c, generator=gen) + 0.1
        thr = torch.tensor(float("inf") if case == "none" else -1e4)
        want = torch.full((n,), 0 if case == "none" else c, dtype=torch.int32)
    g, idx, cnt = ops.triton_gate(pooled[:, None, :] * 5, 5, eye, eye, torch.zeros(c), thr, 1000.0)
    assert torch.equal(cnt, want)
    ref_idx, _ = compact_indices((g >= thr) & (g > 0))
    for i in range(n):
        assert torch.equal(idx[i, :cnt[i]], ref_idx[i, :cnt[i]])
        assert torch.equal(idx[i].sort().values, torch.arange(c, dtype=torch.int32))


# ----------------------------------------------------------------------------- conv kernel
def _w_layout(w: torch.Tensor) -> torch.Tensor:
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1, w.shape[1]).contiguous()


@pytest.mark.parametrize("ks,stride,h,w,bm", [(3, 1, 6, 5, 16), (3, 2, 9, 7, 16), (1, 2, 7, 9, 32), (3, 2, 4, 4, 64)])
def test_conv_plain(ops, ks, stride, h, w, bm):
    gen = torch.Generator().manual_seed(ks * 10 + stride + h)
    n, cin, cout = 2, 20, 24
    x = torch.randn(n, cin, h, w, generator=gen)
    wt = torch.randn(cout, cin, ks, ks, generator=gen)
    b = torch.randn(cout, generator=gen)
    out, part = ops.triton_gated_conv(x.permute(0, 2, 3, 1).contiguous(), _w_layout(wt), b, None, None, None, None,
                                      None, None, stride, ks, MODE_PLAIN, bm, True, False)
    ref = F.conv2d(x, wt, b, stride=stride, padding=ks // 2).permute(0, 2, 3, 1)
    assert out.shape == ref.shape and part.shape[1] == 0
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("stride,h,w,bm", [(1, 5, 7, 16), (2, 9, 7, 16), (2, 5, 5, 64)])
def test_conv1_epilogue(ops, stride, h, w, bm):
    gen = torch.Generator().manual_seed(stride * 7 + h)
    n, cin, c = 5, 16, 20
    x = torch.randn(n, cin, h, w, generator=gen)
    wt = torch.randn(c, cin, 3, 3, generator=gen)
    b = torch.randn(c, generator=gen)
    g = torch.rand(n, c, generator=gen) + 0.1
    idx, cnt = perm_from_active(varied_active(n, c, gen))
    a, part = ops.triton_gated_conv(x.permute(0, 2, 3, 1).contiguous(), _w_layout(wt), b, None, None, idx, cnt, g,
                                    None, stride, 3, MODE_CONV1, bm, True, False)
    full = F.relu(F.conv2d(x, wt, b, stride=stride, padding=1) * g[:, :, None, None]).permute(0, 2, 3, 1)
    ho, wo = full.shape[1:3]
    assert a.shape == (n, ho, wo, c) and part.shape == (n, -(-ho * wo // bm), c)
    for i in range(n):
        k = int(cnt[i])
        ch = idx[i, :k].long()
        if k:
            assert rel_err(a[i, :, :, :k], full[i][..., ch]) < 1e-6
        sums = torch.zeros(c)
        sums[ch] = full[i][..., ch].sum((0, 1))
        assert rel_err(part[i].sum(0), sums) < 1e-6


@pytest.mark.parametrize("identity", [True, False])
def test_conv2_epilogue(ops, identity):
    gen = torch.Generator().manual_seed(11 + identity)
    n, c, h, w, bm = 6, 20, 5, 6, 16
    act1, act2 = varied_active(n, c, gen), varied_active(n, c, gen).flip(0)
    idx1, cnt1 = perm_from_active(act1)
    idx2, cnt2 = perm_from_active(act2)
    # Compact conv1 output: instance i holds its cnt1[i] channels first; the rest is garbage.
    a = torch.randn(n, h, w, c, generator=gen).relu()
    a_full = torch.zeros(n, c, h, w)
    for i in range(n):
        k = int(cnt1[i])
        a_full[i, idx1[i, :k].long()] = a[i, :, :, :k].permute(2, 0, 1)
        a[i, :, :, k:] = float("nan")  # must never be read
    wt = torch.randn(c, c, 3, 3, generator=gen)
    b = torch.randn(c, generator=gen)
    g2 = torch.rand(n, c, generator=gen) + 0.1
    res = torch.randn(n, h, w, c, generator=gen)
    out, part = ops.triton_gated_conv(a, _w_layout(wt), b, idx1, cnt1, idx2, cnt2, g2, res, 1, 3, MODE_CONV2, bm,
                                      True, False)
    conv = (F.conv2d(a_full, wt, b, padding=1) * g2[:, :, None, None]).permute(0, 2, 3, 1)
    ref = torch.where(act2[:, None, None, :], res + conv, res).relu()
    assert rel_err(out, ref) < 1e-6
    assert rel_err(part.sum(1), ref.sum((1, 2))) < 1e-6


# ----------------------------------------------------------------------------- backend / engine
def make_engine(keep=0.5, size=12, n=4, depth=8, width=1.0, seed=0):
    torch.manual_seed(seed)
    model = CifarResNet(depth, num_classes=10, width_mult=width).eval()
    x = torch.randn(n, 3, size, size)
    calibrate_bn(model, x)
    calibrate_keep_ratio(model, x, keep)
    return DynamicResNet.from_model(model, backend="reference"), x


def _block_inputs(engine, x):
    """Per-block inputs of the reference forward."""
    h = engine._stem(x)
    ref = ReferenceBackend()
    for blk in engine.blocks:
        yield blk, h
        h = ref.block(blk, h).out


def check_block(blk, h, backend, dtype=torch.float32, tol=1e-5):
    ref = ReferenceBackend().block(blk, h.to(dtype).float())
    got = backend.block(blk, backend.prepare_input(h.to(dtype)))
    assert got.out.shape == ref.out.shape
    assert torch.equal(got.cnt1, ref.cnt1) and torch.equal(got.cnt2, ref.cnt2)
    for i in range(h.shape[0]):
        assert torch.equal(got.idx1[i, :ref.cnt1[i]], ref.idx1[i, :ref.cnt1[i]])
        assert torch.equal(got.idx2[i, :ref.cnt2[i]], ref.idx2[i, :ref.cnt2[i]])
    assert rel_err(got.out.float(), ref.out) < tol
    return got


def test_backend_registered_on_cpu_under_interpreter():
    assert "triton" in available_backends(torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("case", ["random", "a1_empty", "a2_empty", "all_active", "batch1"])
def test_blocks_against_reference(case):
    engine, x = make_engine(size=9, n=1 if case == "batch1" else 3)  # 9x9: stride-2 blocks see odd sizes
    for blk in engine.blocks:
        if case == "a1_empty":
            blk.gate1.threshold.fill_(float("inf"))
        elif case == "a2_empty":
            blk.gate2.threshold.fill_(float("inf"))
        elif case == "all_active":
            for gt in (blk.gate1, blk.gate2):
                gt.threshold.fill_(-1e4)
                gt.fc2.zero_()
                gt.fc2_bias.fill_(1.0)  # g = 1 > 0 for every channel
    backend = TritonBackend()
    backend.prepare(engine)
    for blk, h in _block_inputs(engine, x):
        got = check_block(blk, h, backend)
        c = blk.planes
        if case == "a1_empty":
            assert (got.cnt1 == 0).all()
        if case == "a2_empty":
            assert (got.cnt2 == 0).all()
        if case == "all_active":
            assert (got.cnt1 == c).all() and (got.cnt2 == c).all()


def test_block_every_instance_a_different_count():
    engine, x = make_engine(n=5, size=8)
    blk = engine.blocks[0]  # 16 -> 16 channels, identity shortcut
    c = blk.planes
    gen = torch.Generator().manual_seed(5)
    # gate1 = identity fcs: g1 = pooled input; instance i gets 3*i channels above the threshold.
    blk.gate1.fc1.copy_(torch.eye(c))
    blk.gate1.fc2.copy_(torch.eye(c))
    blk.gate1.fc2_bias.zero_()
    blk.gate1.threshold.fill_(1.0)
    h = torch.rand(5, c, 8, 8, generator=gen) * 0.5
    for i in range(5):
        h[i, torch.randperm(c, generator=gen)[:3 * i]] += 1.0
    backend = TritonBackend()
    backend.prepare(engine)
    got = check_block(blk, h, backend)
    assert got.cnt1.tolist() == [0, 3, 6, 9, 12]


def test_engine_forward_matches_reference():
    engine, x = make_engine(size=11, n=3)
    logits_ref, stats_ref = engine(x, return_stats=True)
    engine.set_backend("triton")
    logits, stats = engine(x, return_stats=True)
    assert rel_err(logits, logits_ref) < 1e-5
    assert torch.equal(stats["active"], stats_ref["active"])
    assert torch.equal(stats["macs"], stats_ref["macs"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_blocks_half_precision(dtype):
    engine, x = make_engine(size=8, n=2, keep=0.6)
    engine.compute_dtype = dtype
    backend = TritonBackend()
    backend.prepare(engine)
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    for blk, h in list(_block_inputs(engine, x))[:2]:
        check_block(blk, h, backend, dtype=dtype, tol=tol)


def test_ops_opcheck(ops):
    """Schemas and fake implementations agree with the real kernels (torch.library.opcheck)."""
    gen = torch.Generator().manual_seed(2)
    n, c, h, w = 2, 16, 4, 4
    part = torch.randn(n, 1, c, generator=gen)
    fc = torch.randn(c, c, generator=gen) / 4
    args = (part, h * w, fc, fc.clone(), torch.ones(c), torch.tensor(0.5), 1000.0)
    torch.library.opcheck(torch.ops.manidp.triton_gate.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    idx, cnt = perm_from_active(varied_active(n, c, gen))
    x = torch.randn(n, h, w, c, generator=gen)
    wt = torch.randn(c, 9, c, generator=gen)
    cargs = (x, wt, torch.randn(c), None, None, idx, cnt, torch.rand(n, c), None, 1, 3, MODE_CONV1, 16, True, False)
    torch.library.opcheck(torch.ops.manidp.triton_gated_conv.default, cargs,
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- ahead-of-time compilation
# Compiled in a child process with TRITON_INTERPRET unset: in the parent, interpreted kernels of
# the other tests patch triton.language while they run, and in a long pytest session that state
# has leaked into compilation ("'ir.value' object has no attribute 'dtype'").
_AOT_CHILD = textwrap.dedent("""
    import importlib, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    spec = json.loads(sys.argv[1])
    kernel = getattr(importlib.import_module(spec["module"]), spec["name"])
    jit = JITFunction(kernel.fn)
    sig = dict(spec["sig"], **{k: "constexpr" for k in spec["const"]})
    attrs = {(jit.arg_names.index(n),): [["tt.divisibility", 16]] for n in spec["divisible"]}
    try:
        src = ASTSource(jit, sig, spec["const"], attrs)
    except TypeError as e:  # another Triton's AOT API
        print("SKIP this Triton's ASTSource differs:", e)
        sys.exit(0)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]))
    sys.stdout.write("PTX\\n" + k.asm["ptx"])
""")


def _aot_compile(module, name, sig, const, divisible, num_warps=4, num_stages=3):
    """Compile a kernel for sm_90 without a GPU (catches what the interpreter cannot: types, layouts,
    MMA); returns its PTX."""
    spec = dict(module=module, name=name, sig=sig, const=const, divisible=divisible, num_warps=num_warps,
                num_stages=num_stages)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT_CHILD, json.dumps(spec)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    if r.stdout.startswith("SKIP"):
        pytest.skip(r.stdout.strip())
    assert r.stdout.startswith("PTX\n"), r.stdout[:200]
    return r.stdout[4:]


@pytest.mark.parametrize("dtype,mode,ks,stride,prec", [("fp16", 1, 3, 2, "ieee"), ("bf16", 2, 3, 1, "ieee"),
                                                        ("fp32", 0, 1, 2, "tf32"), ("fp32", 2, 3, 1, "ieee")])
def test_conv_kernel_compiles_for_sm90(dtype, mode, ks, stride, prec):
    p = f"*{dtype}"
    sig = {"x_ptr": p, "w_ptr": p, "bias_ptr": "*fp32", "in_idx_ptr": "*i32", "in_cnt_ptr": "*i32",
           "out_idx_ptr": "*i32", "out_cnt_ptr": "*i32", "gate_ptr": "*fp32", "res_ptr": p, "out_ptr": p,
           "part_ptr": "*fp32", **{k: "i32" for k in ["NB", "H", "W", "HO", "WO", "CIN_BUF", "CIN", "COUT", "T"]}}
    const = dict(STRIDE=stride, KS=ks, PAD=ks // 2, MODE=mode, HAS_IN_IDX=mode == 2, HAS_OUT_IDX=mode > 0,
                 WRITE_PART=mode > 0, PRECISION=prec, UPCAST=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
    div = [k for k in sig if k.endswith("_ptr")] + ["CIN_BUF", "CIN", "COUT"]
    ptx = _aot_compile("manidp.kernels.gated_conv", "gated_conv_kernel", sig, const, div)
    if dtype != "fp32" or prec == "tf32":
        assert "wgmma.mma_async" in ptx or "mma.sync" in ptx  # tensor cores


def test_gate_kernel_compiles_for_sm90():
    sig = {"part_ptr": "*fp32", "fc1_ptr": "*fp32", "fc2_ptr": "*fp32", "bias_ptr": "*fp32", "thr_ptr": "*fp32",
           "g_ptr": "*fp32", "idx_ptr": "*i32", "cnt_ptr": "*i32", "NB": "i32", "T": "i32", "CIN": "i32",
           "HID": "i32", "C": "i32", "HW": "i32", "clamp_max": "fp32"}
    const = dict(HID_P=256, BLOCK_B=16, BLOCK_CI=32, BLOCK_C=64)
    assert _aot_compile("manidp.kernels.gate", "gate_kernel", sig, const, [k for k in sig if k.endswith("_ptr")],
                        num_stages=2)
