"""The ``cuda`` backend: gated blocks through the CUDA C++ ops ``manidp::cuda_gate`` / ``manidp::cuda_gated_conv``.

The ops live in ``csrc/cuda/*.cu`` and are compiled into ``manidp._C`` by
``setup.py`` where nvcc and a CUDA build of torch are present.  The backend is
available when CUDA is and the extension has the ops.  For a machine where the
package was installed without them, :func:`build_cuda_ops` JIT-compiles the CUDA
sources alone into a separate module (same op names) and loads it.

Same block driver and op semantics as the ``triton`` backend
(:mod:`manidp.deploy.gpu_common`); fp32 runs on a SIMT fp32-FMA kernel, fp16 and
bf16 on a WMMA tensor-core kernel (fp32 accumulation).  Nothing is read back to
the host, so forward passes can be captured in CUDA graphs.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .backends import Backend, BlockResult, register_backend
from .gpu_common import GPUBlockRunner, conv_output_shapes, prepare_gpu_weights

__all__ = ["CudaBackend", "cuda_ops_available", "build_cuda_ops"]

_FAKES_REGISTERED = False


def _has_ops() -> bool:
    ns = torch.ops.manidp
    return hasattr(ns, "cuda_gate") and hasattr(ns, "cuda_gated_conv")


def _register_fakes() -> None:
    """Fake (meta) kernels so torch.compile / torch.export can trace engines that call the ops."""
    global _FAKES_REGISTERED
    if _FAKES_REGISTERED:
        return

    @torch.library.register_fake("manidp::cuda_gate")
    def _gate_fake(part, hw, fc1, fc2, fc2_bias, threshold, clamp_max):
        n, c = part.shape[0], fc2.shape[0]
        return (part.new_empty((n, c)), part.new_empty((n, c), dtype=torch.int32),
                part.new_empty((n,), dtype=torch.int32))

    @torch.library.register_fake("manidp::cuda_gated_conv")
    def _conv_fake(x, w, bias, in_idx, in_cnt, out_idx, out_cnt, gate, res, stride, ksize, mode, block_m,
                   write_part, tf32, impl=0):
        out_shape, part_shape = conv_output_shapes(x, w, stride, ksize, block_m, write_part and mode != 0)
        return x.new_empty(out_shape), x.new_empty(part_shape, dtype=torch.float32)

    _FAKES_REGISTERED = True


def cuda_ops_available() -> bool:
    """True if ``torch.ops.manidp.cuda_*`` exist (loading ``manidp._C`` if needed)."""
    if not _has_ops():
        try:
            import manidp._C  # noqa: F401
        except ImportError:
            pass
    if not _has_ops() and os.environ.get("MANIDP_CUDA_JIT") == "1":
        build_cuda_ops()
    if _has_ops():
        _register_fakes()
        return True
    return False


def build_cuda_ops(build_directory: Optional[str] = None, verbose: bool = False):
    """JIT-compile ``csrc/cuda/*.cu`` (only) into a module that registers the ``manidp::cuda_*`` ops.

    For a source checkout without the CUDA part of ``manidp._C``.  Needs nvcc and ninja;
    ``TORCH_CUDA_ARCH_LIST`` defaults to 9.0 (H100).
    """
    from torch.utils.cpp_extension import load
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cu_dir = os.path.join(root, "csrc", "cuda")
    sources = sorted(os.path.join(cu_dir, f) for f in os.listdir(cu_dir) if f.endswith(".cu"))
    build_directory = build_directory or os.path.join(root, "build", "cuda_jit")
    os.makedirs(build_directory, exist_ok=True)
    stub = os.path.join(build_directory, "module_stub.cpp")
    with open(stub, "w") as f:
        f.write("#include <torch/extension.h>\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}\n")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    mod = load(name="manidp_cuda_ops", sources=[stub] + sources, build_directory=build_directory, with_cuda=True,
               extra_include_paths=[os.path.join(root, "csrc")], extra_cflags=["-O3", "-std=c++20"],
               extra_cuda_cflags=["-O3", "-std=c++20", "--use_fast_math"], verbose=verbose)
    _register_fakes()
    return mod


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


class CudaBackend(Backend):
    name = "cuda"
    devices = ("cuda",)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def __init__(self):
        self._runner = GPUBlockRunner(self._gate, self._conv, _sms)

    @staticmethod
    def _gate(*args):
        return torch.ops.manidp.cuda_gate(*args)

    @staticmethod
    def _conv(*args):
        return torch.ops.manidp.cuda_gated_conv(*args)

    def unavailable_reason(self, device, dtype):
        reason = super().unavailable_reason(device, dtype)
        if reason is not None:
            return reason
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if not cuda_ops_available():
            return ("manidp._C has no CUDA ops (build with nvcc and a CUDA torch: "
                    "pip install --no-build-isolation -e . ; or set MANIDP_CUDA_JIT=1)")
        return None

    def prepare(self, engine) -> None:
        prepare_gpu_weights(engine, engine.compute_dtype)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)

    def block(self, blk, x: torch.Tensor) -> BlockResult:
        return self._runner.block(blk, x)


register_backend("cuda", CudaBackend)
