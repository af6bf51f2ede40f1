"""GPU tests of the ``triton`` and ``cuda`` backends (skipped without CUDA).

Run on a GPU machine after building the extension::

    pip install --no-build-isolation -e .          # or MANIDP_CUDA_JIT=1 for a JIT build of csrc/cuda
    python -m pytest -q -m gpu tests/test_gpu.py

Tolerances (METHOD.md): ||out - ref|| / ||ref|| against float64 references computed
with the *same* active sets, < 1e-5 for fp32 (no tf32), < 5e-3 for fp16 and < 3e-2
for bf16 (a block's output is rounded twice: conv1's compact output and the final
store).  Outputs are allocated from a NaN-poisoned allocator cache so unwritten
elements show.
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

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from manidp.calibrate import calibrate_bn, calibrate_keep_ratio  # noqa: E402
from manidp.deploy import DynamicResNet  # noqa: E402
from manidp.deploy.gpu_common import MODE_CONV1, MODE_CONV2, MODE_PLAIN  # noqa: E402
from manidp.models import CifarResNet, ImageNetResNet  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.set_float32_matmul_precision("highest")


def _cuda_ops():
    from manidp.deploy.cuda_backend import cuda_ops_available
    return cuda_ops_available()


def _ops(kind):
    """(gate, gated_conv) callables of a backend; ``cuda-simt``/``cuda-wmma`` force a conv kernel."""
    if kind == "triton":
        from manidp.deploy.triton_backend import load_kernels
        k = load_kernels()
        return k.triton_gate, k.triton_gated_conv
    if not _cuda_ops():
        pytest.skip("manidp._C has no CUDA ops")
    impl = {"cuda": 0, "cuda-simt": 1, "cuda-wmma": 2}[kind]
    return (torch.ops.manidp.cuda_gate,
            lambda *a: torch.ops.manidp.cuda_gated_conv(*a, impl))


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output (unwritten element?)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poison():
    """Fill the allocator's cached blocks with NaN so that later torch.empty outputs start as NaN."""
    bufs = [torch.full((1 << 17,), float("nan"), device="cuda") for _ in range(64)]  # small pool
    bufs.append(torch.full((1 << 25,), float("nan"), device="cuda"))  # large pool
    del bufs
    torch.cuda.synchronize()


def perm_from_active(active):
    n, c = active.shape
    ar = torch.arange(c, device=active.device).expand(n, c)
    key = torch.where(active, ar, ar + c)
    return key.argsort(dim=1).to(torch.int32), active.sum(1).to(torch.int32)


def varied_active(n, c, gen):
    counts = [0, c] + [int(v) for v in torch.randperm(c - 1, generator=gen)[: max(n - 2, 0)] + 1]
    act = torch.zeros(n, c, dtype=torch.bool)
    for i in range(n):
        act[i, torch.randperm(c, generator=gen)[:counts[i % len(counts)]]] = True
    return act.cuda()


def wl(w):
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1, w.shape[1]).contiguous()


KINDS = ["triton", "cuda-simt", "cuda-wmma"]


def _skip_bad(kind, dtype):
    if kind == "cuda-wmma" and dtype == torch.float32:
        pytest.skip("WMMA kernel is fp16/bf16 only")


# ----------------------------------------------------------------------------- gate
@pytest.mark.parametrize("kind", ["triton", "cuda"])
@pytest.mark.parametrize("n,c,cin,hid", [(1, 64, 64, 64), (37, 512, 256, 256), (5, 100, 30, 50)])
def test_gate(kind, n, c, cin, hid):
    gate, _ = _ops(kind)
    gen = torch.Generator().manual_seed(n + c)
    t = 3
    part = torch.randn(n, t, cin, generator=gen).cuda()
    fc1 = (torch.randn(hid, cin, generator=gen) / cin ** 0.5).cuda()
    fc2 = (torch.randn(c, hid, generator=gen) / hid ** 0.5).cuda()
    bias = torch.randn(c, generator=gen).cuda() * 0.3
    pooled = part.double().sum(1) / 49
    g_ref = torch.clamp(F.relu(F.relu(pooled @ fc1.double().t()) @ fc2.double().t() + bias.double()), max=2.0)
    v = g_ref[g_ref > 0].sort().values
    thr = ((v[len(v) // 2 - 1] + v[len(v) // 2]) / 2).float()
    poison()
    g, idx, cnt = gate(part, 49, fc1, fc2, bias, thr, 2.0)
    torch.cuda.synchronize()
    assert rel_err(g, g_ref) < 1e-5
    act = (g_ref >= thr.double()) & (g_ref > 0)
    assert torch.equal(cnt.long(), act.sum(1))
    for i in range(n):
        k = int(cnt[i])
        assert torch.equal(idx[i, :k].long(), act[i].nonzero().flatten())
        assert torch.equal(idx[i].sort().values.long(), torch.arange(c, device="cuda"))


# ----------------------------------------------------------------------------- conv modes
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride,h,w,cin,c,bm", [(1, 14, 14, 64, 64, 64), (2, 15, 13, 32, 96, 32),
                                                  (2, 56, 56, 64, 128, 128), (1, 7, 7, 256, 256, 64)])
def test_conv1_mode(kind, dtype, stride, h, w, cin, c, bm):
    _skip_bad(kind, dtype)
    _, conv = _ops(kind)
    gen = torch.Generator().manual_seed(h * c + stride)
    n = 6
    x = torch.randn(n, cin, h, w, generator=gen).cuda().to(dtype)
    wt = (torch.randn(c, cin, 3, 3, generator=gen) / (3 * cin ** 0.5)).cuda().to(dtype)
    b = torch.randn(c, generator=gen).cuda()
    g = torch.rand(n, c, generator=gen).cuda() + 0.1
    idx, cnt = perm_from_active(varied_active(n, c, gen))
    poison()
    a, part = conv(x.permute(0, 2, 3, 1).contiguous(), wl(wt), b, None, None, idx, cnt, g, None, stride, 3,
                   MODE_CONV1, bm, True, False)
    torch.cuda.synchronize()
    full = F.relu(F.conv2d(x.double(), wt.double(), b.double(), stride=stride, padding=1) * g.double()[:, :, None, None])
    full = full.permute(0, 2, 3, 1)
    for i in range(n):
        k = int(cnt[i])
        ch = idx[i, :k].long()
        if k:
            assert rel_err(a[i, :, :, :k], full[i][..., ch]) < TOL[dtype]
        sums = torch.zeros(c, dtype=torch.float64, device="cuda")
        sums[ch] = full[i][..., ch].sum((0, 1))
        assert rel_err(part[i].sum(0), sums) < max(TOL[dtype], 1e-5) if k else torch.all(part[i] == 0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("identity,h,w,c,bm", [(True, 14, 14, 64, 64), (False, 9, 11, 96, 32), (True, 7, 7, 512, 64)])
def test_conv2_mode(kind, dtype, identity, h, w, c, bm):
    _skip_bad(kind, dtype)
    _, conv = _ops(kind)
    gen = torch.Generator().manual_seed(h + c + identity)
    n = 6
    act1, act2 = varied_active(n, c, gen), varied_active(n, c, gen).flip(0)
    idx1, cnt1 = perm_from_active(act1)
    idx2, cnt2 = perm_from_active(act2)
    a = torch.randn(n, h, w, c, generator=gen).relu().cuda().to(dtype)
    a_full = torch.zeros(n, c, h, w, dtype=torch.float64, device="cuda")
    for i in range(n):
        k = int(cnt1[i])
        a_full[i, idx1[i, :k].long()] = a[i, :, :, :k].permute(2, 0, 1).double()
        a[i, :, :, k:] = float("nan")  # positions past the count must never be read
    wt = (torch.randn(c, c, 3, 3, generator=gen) / (3 * c ** 0.5)).cuda().to(dtype)
    b = torch.randn(c, generator=gen).cuda()
    g2 = torch.rand(n, c, generator=gen).cuda() + 0.1
    res = torch.randn(n, h, w, c, generator=gen).cuda().to(dtype)
    poison()
    out, part = conv(a, wl(wt), b, idx1, cnt1, idx2, cnt2, g2, res, 1, 3, MODE_CONV2, bm, True, False)
    torch.cuda.synchronize()
    conv_ref = (F.conv2d(a_full, wt.double(), b.double(), padding=1) * g2.double()[:, :, None, None]).permute(0, 2, 3, 1)
    ref = torch.where(act2[:, None, None, :], res.double() + conv_ref, res.double()).relu()
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(part.sum(1), out.double().sum((1, 2))) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_shortcut_mode(kind, dtype):
    _skip_bad(kind, dtype)
    _, conv = _ops(kind)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 64, 15, 15, generator=gen).cuda().to(dtype)
    wt = (torch.randn(128, 64, 1, 1, generator=gen) / 8).cuda().to(dtype)
    b = torch.randn(128, generator=gen).cuda()
    poison()
    out, _ = conv(x.permute(0, 2, 3, 1).contiguous(), wl(wt), b, None, None, None, None, None, None, 2, 1,
                  MODE_PLAIN, 32, False, False)
    ref = F.conv2d(x.double(), wt.double(), b.double(), stride=2).permute(0, 2, 3, 1)
    assert rel_err(out, ref) < TOL[dtype]


# ----------------------------------------------------------------------------- engines
def make_engine(kind="cifar", n=8, keep=0.5, seed=0):
    torch.manual_seed(seed)
    if kind == "cifar":
        model, size = CifarResNet(20, num_classes=10), 32
    else:
        model, size = ImageNetResNet(18, num_classes=100), 96
    model.eval()
    x = torch.randn(n, 3, size, size)
    calibrate_bn(model, x)
    calibrate_keep_ratio(model, x, keep)
    return DynamicResNet.from_model(model, backend="reference"), x


def _backends():
    out = ["triton"]
    if _cuda_ops():
        out.append("cuda")
    return out


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("arch", ["cifar", "imagenet"])
def test_engine_fp32_matches_reference(backend, arch):
    if backend == "cuda" and not _cuda_ops():
        pytest.skip("manidp._C has no CUDA ops")
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
    if backend == "cuda" and not _cuda_ops():
        pytest.skip("manidp._C has no CUDA ops")
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
    if backend == "cuda" and not _cuda_ops():
        pytest.skip("manidp._C has no CUDA ops")
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


def test_compute_sanitizer_memcheck(tmp_path):
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        pytest.skip("compute-sanitizer not on PATH")
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {ROOT!r})
        from manidp.calibrate import calibrate_bn, calibrate_keep_ratio
        from manidp.deploy import DynamicResNet
        from manidp.deploy.cuda_backend import cuda_ops_available
        from manidp.models import CifarResNet
        torch.manual_seed(0)
        model = CifarResNet(8, num_classes=10).eval()
        x = torch.randn(3, 3, 13, 13)
        calibrate_bn(model, x); calibrate_keep_ratio(model, x, 0.5)
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
    proc = subprocess.run([exe, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, str(script)],
                          capture_output=True, text=True, timeout=900, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "ERROR SUMMARY: 0 errors" in log and "OK" in log, log[-4000:]
