"""The ``triton`` backend on CPU tensors through Triton's interpreter, and its argument guards.

Triton picks the interpreter once per process, when it is imported (docs/DESIGN.md 7.3), so the
interpreter tests run in a process of their own: in the main test process,
:func:`test_interpreter_process` starts ``pytest`` on this module and on ``tests/test_gpu.py`` (the
op contracts) with ``TRITON_INTERPRET=1``, and the interpreter tests run there.  The guard and
layout tests run in the main process; the ahead-of-time compile checks are in
``tests/test_gpu_compile.py``.  Shapes are tiny: the interpreter runs every program of a grid one
after the other in numpy.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, calibrated, subprocess_env

triton = pytest.importorskip("triton")

from manidp.deploy import DynamicResNet, available_backends  # noqa: E402
from manidp.deploy.reference import ReferenceBackend  # noqa: E402
from manidp.deploy.triton_backend import TritonBackend  # noqa: E402
from manidp.kernels._launch import INTERPRET  # noqa: E402

interpreted = pytest.mark.skipif(not INTERPRET, reason="runs in the interpreter process (test_interpreter_process)")
compiled = pytest.mark.skipif(INTERPRET, reason="runs in a process where Triton compiles")


@compiled
def test_interpreter_process():
    """This module's interpreter tests and test_gpu.py's op contracts, in a process started with TRITON_INTERPRET=1."""
    tests = [os.path.abspath(__file__), os.path.join(ROOT, "tests", "test_gpu.py")]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                       env=subprocess_env(TRITON_INTERPRET=1), capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-3000:]
    assert " passed" in r.stdout, r.stdout[-2000:]


@compiled
def test_cpu_tensors_need_the_interpreter_process():
    reason = TritonBackend().unavailable_reason(torch.device("cpu"), torch.float32)
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    assert "triton" not in available_backends(torch.device("cpu"), torch.float32)


# ----------------------------------------------------------------------------- backend / engine (interpreter)
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output"
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


def make_engine(keep=0.5, size=12, n=4, seed=0):
    """A reference-backend engine of a calibrated random dyresnet20, and ``n`` inputs of ``size``."""
    model, x = calibrated("dyresnet20", (size, size), keep, n=n, seed=seed)
    return DynamicResNet.from_model(model, backend="reference"), x


def block_inputs(engine, x, blocks=None):
    """``(block, input)`` of the reference forward, for the blocks whose index is in ``blocks`` (all: None)."""
    h = engine._stem(x)
    ref = ReferenceBackend()
    for i, blk in enumerate(engine.blocks):
        if blocks is None or i in blocks:
            yield blk, h
        h = ref.block(blk, h).out


# The first block of each stage (the later two with a strided shortcut) and one identity block.
STAGE_BLOCKS = (0, 1, 3, 6)


def check_block(blk, h, backend, dtype=torch.float32, tol=1e-5):
    """One block on the triton backend against the reference backend: counts equal, outputs within ``tol``."""
    ref = ReferenceBackend().block(blk, h.to(dtype).float())
    got = backend.block(blk, backend.prepare_input(h.to(dtype)))
    assert got.out.shape == ref.out.shape
    assert torch.equal(got.cnt1, ref.cnt1) and torch.equal(got.cnt2, ref.cnt2)
    assert rel_err(got.out.float(), ref.out) < tol
    return got


@interpreted
def test_backend_registered_on_cpu_under_interpreter():
    assert "triton" in available_backends(torch.device("cpu"), torch.float32)


@interpreted
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
    for blk, h in block_inputs(engine, x, STAGE_BLOCKS):
        got = check_block(blk, h, backend)
        c = blk.planes
        if case == "a1_empty":
            assert (got.cnt1 == 0).all()
        if case == "a2_empty":
            assert (got.cnt2 == 0).all()
        if case == "all_active":
            assert (got.cnt1 == c).all() and (got.cnt2 == c).all()


@interpreted
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


@interpreted
def test_engine_forward_matches_reference():
    engine, x = make_engine(size=11, n=3)
    logits_ref, stats_ref = engine(x, return_stats=True)
    engine.set_backend("triton")
    logits, stats = engine(x, return_stats=True)
    assert rel_err(logits, logits_ref) < 1e-5
    assert torch.equal(stats["active"], stats_ref["active"])
    assert torch.equal(stats["macs"], stats_ref["macs"])


@interpreted
def test_engine_forward_with_debug_checks(monkeypatch):
    """MANIDP_DEBUG_CHECKS=1 checks every gate's index output on the host; the outputs do not change."""
    engine, x = make_engine(size=8, n=2)
    engine.set_backend("triton")
    want = engine(x)
    monkeypatch.setenv("MANIDP_DEBUG_CHECKS", "1")
    assert torch.equal(engine(x), want)


@interpreted
def test_blocks_split_k(monkeypatch):
    """Blocks whose convs split their reductions over programs (as small batches do on a GPU) match the reference."""
    from manidp.kernels import ops
    monkeypatch.setattr(ops, "num_sms", lambda device: 1000)
    engine, x = make_engine(size=9, n=2)
    backend = TritonBackend()
    backend.prepare(engine)
    for blk, h in block_inputs(engine, x, STAGE_BLOCKS):
        check_block(blk, h, backend)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_blocks_half_precision(dtype):
    engine, x = make_engine(size=8, n=2, keep=0.6)
    engine.compute_dtype = dtype
    backend = TritonBackend()
    backend.prepare(engine)
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    for blk, h in block_inputs(engine, x, (0, 3)):
        check_block(blk, h, backend, dtype=dtype, tol=tol)


# ----------------------------------------------------------------------------- guards and layouts (main process)
@compiled
def test_conv_rejects_offsets_past_int32():
    """The kernel indexes within an instance in int32: larger instances are refused before any launch."""
    from manidp.kernels.build_config import MODE_PLAIN
    from manidp.kernels.ops import gated_conv_impl
    meta = dict(device="meta", dtype=torch.float16)
    x = torch.empty(1, 8192, 8192, 64, **meta)  # 2^32 elements in one instance
    w, b = torch.empty(64, 1, 64, **meta), torch.empty(64, device="meta")
    with pytest.raises(ValueError, match="2\\^31"):
        gated_conv_impl(x, w, b, None, None, None, None, None, None, 1, 1, MODE_PLAIN, 64, False, False)
    with pytest.raises(ValueError, match="grid z"):
        gated_conv_impl(torch.empty(70000, 2, 2, 64, **meta), w, b, None, None, None, None, None, None, 1, 1,
                        MODE_PLAIN, 64, False, False)


@compiled
def test_conv_argument_errors_name_what_was_expected():
    """conv2 takes (k*k, Cin, Cout) weights and reads its active channels from the gate, not from out_idx."""
    from manidp.kernels.build_config import MODE_CONV1, MODE_CONV2
    from manidp.kernels.ops import gated_conv_impl
    meta = dict(device="meta", dtype=torch.float16)
    n, c = 2, 32
    a, res = torch.empty(n, 4, 4, c, **meta), torch.empty(n, 4, 4, c, **meta)
    b, g = torch.empty(c, device="meta"), torch.empty(n, c, device="meta")
    idx, cnt = torch.empty(n, c, device="meta", dtype=torch.int32), torch.empty(n, device="meta", dtype=torch.int32)
    with pytest.raises(ValueError, match="\\(k\\*k, Cin, Cout\\) in the conv2 mode"):
        gated_conv_impl(a, torch.empty(c, 9, c + 1, **meta), b, idx, cnt, None, None, g, res, 1, 3, MODE_CONV2, 64,
                        True, False)
    with pytest.raises(ValueError, match="belong to the conv1 mode"):
        gated_conv_impl(a, torch.empty(9, c, c, **meta), b, idx, cnt, idx, cnt, g, res, 1, 3, MODE_CONV2, 64, True,
                        False)
    with pytest.raises(ValueError, match="conv1 mode needs out_idx"):
        gated_conv_impl(a, torch.empty(c, 9, c, **meta), b, None, None, None, None, g, None, 1, 3, MODE_CONV1, 64,
                        True, False)


@compiled
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_backends_run_the_stem_channels_last(backend):
    """The stem reads channels-last input, as the dense baseline does."""
    from manidp.deploy.cuda_backend import CudaBackend
    b = TritonBackend() if backend == "triton" else CudaBackend()
    x = torch.randn(2, 3, 8, 8)
    assert b.prepare_stem_input(x).is_contiguous(memory_format=torch.channels_last)
