"""The GPU op contracts (docs/DESIGN.md 7.2), each tested once over the GPU backends, and the GPU engines.

Backends of the contracts ``gpu_gate`` and ``gated_conv``: ``cuda`` (the CUDA kernels of
``manidp::gpu_gate`` / ``manidp::gated_conv``; ``cuda-simt`` and ``cuda-wmma`` force a conv
kernel) and ``triton`` (``manidp::triton_gpu_gate`` / ``manidp::triton_gated_conv``).  With a
CUDA device every backend runs on CUDA tensors.  In a process started with ``TRITON_INTERPRET=1``
(``tests/test_triton.py`` runs this module in one) the ``triton`` backend runs on CPU tensors
through the interpreter, in fp32 and on the small cases only, and the others skip.  Otherwise
everything skips.  On a GPU machine, after building the extension::

    pip install --no-build-isolation -e .          # or MANIDP_CUDA_JIT=1 for a JIT build of csrc/cuda
    python -m pytest -q tests/test_gpu.py tests/test_triton.py

(``benchmarks/gpu_run.sh`` does this and the benchmark in one bounded command.)  The
compute-sanitizer test is opt-in: ``MANIDP_SANITIZER=1``.

Tolerances: ||out - ref|| / ||ref|| against float64 references computed with the *same*
active sets, < 1e-5 for fp32 (no tf32), < 5e-3 for fp16 and < 3e-2 for bf16 (a block's output
is rounded twice: conv1's compact output and the final store).  On CUDA, outputs are allocated
from a NaN-poisoned allocator cache so unwritten elements show.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import calibrated

from manidp.deploy import DynamicResNet
from manidp.deploy.gpu_common import weights_by_input, weights_by_output
from manidp.kernels.build_config import CHANNEL_PAD, CONV_IMPLS, MODE_CONV1, MODE_CONV2, MODE_PLAIN

pytestmark = pytest.mark.gpu

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ["triton", "cuda-simt", "cuda-wmma"]


@pytest.fixture(autouse=True)
def _highest_precision():
    torch.set_float32_matmul_precision("highest")


def _device(backend: str) -> str:
    """Where ``backend``'s ops run in this process; skips the test where they do not."""
    if INTERPRET:
        if backend != "triton":
            pytest.skip("this process runs Triton's interpreter; the CUDA kernels are tested in the main one")
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (or, for triton, a process started with TRITON_INTERPRET=1)")
    return "cuda"


def _cuda_kernels() -> bool:
    from manidp.deploy.cuda_backend import cuda_ops_available
    return cuda_ops_available()


def contract_ops(kind: str):
    """``(gate, gated_conv, device)`` of a backend kind; ``cuda-simt``/``cuda-wmma`` force a conv kernel."""
    device = _device(kind.split("-")[0])
    if kind == "triton":
        import manidp.kernels.ops  # noqa: F401  (registers the Triton ops)
        return torch.ops.manidp.triton_gpu_gate, torch.ops.manidp.triton_gated_conv, device
    if not _cuda_kernels():
        pytest.skip("manidp._C has no CUDA kernels")
    impl = CONV_IMPLS[kind.split("-")[1]] if "-" in kind else CONV_IMPLS["auto"]
    return torch.ops.manidp.gpu_gate, lambda *a: torch.ops.manidp.gated_conv(*a, impl), device


def _skip_unsupported(kind: str, dtype: torch.dtype, device: str, big: bool = False) -> None:
    if kind == "cuda-wmma" and dtype == torch.float32:
        pytest.skip("the WMMA kernel is fp16/bf16 only")
    if device == "cpu" and (big or dtype != torch.float32):
        pytest.skip("the interpreter runs the small fp32 cases")


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output (unwritten element?)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poison(device: str) -> None:
    """Fill the CUDA allocator's cached blocks with NaN so that later torch.empty outputs start as NaN."""
    if device != "cuda":
        return
    bufs = [torch.full((1 << 17,), float("nan"), device="cuda") for _ in range(64)]  # small pool
    bufs.append(torch.full((1 << 25,), float("nan"), device="cuda"))  # large pool
    del bufs
    torch.cuda.synchronize()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def perm_from_active(active):
    """(N, C) bool -> (idx (N, C) int32 permutation: active ascending then inactive, cnt (N,) int32)."""
    n, c = active.shape
    ar = torch.arange(c, device=active.device).expand(n, c)
    key = torch.where(active, ar, ar + c)
    return key.argsort(dim=1).to(torch.int32), active.sum(1).to(torch.int32)


def varied_active(n, c, gen):
    """Active sets with counts 0, c, and distinct counts in between (random channels)."""
    counts = [0, c] + [int(v) for v in torch.randperm(c - 1, generator=gen)[: max(n - 2, 0)] + 1]
    act = torch.zeros(n, c, dtype=torch.bool)
    for i in range(n):
        act[i, torch.randperm(c, generator=gen)[:counts[i % len(counts)]]] = True
    return act


def padded_count(k: int, c: int) -> int:
    """Positions of a compact conv1 output that conv2 may read: ``k`` rounded up to CHANNEL_PAD, at most ``c``."""
    return min(-(-k // CHANNEL_PAD) * CHANNEL_PAD, c)


def check_gate(g, idx, cnt, g_ref, thr):
    """Gate values (zero for inactive channels), counts, active lists and the permutation of ``idx`` against a
    float64 reference."""
    act = (g_ref >= thr.double()) & (g_ref > 0)
    assert rel_err(g, torch.where(act, g_ref, 0.0)) < 1e-5
    assert torch.all(g[~act] == 0)
    assert torch.equal(cnt.long(), act.sum(1))
    c = g.shape[1]
    for i in range(g.shape[0]):
        k = int(cnt[i])
        assert torch.equal(idx[i, :k].long(), act[i].nonzero().flatten())
        assert torch.equal(idx[i].sort().values.long(), torch.arange(c, device=idx.device))


# ----------------------------------------------------------------------------- gpu_gate
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("n,t,cin,c,hid,big", [(1, 1, 16, 16, 16, False), (5, 3, 24, 20, 10, False),
                                               (17, 2, 40, 33, 17, False), (1, 3, 64, 64, 64, True),
                                               (37, 3, 256, 512, 256, True), (5, 3, 30, 100, 50, True)])
def test_gate(backend, n, t, cin, c, hid, big):
    gate, _, dev = contract_ops(backend)
    _skip_unsupported(backend, torch.float32, dev, big)
    gen = torch.Generator().manual_seed(n + c)
    part = torch.randn(n, t, cin, generator=gen).to(dev)
    fc1 = (torch.randn(hid, cin, generator=gen) / cin ** 0.5).to(dev)
    fc2 = (torch.randn(c, hid, generator=gen) / hid ** 0.5).to(dev)
    bias = (torch.randn(c, generator=gen) * 0.3).to(dev)
    hw, clamp_max = 49, 2.0
    pooled = part.double().sum(1) / hw
    g_ref = torch.clamp(F.relu(F.relu(pooled @ fc1.double().t()) @ fc2.double().t() + bias.double()), max=clamp_max)
    v = g_ref[g_ref > 0].sort().values
    thr = ((v[len(v) // 2 - 1] + v[len(v) // 2]) / 2).float()
    poison(dev)
    g, idx, cnt = gate(part, hw, fc1, fc2, bias, thr, clamp_max)
    sync(dev)
    check_gate(g, idx, cnt, g_ref, thr)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", ["none", "all", "varied"])
def test_gate_edge_counts(backend, case):
    """No channel active, every channel, and a different count per instance (identity fcs: g = pooled)."""
    gate, _, dev = contract_ops(backend)
    n, c = 6, 24
    gen = torch.Generator().manual_seed(3)
    eye = torch.eye(c, dtype=torch.float64)
    if case == "varied":  # instance i keeps exactly 4 * i channels
        pooled = torch.rand(n, c, generator=gen, dtype=torch.float64) * 0.4
        for i in range(n):
            pooled[i, torch.randperm(c, generator=gen)[:i * 4]] += 1.0
        thr, want = torch.tensor(0.7), torch.arange(n, dtype=torch.int32) * 4
    else:
        pooled = torch.rand(n, c, generator=gen, dtype=torch.float64) + 0.1
        thr = torch.tensor(float("inf") if case == "none" else -1e4)
        want = torch.full((n,), 0 if case == "none" else c, dtype=torch.int32)
    g, idx, cnt = gate((pooled[:, None, :] * 5).float().to(dev), 5, eye.float().to(dev), eye.float().to(dev),
                       torch.zeros(c, device=dev), thr.to(dev), 1000.0)
    assert torch.equal(cnt.cpu(), want)
    check_gate(g, idx, cnt, pooled.to(dev), thr.to(dev))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gate_debug_permutation_check(backend):
    """MANIDP_DEBUG_CHECKS's check accepts the gate's index output and rejects a repeated channel."""
    from manidp.deploy.gpu_common import check_gate_permutation
    gate, _, dev = contract_ops(backend)
    n, c, hid = 3, 20, 8
    gen = torch.Generator().manual_seed(11)
    part = torch.randn(n, 2, 16, generator=gen).to(dev)
    fc1, fc2 = torch.randn(hid, 16, generator=gen).to(dev), torch.randn(c, hid, generator=gen).to(dev)
    g, idx, cnt = gate(part, 4, fc1, fc2, torch.zeros(c, device=dev), torch.tensor(0.1, device=dev), 10.0)
    check_gate_permutation(idx, cnt)
    bad = idx.clone()
    bad[0, -1] = bad[0, 0]
    with pytest.raises(RuntimeError, match="permutation"):
        check_gate_permutation(bad, cnt)


# ----------------------------------------------------------------------------- gated_conv
def _conv_inputs(n, cin, c, h, w, ks, dtype, dev, gen):
    x = torch.randn(n, cin, h, w, generator=gen).to(dev, dtype)
    wt = (torch.randn(c, cin, ks, ks, generator=gen) / (ks * cin ** 0.5)).to(dev, dtype)
    return x, wt, torch.randn(c, generator=gen).to(dev)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ks,stride,n,h,w,cin,c,bm,big", [
    (3, 1, 2, 6, 5, 20, 24, 32, False), (3, 2, 2, 9, 7, 20, 24, 32, False), (1, 2, 2, 7, 9, 20, 24, 32, False),
    (3, 2, 2, 4, 4, 20, 24, 64, False), (1, 2, 3, 15, 15, 64, 128, 32, True)])
def test_conv_plain_mode(kind, dtype, ks, stride, n, h, w, cin, c, bm, big):
    """The shortcut: dense conv + bias, no channel sums."""
    _, conv, dev = contract_ops(kind)
    _skip_unsupported(kind, dtype, dev, big)
    x, wt, b = _conv_inputs(n, cin, c, h, w, ks, dtype, dev, torch.Generator().manual_seed(ks * 10 + stride + h))
    poison(dev)
    out, part = conv(x.permute(0, 2, 3, 1).contiguous(), weights_by_output(wt), b, None, None, None, None, None, None,
                     stride, ks, MODE_PLAIN, bm, True, False)
    sync(dev)
    ref = F.conv2d(x.double(), wt.double(), b.double(), stride=stride, padding=ks // 2).permute(0, 2, 3, 1)
    assert out.shape == ref.shape and out.dtype == dtype and part.shape[1] == 0
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride,n,h,w,cin,c,bm,big", [
    (1, 5, 5, 7, 16, 20, 32, False), (2, 5, 9, 7, 16, 20, 32, False), (2, 5, 5, 5, 16, 20, 64, False),
    (1, 6, 14, 14, 64, 64, 64, True), (2, 6, 15, 13, 32, 96, 32, True), (2, 6, 56, 56, 64, 128, 128, True),
    (1, 6, 7, 7, 256, 256, 64, True)])
def test_conv1_mode(kind, dtype, stride, n, h, w, cin, c, bm, big):
    """conv1: compact output of the active channels with bias, gate scale and ReLU, and their channel sums."""
    _, conv, dev = contract_ops(kind)
    _skip_unsupported(kind, dtype, dev, big)
    gen = torch.Generator().manual_seed(h * c + stride)
    x, wt, b = _conv_inputs(n, cin, c, h, w, 3, dtype, dev, gen)
    g = (torch.rand(n, c, generator=gen) + 0.1).to(dev)
    idx, cnt = (t.to(dev) for t in perm_from_active(varied_active(n, c, gen)))
    poison(dev)
    a, part = conv(x.permute(0, 2, 3, 1).contiguous(), weights_by_output(wt), b, None, None, idx, cnt, g, None,
                   stride, 3, MODE_CONV1, bm, True, False)
    sync(dev)
    full = F.conv2d(x.double(), wt.double(), b.double(), stride=stride, padding=1)
    full = F.relu(full * g.double()[:, :, None, None]).permute(0, 2, 3, 1)
    ho, wo = full.shape[1:3]
    assert a.shape == (n, ho, wo, c) and part.shape == (n, -(-ho * wo // bm), c)
    for i in range(n):
        k = int(cnt[i])
        ch = idx[i, :k].long()
        assert torch.all(a[i, :, :, k:padded_count(k, c)] == 0), "conv1 pads its compact output with zeros"
        if k:
            assert rel_err(a[i, :, :, :k], full[i][..., ch]) < TOL[dtype]
            sums = torch.zeros(c, dtype=torch.float64, device=dev)
            sums[ch] = full[i][..., ch].sum((0, 1))
            assert rel_err(part[i].sum(0), sums) < max(TOL[dtype], 1e-5)
        else:
            assert torch.all(part[i] == 0)


def _conv2_inputs(n, h, w, c, dtype, dev, gen):
    """conv2's operands: a compact input (zeros up to the padded count, NaN after), its dense float64 copy,
    weights, bias, gate values zero for inactive channels, the residual, and the active sets."""
    act1, act2 = varied_active(n, c, gen), varied_active(n, c, gen).flip(0)
    idx1, cnt1 = (t.to(dev) for t in perm_from_active(act1))
    a = torch.randn(n, h, w, c, generator=gen).relu().to(dev, dtype)
    a_full = torch.zeros(n, c, h, w, dtype=torch.float64, device=dev)
    for i in range(n):
        k = int(cnt1[i])
        a_full[i, idx1[i, :k].long()] = a[i, :, :, :k].permute(2, 0, 1).double()
        a[i, :, :, k:] = 0.0  # conv1's zero padding ...
        a[i, :, :, padded_count(k, c):] = float("nan")  # ... and positions past it must never be read
    wt = (torch.randn(c, c, 3, 3, generator=gen) / (3 * c ** 0.5)).to(dev, dtype)
    b = torch.randn(c, generator=gen).to(dev)
    g2 = ((torch.rand(n, c, generator=gen) + 0.1) * act2).to(dev)
    res = torch.randn(n, h, w, c, generator=gen).to(dev, dtype)
    return a, a_full, idx1, cnt1, wt, b, g2, res, act2.to(dev)


def conv2_reference(a_full, wt, b, g2, res, act2):
    """relu(res + g2 * (conv + b)) on the active channels, relu(res) elsewhere, float64, channels-last."""
    conv = F.conv2d(a_full, wt.double(), b.double(), padding=1) * g2.double()[:, :, None, None]
    conv = conv.permute(0, 2, 3, 1)
    return torch.where(act2[:, None, None, :], res.double() + conv, res.double()).relu()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h,w,c,bm,big", [(6, 5, 6, 20, 32, False), (6, 14, 14, 64, 64, True),
                                            (6, 9, 11, 96, 32, True), (6, 7, 7, 512, 64, True)])
def test_conv2_mode(kind, dtype, n, h, w, c, bm, big):
    """conv2: residual + gate-scaled conv of the compact input on the active channels, relu(residual) elsewhere."""
    _, conv, dev = contract_ops(kind)
    _skip_unsupported(kind, dtype, dev, big)
    a, a_full, idx1, cnt1, wt, b, g2, res, act2 = _conv2_inputs(n, h, w, c, dtype, dev,
                                                                torch.Generator().manual_seed(h + c))
    poison(dev)
    out, part = conv(a, weights_by_input(wt), b, idx1, cnt1, None, None, g2, res, 1, 3, MODE_CONV2, bm, True, False)
    sync(dev)
    assert rel_err(out, conv2_reference(a_full, wt, b, g2, res, act2)) < TOL[dtype]
    assert rel_err(part.sum(1), out.double().sum((1, 2))) < 1e-5


@pytest.fixture
def split_small_grids(monkeypatch):
    """Make the Triton op believe it runs on a GPU of 1000 multiprocessors, so that the small grids of these
    tests split their reductions (docs/DESIGN.md 7.4); yields the split counts of its launches."""
    from manidp.kernels import ops
    splits = []
    split_k = ops.split_k

    def recording_split_k(*args):
        splits.append(split_k(*args))
        return splits[-1]

    monkeypatch.setattr(ops, "num_sms", lambda device: 1000)
    monkeypatch.setattr(ops, "split_k", recording_split_k)
    return splits


SPLIT_SHAPE = dict(n=3, h=6, w=7, c=64, bm=32)


def test_triton_split_k_conv1(split_small_grids):
    """conv1 with each tile's reduction split over programs: the last one sums the shares in split order, so
    the output matches the reference and repeats bit for bit."""
    _, conv, dev = contract_ops("triton")
    n, h, w, c, bm = SPLIT_SHAPE.values()
    gen = torch.Generator().manual_seed(7)
    x, wt, b = _conv_inputs(n, c, c, h, w, 3, torch.float32, dev, gen)
    g = (torch.rand(n, c, generator=gen) + 0.1).to(dev)
    idx, cnt = (t.to(dev) for t in perm_from_active(varied_active(n, c, gen)))
    args = (x.permute(0, 2, 3, 1).contiguous(), weights_by_output(wt), b, None, None, idx, cnt, g, None, 1, 3,
            MODE_CONV1, bm, True, False)
    a, part = conv(*args)
    assert split_small_grids and min(split_small_grids) > 1
    full = F.relu(F.conv2d(x.double(), wt.double(), b.double(), padding=1) * g.double()[:, :, None, None])
    a_again, part_again = conv(*args)
    assert torch.equal(part_again, part)
    for i in range(n):
        k = int(cnt[i])
        if k:
            assert rel_err(a[i, :, :, :k], full[i][idx[i, :k].long()].permute(1, 2, 0)) < TOL[torch.float32]
        written = padded_count(k, c)  # conv1 leaves the positions past its zero padding as they were
        assert torch.equal(a_again[i, :, :, :written], a[i, :, :, :written])


def test_triton_split_k_conv2(split_small_grids):
    """conv2 with each tile's reduction split over programs, as :func:`test_triton_split_k_conv1`."""
    _, conv, dev = contract_ops("triton")
    n, h, w, c, bm = SPLIT_SHAPE.values()
    a, a_full, idx1, cnt1, wt, b, g2, res, act2 = _conv2_inputs(n, h, w, c, torch.float32, dev,
                                                                torch.Generator().manual_seed(8))
    args = (a, weights_by_input(wt), b, idx1, cnt1, None, None, g2, res, 1, 3, MODE_CONV2, bm, True, False)
    out, part = conv(*args)
    assert split_small_grids and min(split_small_grids) > 1
    assert rel_err(out, conv2_reference(a_full, wt, b, g2, res, act2)) < TOL[torch.float32]
    out_again, part_again = conv(*args)
    assert torch.equal(out_again, out) and torch.equal(part_again, part)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_opcheck(backend):
    """Schema and fake kernel of each op agree with its real kernel (torch.library.opcheck)."""
    gate, _, dev = contract_ops(backend)
    gate_op = torch.ops.manidp.triton_gpu_gate if backend == "triton" else torch.ops.manidp.gpu_gate
    conv_op = torch.ops.manidp.triton_gated_conv if backend == "triton" else torch.ops.manidp.gated_conv
    gen = torch.Generator().manual_seed(2)
    n, c, h, w = 2, 16, 4, 4
    fc = torch.randn(c, c, generator=gen) / 4
    args = (torch.randn(n, 1, c, generator=gen), h * w, fc, fc.clone(), torch.ones(c), torch.tensor(0.5))
    torch.library.opcheck(gate_op.default, tuple(t.to(dev) if torch.is_tensor(t) else t for t in args) + (1000.0,),
                          test_utils=("test_schema", "test_faketensor"))
    idx, cnt = perm_from_active(varied_active(n, c, gen))
    cargs = (torch.randn(n, h, w, c, generator=gen), torch.randn(c, 9, c, generator=gen), torch.randn(c), None, None,
             idx, cnt, torch.rand(n, c), None)
    cargs = tuple(t.to(dev) if torch.is_tensor(t) else t for t in cargs) + (1, 3, MODE_CONV1, 32, True, False)
    torch.library.opcheck(conv_op.default, cargs, test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- engines (CUDA)
def _engine_backend(backend: str) -> None:
    if INTERPRET or not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (engine tests of Triton's interpreter are in tests/test_triton.py)")
    if backend == "cuda" and not _cuda_kernels():
        pytest.skip("manidp._C has no CUDA kernels")


def make_engine(kind="cifar", n=8, keep=0.5, seed=0):
    """A reference-backend engine of a calibrated random dyresnet20 (32x32) or dyresnet18 (96x96), and inputs."""
    if kind == "cifar":
        model, x = calibrated("dyresnet20", (32, 32), keep, n=n, seed=seed)
    else:
        model, x = calibrated("dyresnet18", (96, 96), keep, n=n, seed=seed, num_classes=100)
    return DynamicResNet.from_model(model, backend="reference"), x


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("arch", ["cifar", "imagenet"])
def test_engine_fp32_matches_reference(backend, arch):
    _engine_backend(backend)
    engine, x = make_engine(arch)
    ref_logits, ref_stats = engine(x, return_stats=True)          # reference backend, CPU, fp32
    engine.to("cuda")
    engine.set_backend(backend)
    logits, stats = engine(x.cuda(), return_stats=True)
    assert torch.equal(stats["active"].cpu(), ref_stats["active"].cpu())
    assert rel_err(logits.cpu(), ref_logits) < 1e-4


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_engine_half_matches_reference(backend, dtype):
    """Half precision against the reference backend run in the same dtype on the GPU (cuDNN).

    A gate value within rounding of its threshold may flip between the two; logits are compared
    on the instances whose active counts agree everywhere, which must be most of them.
    """
    _engine_backend(backend)
    engine, x = make_engine("cifar", n=16)
    engine.to("cuda", dtype)
    xc = x.cuda().to(dtype)
    ref_logits, ref_stats = engine(xc, return_stats=True)
    engine.set_backend(backend)
    logits, stats = engine(xc, return_stats=True)
    same = (stats["active"] == ref_stats["active"]).all(1)
    assert same.float().mean() >= 0.75
    assert rel_err(logits[same].float().cpu(), ref_logits[same].float().cpu()) < 5 * TOL[dtype]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_replay(backend, dtype):
    _engine_backend(backend)
    from manidp.deploy.cuda_graph import capture
    engine, _ = make_engine("cifar", n=8)
    engine.to("cuda", dtype)
    engine.set_backend(backend)
    fwd = capture(engine, batch_size=8)
    prev = None
    for seed in range(3):
        x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(100 + seed)).cuda().to(dtype)
        got = fwd(x, clone=True)
        want = engine(x)
        assert rel_err(got.float(), want.float()) < 1e-6
        if prev is not None:
            assert not torch.equal(got, prev)
        prev = got


SANITIZER_TIMEOUT_S = 540  # under the 600 s one device command may run
SANITIZER_UNSUPPORTED = ("not supported", "Device not supported", "unsupported device")


@pytest.mark.skipif(os.environ.get("MANIDP_SANITIZER", "0") in ("", "0"),
                    reason="opt-in: MANIDP_SANITIZER=1 (minutes under compute-sanitizer)")
def test_compute_sanitizer_memcheck(tmp_path):
    _engine_backend("triton")
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        pytest.skip("compute-sanitizer not on PATH")
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {ROOT!r})
        sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
        from conftest import calibrated
        from manidp.deploy import DynamicResNet
        from manidp.deploy.cuda_backend import cuda_ops_available
        model, x = calibrated("dyresnet20", (13, 13), 0.5, n=3)
        engine = DynamicResNet.from_model(model, backend="reference").to("cuda")
        backends = ["triton"] + (["cuda"] if cuda_ops_available() else [])
        for dtype in (torch.float32, torch.float16):
            engine.to(dtype=dtype)
            for b in backends:
                engine.set_backend(b)
                engine(x.cuda().to(dtype))
        torch.cuda.synchronize()
        print("OK", backends)
    """))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    try:
        proc = subprocess.run([exe, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, str(script)],
                              capture_output=True, text=True, timeout=SANITIZER_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        pytest.skip(f"compute-sanitizer ran past {SANITIZER_TIMEOUT_S} s")
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 and any(s in log for s in SANITIZER_UNSUPPORTED) and "ERROR SUMMARY" not in log:
        pytest.skip(f"compute-sanitizer does not support this device: {log.strip().splitlines()[-1][:200]}")
    assert proc.returncode == 0, log[-4000:]
    assert "ERROR SUMMARY: 0 errors" in log and "OK" in log, log[-4000:]
