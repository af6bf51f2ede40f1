"""Backend registry of the deployment engine.

A backend runs one gated basic block (docs/DESIGN.md 3.2) on a batch.  The engine runs
the dense stem and classifier itself and hands every block to its backend.

Contract of :meth:`Backend.block` (docs/DESIGN.md 7.1; every backend is tested against ``reference``):

* input ``x``: (N, Cin, H, W) on the engine's device and compute dtype;
* returns :class:`BlockResult` with ``out`` (N, planes, H', W') and the active
  counts ``cnt1``, ``cnt2`` (N,) int32 of the block's two gates.
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

__all__ = ["BlockResult", "Backend", "register_backend", "get_backend", "available_backends",
           "BACKEND_PREFERENCE", "BackendUnavailable"]


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (missing extension, wrong device, ...)."""


class BlockResult(NamedTuple):
    """What a backend returns for one block: its output and the active count of each gate per instance."""

    out: torch.Tensor
    cnt1: torch.Tensor
    cnt2: torch.Tensor


class Backend:
    """Base class: subclasses set ``name`` and implement ``block``."""

    name = "base"
    devices = ("cpu",)          # device types it runs on
    dtypes = (torch.float32,)   # compute dtypes it supports
    # Whether autograd can flow through ``block``.  The custom-op backends register no
    # backward, so the engine runs them without autograd (docs/DESIGN.md 7.1).
    differentiable = False

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """``None`` if the backend can run on ``device``/``dtype``, else why not."""
        if device.type not in self.devices:
            return f"backend {self.name!r} runs on {self.devices}, not {device.type}"
        if dtype not in self.dtypes:
            return f"backend {self.name!r} supports dtypes {self.dtypes}, not {dtype}"
        return None

    def prepare(self, engine) -> None:
        """Precompute layouts from ``engine``'s tensors (called after every move/cast)."""

    def prepare_stem_input(self, x: torch.Tensor) -> torch.Tensor:
        """The layout of the network input the (dense) stem runs on."""
        return x

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """The layout of the block input this backend wants."""
        return x.contiguous()

    def network(self, engine, x: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The whole forward in one native call, or ``None`` to let the engine run block by block.

        Returns ``(logits, active)``: logits (N, classes) and the active counts (N, 2 * blocks)
        int32 of every gate, in block order (gate 1, gate 2 of block 0, ...).  ``x`` is the
        network input (N, Cin, H, W); the backend runs the stem and the classifier itself.
        """
        return None

    def block(self, blk, x: torch.Tensor) -> BlockResult:  # pragma: no cover - interface
        raise NotImplementedError(f"backend {self.name!r} does not implement block()")


_REGISTRY: Dict[str, Callable[[], Backend]] = {}

# Order in which backend="auto" tries them, per device type (fastest first).
BACKEND_PREFERENCE = {"cuda": ["cuda", "triton", "reference"], "cpu": ["cpu", "reference"]}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Make ``factory`` (a Backend subclass or a function returning one) available as ``name``."""
    _REGISTRY[name] = factory


def _load_builtin() -> None:
    # Imported lazily: each module registers itself and may need an extension or Triton.
    from . import reference  # noqa: F401
    for mod in ("cpu_backend", "triton_backend", "cuda_backend"):
        try:
            __import__(f"{__package__}.{mod}")
        except ImportError:
            pass


def available_backends(device: torch.device, dtype: torch.dtype = torch.float32) -> List[str]:
    """Names of the backends that can run on ``device``/``dtype``."""
    _load_builtin()
    names = []
    for name in _REGISTRY:
        try:
            if get_backend(name, device, dtype) is not None:
                names.append(name)
        except BackendUnavailable:
            pass
    return names


def get_backend(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Backend:
    """An instance of backend ``name`` ("auto" picks the fastest available) for ``device``."""
    _load_builtin()
    device = torch.device(device)
    if name == "auto":
        for cand in BACKEND_PREFERENCE.get(device.type, ["reference"]):
            if cand in _REGISTRY:
                try:
                    return get_backend(cand, device, dtype)
                except BackendUnavailable:
                    continue
        raise BackendUnavailable(f"no backend runs on {device} with {dtype}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {sorted(_REGISTRY)}")
    backend = _REGISTRY[name]()
    reason = backend.unavailable_reason(device, dtype)
    if reason is not None:
        raise BackendUnavailable(reason)
    return backend
