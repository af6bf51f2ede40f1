"""How the Triton kernels of this package are built and launched (docs/DESIGN.md 7.3, 7.4).

Triton decides once per process whether kernels are compiled or interpreted: ``triton.jit``
returns the interpreter's function when ``TRITON_INTERPRET=1`` is set at decoration time, and
Triton's own library functions (``tl.sum``, ``tl.cumsum``, ...) are decorated when triton is
imported.  So the variable must be set before triton is imported, for the whole process: tests
that run kernels on CPU tensors run in a process of their own that sets it.  In such a process
every kernel is interpreted, with one fixed config (no autotuning); otherwise kernels are
compiled and run on CUDA tensors only.

Compiled kernels run with one heuristic config per launch shape (``fixed_config``: a function of
the kernel's arguments), unless ``MANIDP_TRITON_AUTOTUNE=1`` was set when this module was
imported: then they are autotuned over ``configs``.  The fixed mode bounds the number of
compiles (docs/DESIGN.md 7.4): a kernel compiles once per distinct :meth:`TritonKernel.compile_key`.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence

import torch

import triton

__all__ = ["TritonKernel", "INTERPRET", "AUTOTUNE", "is_fake", "batch_bucket", "recording_compile_keys",
           "recording"]


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


INTERPRET = _interpret_requested()
"""Whether this process runs Triton kernels in the interpreter (``TRITON_INTERPRET`` set when it started)."""


AUTOTUNE = os.environ.get("MANIDP_TRITON_AUTOTUNE", "0") not in ("", "0", "false", "False")
"""Whether compiled kernels are autotuned (``MANIDP_TRITON_AUTOTUNE=1``) rather than run with their fixed config."""


def batch_bucket(n: int) -> int:
    """The batch size rounded up to a power of 4, at most 256: autotuning keys on this, not on the batch."""
    b = 1
    while b < n and b < 256:
        b *= 4
    return min(b, 256)


def _check_interpreter_consistent() -> None:
    """Fail clearly when TRITON_INTERPRET was set after triton was imported (Triton's own functions compiled)."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction
    if isinstance(tl.cumsum, JITFunction):
        raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported; set it before the process "
                           "imports triton (the interpreter is chosen once per process)")


def is_fake(t: torch.Tensor) -> bool:
    """True for fake/meta tensors (tracing): kernels are not launched on those."""
    if t.device.type == "meta":
        return True
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor)


class TritonKernel:
    """One kernel: interpreted, compiled with a fixed config per launch, or compiled and autotuned.

    ``fn`` is the plain Python kernel function (ahead-of-time compilation reads it);
    ``configs`` and ``key`` are the autotuning space and key (``MANIDP_TRITON_AUTOTUNE=1``);
    ``fixed_config`` maps the kernel's arguments (a dict by name) to the one ``triton.Config``
    it runs with otherwise; ``interp_config`` is the dict of meta-parameters the interpreter
    runs with; ``do_not_specialize`` names the arguments Triton must not specialise on their
    value (shapes that vary per layer or batch: one compile serves them all).
    """

    def __init__(self, fn: Callable, configs: Sequence["triton.Config"], key: List[str],
                 interp_config: Dict[str, int], fixed_config: Callable[[Dict], "triton.Config"],
                 prune: Optional[Callable] = None, do_not_specialize: Sequence[str] = ()):
        self.fn = fn
        self.configs = list(configs)
        self.fixed_config = fixed_config
        self.do_not_specialize = tuple(do_not_specialize)
        if INTERPRET:
            _check_interpreter_consistent()
            self.kernel = triton.jit(fn)
            self.meta = dict(interp_config)
            return
        self.meta = {}
        jit = triton.jit(fn, do_not_specialize=list(self.do_not_specialize))
        if AUTOTUNE:
            tune = {"prune_configs_by": {"early_config_prune": prune}} if prune is not None else {}
            self.kernel = triton.autotune(configs=self.configs, key=list(key), **tune)(jit)
        else:
            self.kernel = jit
        self.arg_names = list(jit.arg_names)

    def named(self, args: Sequence) -> Dict:
        """The positional launch ``args`` by argument name."""
        return dict(zip(self.arg_names, args))

    def compile_key(self, args: Sequence) -> tuple:
        """What a fixed-config launch with ``args`` compiles for: dtypes, constexprs, specialisations, config.

        Mirrors Triton's specialisation: pointers by dtype (allocations are 16-byte aligned), ints by
        ``== 1`` and divisibility by 16 unless named in ``do_not_specialize``, constexprs by value.
        """
        cfg = self.fixed_config(self.named(args))
        constexprs = set(_constexpr_names(self.fn))
        key = []
        for name, v in self.named(args).items():
            if name in constexprs:
                key.append((name, v))
            elif isinstance(v, torch.Tensor):
                key.append((name, str(v.dtype)))
            elif isinstance(v, bool) or name in self.do_not_specialize:
                key.append((name, type(v).__name__))
            elif isinstance(v, int):
                key.append((name, v == 1, v % 16 == 0))
            else:
                key.append((name, type(v).__name__))
        meta = tuple(sorted(cfg.kwargs.items())) + (cfg.num_warps, cfg.num_stages)
        return tuple(key) + meta

    def launch(self, device: torch.device, grid, args: Sequence) -> None:
        """Launch on ``grid`` (a callable of the meta-parameters, as ``triton.jit`` kernels take it)."""
        if INTERPRET:
            self.kernel[grid(self.meta)](*args, **self.meta)
            return
        if _RECORDER is not None:
            _RECORDER.append((self, self.compile_key(args)))
            return
        if device.type != "cuda":
            raise RuntimeError(f"Triton kernels run on CUDA tensors (CPU tensors only in a process started with "
                               f"TRITON_INTERPRET=1); got {device}")
        wrap = getattr(torch.library, "wrap_triton", None)  # torch >= 2.6: torch.compile sees the launch
        kernel = wrap(self.kernel) if wrap is not None else self.kernel
        if AUTOTUNE:
            kernel[grid](*args)
            return
        cfg = self.fixed_config(self.named(args))
        kernel[grid(cfg.kwargs)](*args, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _constexpr_names(fn: Callable) -> List[str]:
    """Names of ``fn``'s ``tl.constexpr`` parameters."""
    import inspect
    return [p.name for p in inspect.signature(fn).parameters.values()
            if "constexpr" in str(p.annotation)]


_RECORDER: Optional[list] = None


class recording_compile_keys:
    """Within ``with recording_compile_keys() as keys:`` compiled launches are not run but recorded.

    ``keys`` receives ``(kernel, compile_key)`` per launch: the compile-budget test counts the
    distinct ones of a benchmark plan without a GPU (the ops accept meta tensors while recording).
    """

    def __enter__(self) -> list:
        global _RECORDER
        if INTERPRET:
            raise RuntimeError("compile keys are recorded in a process where Triton compiles")
        _RECORDER = []
        return _RECORDER

    def __exit__(self, *exc) -> None:
        global _RECORDER
        _RECORDER = None


def recording() -> bool:
    """True inside :class:`recording_compile_keys`."""
    return _RECORDER is not None
