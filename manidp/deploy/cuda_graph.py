"""CUDA-graph capture of a fixed-shape forward pass (docs/DESIGN.md 3.3).

The ``triton`` and ``cuda`` backends never read data-dependent counts back to the
host, so ``engine(x)`` for a fixed input shape is a fixed sequence of kernel
launches and can be recorded once and replayed::

    fwd = capture(engine, batch_size=64)           # warm-up (autotuning) + capture
    logits = fwd(x)                                # copies x in, replays, returns the static output

The returned logits tensor is the graph's static output buffer: it is
overwritten by the next replay (``fwd(x, clone=True)`` returns a copy).

:class:`CapturedCall` is the one capture routine: it records any callable on a
static input buffer, an engine (:class:`CapturedForward`) as well as a plain
``nn.Module`` (the dense and static networks ``manidp-bench`` times).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

__all__ = ["CapturedCall", "CapturedForward", "capture"]


class CapturedCall:
    """A CUDA graph of ``fn(static_input)`` with its static input and output buffers.

    ``static_input`` is used as the graph's input buffer as it is (shape, dtype,
    memory format); calling the capture copies new inputs into it.
    """

    def __init__(self, fn: Callable, static_input: torch.Tensor, warmup: int = 3, pool=None):
        device = static_input.device
        self.static_input = static_input
        # Warm up on a side stream (as torch.cuda.graphs does): compiles and autotunes every kernel
        # and fills the allocator, so that nothing inside the capture synchronises.
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                fn(static_input)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph, pool=pool):
            self.static_output = fn(static_input)

    def replay(self) -> torch.Tensor:
        """Replay on whatever ``static_input`` holds; returns the static output."""
        self.graph.replay()
        return self.static_output

    def __call__(self, x: torch.Tensor, clone: bool = False) -> torch.Tensor:
        if tuple(x.shape) != tuple(self.static_input.shape):
            raise ValueError(f"this graph was captured for inputs of shape {tuple(self.static_input.shape)}; "
                             f"got {tuple(x.shape)}")
        self.static_input.copy_(x)
        self.graph.replay()
        return self.static_output.clone() if clone else self.static_output


def check_capturable(engine) -> None:
    """ValueError unless ``engine`` is on a CUDA device with a backend that never syncs with the host."""
    if engine.device.type != "cuda":
        raise ValueError(f"CUDA-graph capture needs an engine on a CUDA device; this one is on {engine.device}")
    if engine.backend.name not in ("triton", "cuda"):
        raise ValueError(f"backend {engine.backend.name!r} synchronises with the host (data-dependent shapes); "
                         "capture needs the 'triton' or 'cuda' backend")


class CapturedForward(CapturedCall):
    """A CUDA graph of ``engine(static_input)`` for ``batch_size`` inputs of ``input_size``."""

    def __init__(self, engine, batch_size: int, input_size: Optional[Tuple[int, int]] = None, warmup: int = 3,
                 pool=None):
        check_capturable(engine)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        h, w = input_size if input_size is not None else engine.input_size
        self.engine = engine
        self.batch_size = int(batch_size)
        # Channels-last, as the dense baseline's static input: the copy into it converts the layout
        # and the stem reads it without another copy (the GPU backends' prepare_stem_input).
        static_input = torch.randn(batch_size, engine.config["in_channels"], h, w, device=engine.device,
                                   dtype=engine.compute_dtype).contiguous(memory_format=torch.channels_last)
        super().__init__(engine, static_input, warmup=warmup, pool=pool)


def capture(engine, batch_size: int, dtype: Optional[torch.dtype] = None,
            input_size: Optional[Tuple[int, int]] = None, warmup: int = 3, pool=None) -> CapturedForward:
    """Record ``engine``'s forward pass for ``batch_size`` inputs in a CUDA graph.

    ``dtype`` (optional) first switches the engine's compute dtype (``engine.to(dtype=...)``);
    ``input_size`` defaults to ``engine.input_size``.  The engine must be on a CUDA device
    with the ``triton`` or ``cuda`` backend.  Returns a :class:`CapturedForward`.
    """
    if dtype is not None and dtype != engine.compute_dtype:
        engine.to(dtype=dtype)
    return CapturedForward(engine, batch_size, input_size=input_size, warmup=warmup, pool=pool)
