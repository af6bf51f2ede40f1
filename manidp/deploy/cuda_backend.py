"""The ``cuda`` backend: gated blocks through the CUDA kernels of ``manidp::gpu_gate`` / ``manidp::gated_conv``.

The kernels live in ``csrc/cuda/*.cu`` and are compiled into ``manidp._C`` by
``setup.py`` where nvcc and a CUDA build of torch are present; they are registered
under the CUDA dispatch key of the schemas ``manidp._C`` always defines
(docs/DESIGN.md 7.2, 7.5).  The backend is available when CUDA is and the ops have
CUDA kernels.  For a machine where the package was installed without them,
:func:`build_cuda_ops` JIT-compiles the CUDA sources alone, with the flags of
``setup.py`` (:mod:`manidp.kernels.build_config`), into a module that adds those kernels.

Same block driver and op contract as the ``triton`` backend
(:mod:`manidp.deploy.gpu_common`); fp32 runs on a SIMT fp32-FMA kernel, fp16 and
bf16 on a WMMA tensor-core kernel (fp32 accumulation).  Nothing is read back to
the host, so forward passes can be captured in CUDA graphs.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..kernels import build_config
from .backends import Backend, BlockResult, register_backend
from .gpu_common import GPUBlockRunner, channels_last, prepare_gpu_weights

__all__ = ["CudaBackend", "cuda_ops_available", "build_cuda_ops"]

_GPU_OPS = ("manidp::gpu_gate", "manidp::gated_conv")


def _has_cuda_kernels() -> bool:
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA") for op in _GPU_OPS)


def cuda_ops_available() -> bool:
    """True if ``manidp::gpu_gate`` and ``manidp::gated_conv`` have CUDA kernels.

    With ``MANIDP_CUDA_JIT=1`` and no CUDA kernels in ``manidp._C``, :func:`build_cuda_ops` builds them first.
    """
    if not _has_cuda_kernels() and os.environ.get("MANIDP_CUDA_JIT") == "1":
        build_cuda_ops()
    return _has_cuda_kernels()


def build_cuda_ops(build_directory: Optional[str] = None, verbose: bool = False):
    """JIT-compile ``csrc/cuda/*.cu`` (only) into a module that adds the CUDA kernels of the GPU ops.

    For a source checkout whose ``manidp._C`` (which defines the schemas) was built without
    its CUDA part.  Needs nvcc and ninja; ``TORCH_CUDA_ARCH_LIST`` defaults to
    :data:`manidp.kernels.build_config.DEFAULT_CUDA_ARCH`.
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
    build_config.default_cuda_arch(os.environ)
    return load(name="manidp_cuda_ops", sources=[stub] + sources, build_directory=build_directory, with_cuda=True,
                extra_include_paths=[os.path.join(root, "csrc")], extra_cflags=build_config.cxx_flags(),
                extra_cuda_cflags=build_config.nvcc_flags(), verbose=verbose)


class CudaBackend(Backend):
    name = "cuda"
    devices = ("cuda",)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def __init__(self):
        self._runner = GPUBlockRunner(torch.ops.manidp.gpu_gate, torch.ops.manidp.gated_conv)

    def unavailable_reason(self, device, dtype):
        reason = super().unavailable_reason(device, dtype)
        if reason is not None:
            return reason
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if not cuda_ops_available():
            return ("manidp._C has no CUDA kernels (build with nvcc and a CUDA torch: "
                    "pip install --no-build-isolation -e . ; or set MANIDP_CUDA_JIT=1)")
        return None

    def prepare(self, engine) -> None:
        prepare_gpu_weights(engine, engine.compute_dtype)

    def prepare_stem_input(self, x: torch.Tensor) -> torch.Tensor:
        return channels_last(x)  # the dense stem on channels-last data, as the dense baseline runs it

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return channels_last(x)

    def block(self, blk, x: torch.Tensor) -> BlockResult:
        return self._runner.block(blk, x)


register_backend("cuda", CudaBackend)
