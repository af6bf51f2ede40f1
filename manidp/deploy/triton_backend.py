"""The ``triton`` backend: gated blocks through the Triton kernels of ``kernels/`` (``manidp.kernels``).

Runs on CUDA tensors in fp32 (tf32 when ``torch.get_float32_matmul_precision()``
is not ``"highest"``), fp16 and bf16 (fp32 accumulation).  On CPU tensors it
runs only under ``TRITON_INTERPRET=1`` (Triton's interpreter: for tests).

Per block: gate1 (kernel) -> conv1 with the compact epilogue -> gate2 (from the
conv1 epilogue's channel sums) -> [1x1 shortcut conv] -> conv2 with the
residual epilogue, whose channel sums feed the next block's gate1.  Nothing is
read back to the host, so a forward pass can be captured in a CUDA graph
(:func:`manidp.deploy.cuda_graph.capture`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import torch

from .backends import Backend, BlockResult, register_backend
from .gpu_common import GPUBlockRunner, prepare_gpu_weights

__all__ = ["TritonBackend", "load_kernels"]


def load_kernels():
    """``manidp.kernels.ops``; from the source tree (``kernels/`` beside ``manidp/``) when not installed."""
    try:
        return importlib.import_module("manidp.kernels.ops")
    except ModuleNotFoundError as e:
        if e.name not in ("manidp.kernels", "manidp.kernels.ops"):
            raise
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    init = os.path.join(root, "kernels", "__init__.py")
    if not os.path.isfile(init):
        raise ImportError("manidp.kernels is not installed and no kernels/ directory is beside manidp/")
    spec = importlib.util.spec_from_file_location("manidp.kernels", init,
                                                  submodule_search_locations=[os.path.dirname(init)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["manidp.kernels"] = mod
    spec.loader.exec_module(mod)
    return importlib.import_module("manidp.kernels.ops")


import triton  # noqa: E402,F401  (ImportError here makes the registry skip this backend)


def _interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


class TritonBackend(Backend):
    name = "triton"
    devices = ("cuda", "cpu")
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def __init__(self):
        self._ops = None
        self._runner = None

    def unavailable_reason(self, device, dtype):
        reason = super().unavailable_reason(device, dtype)
        if reason is not None:
            return reason
        if device.type == "cpu" and not _interpreter():
            return "backend 'triton' runs on CPU tensors only under TRITON_INTERPRET=1 (the interpreter)"
        if device.type == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available"
        try:
            self._load()
        except Exception as e:  # pragma: no cover - broken install
            return f"Triton kernels failed to load ({type(e).__name__}: {e})"
        return None

    def _load(self):
        if self._ops is None:
            self._ops = load_kernels()
            self._runner = GPUBlockRunner(
                self._ops.triton_gate, self._ops.triton_gated_conv, self._ops.sms,
                tf32_fn=lambda dt: dt == torch.float32 and torch.get_float32_matmul_precision() != "highest")
        return self._ops

    def prepare(self, engine) -> None:
        self._load()
        prepare_gpu_weights(engine, engine.compute_dtype)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)

    def block(self, blk, x: torch.Tensor) -> BlockResult:
        self._load()
        return self._runner.block(blk, x)


register_backend("triton", TritonBackend)
