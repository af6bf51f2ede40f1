"""The ``triton`` backend: gated blocks through the Triton kernels of ``kernels/`` (``manidp.kernels``).

Runs on CUDA tensors in fp32 (tf32 when ``torch.get_float32_matmul_precision()``
is not ``"highest"``), fp16 and bf16 (fp32 accumulation).  On CPU tensors it
runs only in a process started with ``TRITON_INTERPRET=1`` (Triton's interpreter:
for tests; docs/DESIGN.md 7.3).

Per block: gate1 (kernel) -> conv1 with the compact epilogue -> gate2 (from the
conv1 epilogue's channel sums) -> [1x1 shortcut conv] -> conv2 with the
residual epilogue, whose channel sums feed the next block's gate1.  Nothing is
read back to the host, so a forward pass can be captured in a CUDA graph
(:func:`manidp.deploy.cuda_graph.capture`).
"""

from __future__ import annotations

import torch

from ..kernels._launch import INTERPRET  # ImportError without triton: the registry skips this backend
from .backends import Backend, BlockResult, register_backend
from .gpu_common import GPUBlockRunner, channels_last, prepare_gpu_weights

__all__ = ["TritonBackend"]


class TritonBackend(Backend):
    name = "triton"
    devices = ("cuda", "cpu")
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def __init__(self):
        self._runner = None

    def unavailable_reason(self, device, dtype):
        reason = super().unavailable_reason(device, dtype)
        if reason is not None:
            return reason
        if device.type == "cpu" and not INTERPRET:
            return "backend 'triton' runs on CPU tensors only in a process started with TRITON_INTERPRET=1"
        if device.type == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available"
        try:
            self._load()
        except Exception as e:  # pragma: no cover - broken install
            return f"Triton kernels failed to load ({type(e).__name__}: {e})"
        return None

    def _load(self) -> GPUBlockRunner:
        """The block runner over the Triton ops (registered when ``manidp.kernels.ops`` is first imported)."""
        if self._runner is None:
            from ..kernels import ops  # noqa: F401  (registers the Triton ops)
            self._runner = GPUBlockRunner(torch.ops.manidp.triton_gpu_gate, torch.ops.manidp.triton_gated_conv)
        return self._runner

    def prepare(self, engine) -> None:
        self._load()
        prepare_gpu_weights(engine, engine.compute_dtype)

    def prepare_stem_input(self, x: torch.Tensor) -> torch.Tensor:
        return channels_last(x)  # the dense stem on channels-last data, as the dense baseline runs it

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return channels_last(x)

    def block(self, blk, x: torch.Tensor) -> BlockResult:
        return self._load().block(blk, x)


register_backend("triton", TritonBackend)
