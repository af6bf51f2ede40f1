"""How the Triton kernels of this package are compiled and launched.

Every kernel is written once as a plain Python function and turned into

* a ``triton.jit`` function wrapped in ``triton.autotune`` for CUDA tensors, and
* a ``triton.runtime.interpreter.InterpretedFunction`` (one fixed config, no
  autotuning) for CPU tensors.

The variant is chosen per call from the device of the tensors, so it does not
matter whether ``TRITON_INTERPRET`` was set when this module was imported
(``triton.jit`` reads it at decoration time, which makes a test suite that runs
in one process fragile).  Running on CPU tensors is only allowed while
``TRITON_INTERPRET=1`` is set (it is the interpreter, for tests; it is slow).
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch

import triton

__all__ = ["TritonKernel", "interpreter_enabled", "num_sms", "is_fake"]


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


_SMS: Dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Multiprocessor count of a CUDA device (132 on an H100 SXM); 1 for the interpreter (big tiles)."""
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def is_fake(t: torch.Tensor) -> bool:
    """True for fake/meta tensors (tracing): kernels are not launched on those."""
    if t.device.type == "meta":
        return True
    try:
        from torch._subclasses.fake_tensor import FakeTensor
        return isinstance(t, FakeTensor)
    except ImportError:  # pragma: no cover
        return False


@contextlib.contextmanager
def _jit_functions_interpreted():
    """Let interpreted kernels call ``triton.jit`` library functions (``tl.sum``, ``tl.cumsum``, ...).

    Those are ``JITFunction`` objects when ``TRITON_INTERPRET`` was unset at the time
    triton was imported, and a ``JITFunction`` refuses to be called outside a
    compiled kernel; while an interpreted kernel runs, such calls are routed to
    an ``InterpretedFunction`` of the same Python function (what the library
    functions would have been had the variable been set at import).
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    own = "__call__" in JITFunction.__dict__
    original = JITFunction.__dict__.get("__call__")
    cache: Dict[Callable, InterpretedFunction] = {}

    def call(self, *args, **kwargs):
        f = cache.get(self.fn)
        if f is None:
            f = cache[self.fn] = InterpretedFunction(self.fn)
        return f(*args, **kwargs)

    JITFunction.__call__ = call
    try:
        yield
    finally:
        if own:
            JITFunction.__call__ = original
        else:
            del JITFunction.__call__


class TritonKernel:
    """A kernel with a CUDA (autotuned ``triton.jit``) and an interpreter variant.

    ``configs``: ``triton.Config`` list for CUDA; ``interp_config``: the one
    config (dict of meta-parameters) used by the interpreter.
    """

    def __init__(self, fn: Callable, configs: Sequence["triton.Config"], key: List[str],
                 interp_config: Dict[str, int], prune: Optional[Callable] = None):
        self.fn = fn
        self.configs = list(configs)
        self.key = list(key)
        self.interp_config = dict(interp_config)
        self.prune = prune
        self._cuda = None
        self._interp = None

    def cuda_kernel(self):
        """The autotuned JIT kernel (what :func:`torch.library.wrap_triton` should wrap)."""
        if self._cuda is None:
            kw = {}
            if self.prune is not None:
                kw["prune_configs_by"] = {"early_config_prune": self.prune}
            self._cuda = triton.autotune(configs=self.configs, key=self.key, **kw)(triton.jit(self.fn))
        return self._cuda

    def interp_kernel(self):
        if self._interp is None:
            from triton.runtime.interpreter import InterpretedFunction
            self._interp = InterpretedFunction(self.fn)
        return self._interp

    def launch(self, device: torch.device, grid, args: Sequence, wrap=None) -> None:
        """Launch on ``grid`` (a callable of the meta-parameters or a tuple)."""
        if device.type == "cuda" and not interpreter_enabled():
            kernel = self.cuda_kernel()
            if wrap is not None:
                kernel = wrap(kernel)
            kernel[grid](*args)
            return
        if device.type != "cpu" and not interpreter_enabled():
            raise RuntimeError(f"Triton kernels run on CUDA tensors; got {device}")
        if device.type == "cpu" and not interpreter_enabled():
            raise RuntimeError("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 (the interpreter)")
        meta = dict(self.interp_config)
        g = grid(meta) if callable(grid) else grid
        with _jit_functions_interpreted():
            self.interp_kernel()[g](*args, **meta)
