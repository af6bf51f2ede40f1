"""The ``cpu`` backend: the whole network in one native call, or one C++ op per block (docs/DESIGN.md 7.6, 7.7).

In mode ``auto`` with the gathered-conv kernel (AVX-512 or AVX2), the engine's forward is one
call of ``torch.classes.manidp.CpuNetwork``: stem, every block and the classifier in C++, the
threads taking whole instances at batch > 1 and sharing each conv at batch 1.  Otherwise each
gated block is one ``manidp::gated_block`` op.

The op computes the gates, then each instance's convs on its active channels
only: with AVX-512 or AVX2, an implicit-GEMM conv that reads the active weight
rows and columns where they are (no gathers) with gate scale, bias, ReLU, pooling
and the residual add fused in; elsewhere, gathered weights and the library conv
(oneDNN through ATen).  ``torch.ops.manidp.gconv_isa()`` names the kernel in use;
the environment variable ``MANIDP_GCONV_ISA`` (``avx512``, ``avx2``, ``off``)
narrows the choice.  At batch 1 the threads share each conv; at larger batch they
take instances.  See ``csrc/block_cpu.cpp`` and ``csrc/gconv_cpu.cpp``;
``mode`` selects a strategy explicitly (:data:`manidp.deploy.ops.MODES`).
"""

from __future__ import annotations

import torch

from . import ops
from .backends import Backend, BlockResult, register_backend

__all__ = ["CpuBackend", "HAVE_GCONV"]

# Whether the gathered-conv kernel runs here (read once: the choice is fixed per process), and
# with it the whole-network runner.
HAVE_GCONV = ops.HAVE_CPU_OPS and torch.ops.manidp.gconv_isa() != "none"


class CpuBackend(Backend):
    """C++ gated blocks on the CPU, fp32."""

    name = "cpu"
    devices = ("cpu",)
    dtypes = (torch.float32,)

    def __init__(self, mode: str = "auto"):
        if mode not in ops.MODES:
            raise ValueError(f"mode must be one of {sorted(ops.MODES)}; got {mode!r}")
        self.mode = mode

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype):
        if not ops.HAVE_CPU_OPS:
            return f"backend 'cpu' needs the C++ extension manidp._C ({ops.IMPORT_ERROR!r}); build it with pip install -e ."
        return super().unavailable_reason(device, dtype)

    def prepare(self, engine) -> None:
        """Cache the op's argument tuple per block, and build the whole-network runner."""
        # The ImageNet stem (7x7 conv + max-pool on a large map) is much faster on channels-last
        # data; the CIFAR stem is faster as it is (benchmarks/results/cpu_design_notes.md).
        self._stem_channels_last = bool(engine.config["stem"].get("maxpool", False))
        for blk in engine.blocks:
            f = lambda t: t.detach().to(torch.float32).contiguous()  # noqa: E731
            sc = (f(blk.shortcut.weight), f(blk.shortcut.bias)) if blk.has_shortcut else (None, None)
            gates = []
            for gate in (blk.gate1, blk.gate2):
                gates += [f(gate.fc1), f(gate.fc2), f(gate.fc2_bias), f(gate.threshold).reshape(())]
            blk.cache["cpu"] = (f(blk.conv1.weight), f(blk.conv1.bias), f(blk.conv2.weight), f(blk.conv2.bias),
                                *sc, *gates, float(blk.gate1.clamp_max), int(blk.stride))
        self._network = _whole_network(engine) if HAVE_GCONV else None

    def __getstate__(self):
        # The native runner holds raw views of the engine's tensors: a copy of the engine builds
        # its own from the copied tensors on first use.
        state = dict(self.__dict__)
        state["_network"] = None
        return state

    def network(self, engine, x: torch.Tensor):
        """The whole forward in one native call (``mode="auto"`` with the gconv kernel), else ``None``."""
        # Under torch.compile the engine runs block by block: the ops have fake kernels, the
        # native runner has none.
        if self.mode != "auto" or not HAVE_GCONV or torch.compiler.is_compiling():
            return None
        if getattr(self, "_network", None) is None:
            self._network = _whole_network(engine)
        return self._network.forward(x if x.dtype == torch.float32 else x.to(torch.float32))

    def prepare_stem_input(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "_stem_channels_last", False):
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def block(self, blk, x: torch.Tensor) -> BlockResult:
        args = blk.cache["cpu"]
        return BlockResult(*torch.ops.manidp.gated_block(x, *args, ops.MODES[self.mode]))


def _whole_network(engine):
    """``torch.classes.manidp.CpuNetwork`` over the engine's tensors (docs/DESIGN.md 7.7)."""
    s = engine.config["stem"]
    tensors, strides = [], []
    empty = torch.empty(0)
    for blk, (w1, b1, w2, b2, ws, bs, *gates, _clamp, stride) in zip(engine.blocks,
                                                                    (b.cache["cpu"] for b in engine.blocks)):
        tensors += [w1, b1, w2, b2, empty if ws is None else ws, empty if bs is None else bs, *gates]
        strides.append(stride)
    f = lambda t: t.detach().to(torch.float32).contiguous()  # noqa: E731
    return torch.classes.manidp.CpuNetwork(f(engine.stem.weight), f(engine.stem.bias),
                                           [int(s["stride"]), int(s["padding"]), int(bool(s["maxpool"]))],
                                           tensors, strides, f(engine.fc.weight), f(engine.fc.bias),
                                           float(engine.config["clamp_max"]))


register_backend("cpu", CpuBackend)
