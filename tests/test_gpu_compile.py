"""The GPU kernels' machine code and compile count, checked without a GPU (docs/DESIGN.md 7.4, 7.5).

* The Triton kernels compiled ahead of time for sm_90 (:mod:`manidp.kernels.aot`, in a child
  process without ``TRITON_INTERPRET``): no spills, at most 255 registers, wgmma (``HGMMA``) and
  async copies (``LDGSTS``) in the main conv configurations, round-to-nearest division in the gate.
* The CUDA kernels compiled with nvcc and ``ptxas -v``: no spills.
* The compile budget: the distinct Triton compiles the default device benchmark plan
  (``benchmarks/gpu_run.sh``) triggers in the fixed-config mode, counted by recording the launches
  of the real block driver on meta tensors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, subprocess_env

triton = pytest.importorskip("triton")

from manidp.kernels import aot  # noqa: E402
from manidp.kernels._launch import AUTOTUNE, INTERPRET  # noqa: E402

needs_compiler = pytest.mark.skipif(INTERPRET or AUTOTUNE, reason="runs where Triton compiles, in the fixed mode")

COMPILE_BUDGET = 40
"""Most distinct Triton compiles the default device benchmark plan may trigger (a compile takes seconds)."""

MAX_REGISTERS = 255


@pytest.fixture(scope="module")
def sm90_stats():
    """:func:`manidp.kernels.aot.all_stats` from a child process that compiles (TRITON_INTERPRET unset)."""
    if aot.tool("ptxas") is None or aot.tool("cuobjdump") is None:
        pytest.skip("ptxas/cuobjdump not found")
    env = subprocess_env()
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "manidp.kernels.aot"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return {s["name"]: s for s in json.loads(r.stdout)}


CASE_NAMES = [c.name for c in aot.CASES]
MAIN_CASES = [c.name for c in aot.CASES if c.main]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_triton_kernel_fits_registers_without_spills(sm90_stats, name):
    s = sm90_stats[name]
    assert 0 < s["registers"] <= MAX_REGISTERS, s
    assert s["spill_stores"] == 0 and s["spill_loads"] == 0, s
    assert s["sass"]["LDL"] == 0 and s["sass"]["STL"] == 0, s


@pytest.mark.parametrize("name", MAIN_CASES)
def test_main_conv_configs_use_wgmma_and_async_copies(sm90_stats, name):
    sass = sm90_stats[name]["sass"]
    assert sass["HGMMA"] > 0, sass
    assert sass["LDGSTS"] > 0 or sass["UTMALDG"] > 0, sass


@pytest.mark.parametrize("name", [n for n in MAIN_CASES if n.startswith("conv2")])
def test_conv2_reads_16_bytes_at_a_time(sm90_stats, name):
    """conv2's input tile and weight rows are 16-byte loads (docs/DESIGN.md 7.4): no 2-byte loads are left."""
    sass = sm90_stats[name]["sass"]
    assert sass["LDG.E.U16"] == 0, sass


def test_half_convs_use_tensor_cores(sm90_stats):
    for name, s in sm90_stats.items():
        if name.startswith(("conv", "plain")) and ("fp16" in name or "bf16" in name or "tf32" in name):
            assert s["sass"]["HGMMA"] > 0 or s["sass"]["HMMA"] > 0, (name, s["sass"])


@needs_compiler
def test_gate_divides_round_to_nearest():
    """The pooled mean divides with div.rn (Triton's default fp32 division is approximate)."""
    ptx = aot.compile_case(next(c for c in aot.CASES if c.kernel == "gate")).asm["ptx"]
    assert "div.rn.f32" in ptx
    assert "div.full.f32" not in ptx and "div.approx.f32" not in ptx


# ----------------------------------------------------------------------------- CUDA kernels
def _nvcc_usable() -> bool:
    return shutil.which("nvcc") is not None and torch.version.cuda is not None


@pytest.mark.slow
@pytest.mark.skipif(not _nvcc_usable(), reason="needs nvcc and a CUDA build of torch")
@pytest.mark.parametrize("source", [os.path.basename(s) for s in aot.cuda_sources() if "__global__" in open(s).read()])
def test_cuda_kernels_do_not_spill(source):
    stats = aot.nvcc_ptxas_stats(os.path.join(ROOT, "csrc", "cuda", source))
    for kernel, s in stats.items():
        assert s["spill_stores"] == 0 and s["spill_loads"] == 0, (kernel, s)
        assert s["registers"] <= MAX_REGISTERS, (kernel, s)


# ----------------------------------------------------------------------------- compile budget
H100_SMS = 132
SM90_MIN_ROWS = 64

# The first benchmark call of benchmarks/gpu_run.sh: correctness at batch 8 (fp32 and fp16), then
# the timing cases r34-b1, r34-b256 and r56-b256 in fp16 (graph and eager run the same launches).
DEFAULT_PLAN = [("dyresnet34", 224, 8, torch.float32), ("dyresnet34", 224, 8, torch.float16),
                ("dyresnet34", 224, 1, torch.float16), ("dyresnet34", 224, 256, torch.float16),
                ("dyresnet56", 32, 8, torch.float32), ("dyresnet56", 32, 8, torch.float16),
                ("dyresnet56", 32, 256, torch.float16)]
# ... and its per-layer table (bench_gpu.layer_bench): (cin, cout, hw, stride) at batch 1, 64 and 256.
LAYER_SHAPES = [(64, 64, 56, 1), (128, 128, 28, 1), (256, 256, 14, 1), (512, 512, 7, 1), (64, 128, 56, 2)]


def _engine(arch: str):
    from manidp.deploy import DynamicResNet
    from manidp.models import build_model
    torch.manual_seed(0)
    model = build_model(arch, num_classes=1000 if arch == "dyresnet34" else 10).eval()
    return DynamicResNet.from_model(model, backend="reference")


def _record_network(engine, runner, size: int, batch: int, dtype: torch.dtype) -> None:
    from manidp.deploy.gpu_common import prepare_gpu_weights
    prepare_gpu_weights(engine, dtype)
    _, h, w = engine._stem_macs((size, size))
    x = torch.empty(batch, engine.blocks[0].in_channels, h, w, device="meta", dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    for blk in engine.blocks:
        x = runner.block(blk, x).out


def _record_layers(batch: int, dtype: torch.dtype) -> None:
    from manidp.deploy.gpu_common import choose_block_m
    from manidp.flops import conv_out_size
    from manidp.kernels.build_config import MODE_CONV1, MODE_CONV2
    from manidp.kernels.ops import gated_conv_impl as conv
    for cin, c, hw, stride in LAYER_SHAPES:
        meta = dict(device="meta")
        ho = conv_out_size(hw, 3, stride, 1)
        bm = choose_block_m(batch, ho * ho, c, H100_SMS, SM90_MIN_ROWS)
        x = torch.empty(batch, hw, hw, cin, dtype=dtype, **meta)
        w = torch.empty(c, 9, cin, dtype=dtype, **meta)
        b = torch.empty(c, **meta)
        idx, cnt = torch.empty(batch, c, dtype=torch.int32, **meta), torch.empty(batch, dtype=torch.int32, **meta)
        g = torch.empty(batch, c, **meta)
        a, _ = conv(x, w, b, None, None, idx, cnt, g, None, stride, 3, MODE_CONV1, bm, True, False)
        if stride == 1 and cin == c:
            w2 = torch.empty(9, c, c, dtype=dtype, **meta)
            conv(a, w2, b, idx, cnt, None, None, g, x, 1, 3, MODE_CONV2, bm, True, False)


@needs_compiler
def test_default_benchmark_plan_compile_count(monkeypatch):
    from manidp.deploy.gpu_common import GPUBlockRunner
    from manidp.kernels import ops
    from manidp.kernels._launch import recording_compile_keys
    from manidp.kernels.ops import gated_conv_impl, gpu_gate_impl
    torch.set_float32_matmul_precision("highest")  # bench_gpu's correctness check: fp32 without tf32
    monkeypatch.setattr(ops, "num_sms", lambda device: H100_SMS)  # meta tensors split K as on an H100
    # The ops' bodies, not the ops: through the dispatcher, meta tensors reach the fake kernels.
    runner = GPUBlockRunner(gpu_gate_impl, gated_conv_impl, sms=H100_SMS, min_rows=SM90_MIN_ROWS)
    engines = {}
    with recording_compile_keys() as launches:
        for arch, size, batch, dtype in DEFAULT_PLAN:
            engine = engines.setdefault(arch, _engine(arch))
            _record_network(engine, runner, size, batch, dtype)
        for batch in (1, 64, 256):
            _record_layers(batch, torch.float16)
    distinct = {(id(kernel), key) for kernel, key in launches}
    assert len(launches) > 100
    print(f"{len(launches)} launches, {len(distinct)} distinct compiles")
    assert len(distinct) <= COMPILE_BUDGET, f"{len(distinct)} distinct compiles in the default plan"
