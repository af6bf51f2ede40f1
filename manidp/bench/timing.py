"""Timing: the one measurement loop on torch devices, its statistics, and CUDA-graph runners (docs/DESIGN.md 8).

Every benchmark in the project times through :func:`measure` (one method) or
:func:`measure_interleaved` (several methods called round by round, so that
background load on a shared machine hits them alike); both run the loop of
:mod:`manidp.bench.loop`, which the child process timing ONNX Runtime and
OpenVINO runs too.  Each call is timed on its own: CUDA events around it on the
GPU, ``time.perf_counter`` (or ``time.thread_time`` with ``clock="thread"``) on
the CPU.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..deploy.cuda_graph import CapturedCall, capture
from .errors import SkipMethod, warn
from .loop import Timer, measure_with, rounds, thread_timer, wall_timer

__all__ = ["measure", "measure_interleaved", "time_call", "summarize_times", "graph_runner",
           "engine_graph_runner", "TimeShare", "gpu_flags", "single_thread_if_busy", "sync"]

Case = Tuple[Callable, Sequence]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_event_timer(run: Callable, x) -> float:
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    run(x)
    e1.record()
    e1.synchronize()
    return float(e0.elapsed_time(e1))


def _timer(device: torch.device, clock: str) -> Timer:
    """The timer of ``clock`` on ``device`` (see :func:`time_call`)."""
    if clock == "thread":
        return thread_timer
    if clock == "auto" and device.type == "cuda":
        return _cuda_event_timer
    if clock == "wall" and device.type == "cuda":
        return lambda run, x: wall_timer(lambda v: (run(v), sync(device)), x)
    return wall_timer


def time_call(run: Callable, x, device: torch.device, clock: str = "auto") -> float:
    """Milliseconds of one ``run(x)``.

    ``clock``: ``"auto"`` (CUDA events on a GPU, ``perf_counter`` on the CPU), ``"wall"``
    (``perf_counter`` and a device synchronisation) or ``"thread"`` (this thread's CPU time,
    which other jobs sharing the cores do not inflate).
    """
    return _timer(device, clock)(run, x)


def measure(run: Callable, batches: Sequence, device: torch.device, warmup: int, iters: int,
            min_iters: int = 1, budget: float = 0.0, clock: str = "auto") -> Tuple[List[float], List[float]]:
    """Per-iteration times (ms) of ``run`` over rotated ``batches``: (timed, warm-up).

    Warm-up iterations (wall clock, synchronised) stop early after ``budget / 2`` seconds;
    timed ones after ``budget`` seconds once ``min_iters`` are done (``budget`` 0: exactly
    ``iters``).
    """
    warm_timer = _timer(device, "thread" if clock == "thread" else "wall")
    return measure_with(run, batches, _timer(device, clock), warm_timer, warmup, iters, min_iters, budget)


def measure_interleaved(cases: Dict[str, Case], device: torch.device, warmup: int, iters: int,
                        clock: str = "auto") -> Dict[str, List[float]]:
    """Times (ms) of every ``name: (run, batches)`` case, called round by round after ``warmup`` rounds."""
    items = list(cases.values())
    rounds(items, _timer(device, "wall"), 0, warmup)
    return dict(zip(cases, rounds(items, _timer(device, clock), warmup, iters)))


def summarize_times(times: Sequence[float], batch_size: int) -> dict:
    """Median, 90th percentile (numpy, linear), mean, min, std, count and images/s of ``times`` (ms)."""
    a = np.asarray(times, dtype=np.float64)
    med = float(np.median(a))
    return {"median_ms": med, "p90_ms": float(np.percentile(a, 90)), "mean_ms": float(a.mean()),
            "min_ms": float(a.min()), "std_ms": float(a.std()), "iters": int(a.size),
            "throughput_ips": batch_size / (med / 1e3) if med > 0 else None}


# ---------------------------------------------------------------------------- CUDA graphs
def graph_runner(fn: Callable, example: torch.Tensor) -> CapturedCall:
    """``fn`` captured in a CUDA graph on a copy of ``example``; calling it copies the input in and replays."""
    return CapturedCall(fn, example.clone())


def engine_graph_runner(engine, example: torch.Tensor) -> Callable:
    """The engine's forward captured for ``example``'s shape (:func:`manidp.deploy.cuda_graph.capture`).

    Raises :class:`SkipMethod` for backends that synchronise with the host.
    """
    if engine.backend.name == "reference":
        raise SkipMethod("the reference backend reads active channel lists back to the host: it cannot be captured")
    try:
        return capture(engine, batch_size=int(example.shape[0]), input_size=tuple(example.shape[-2:]))
    except ValueError as e:
        raise SkipMethod(f"cuda_graph.capture: {e}") from None


# ---------------------------------------------------------------------------- budgets and machine state
class TimeShare:
    """Splits ``max_time`` seconds of timing over the measurements still to run."""

    def __init__(self, max_time: float, budget: float, warmup: int, min_iters: int):
        self.deadline = time.perf_counter() + max_time if max_time > 0 else None
        self.budget, self.warmup, self.min_iters = budget, warmup, min_iters

    def limits(self, remaining: int) -> Tuple[float, int, int]:
        """``(budget s, warm-up, min iters)`` for the next of ``remaining`` measurements.

        Each gets at most its share of the time left; once none is left, one warm-up
        and one timed iteration.
        """
        if self.deadline is None:
            return self.budget, self.warmup, self.min_iters
        left = self.deadline - time.perf_counter()
        if left <= 0:
            return 1e-3, min(self.warmup, 1), 1
        share = left / max(remaining, 1)
        if self.budget == 0 or share < self.budget:
            return max(share, 1e-3), self.warmup, self.min_iters
        return self.budget, self.warmup, self.min_iters


@contextlib.contextmanager
def gpu_flags(tf32: bool):
    """TF32 allowed (or not) in cuDNN and matmuls for every method alike; restored afterwards."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def single_thread_if_busy(threads_given: bool) -> None:
    """Warn when the CPU is oversubscribed, and time with one thread unless threads were given."""
    load, ncpu = (os.getloadavg() if hasattr(os, "getloadavg") else None), os.cpu_count() or 1
    if not load or load[0] <= 1.5 * ncpu:
        return
    msg = f"the machine is busy (load average {load[0]:.1f} on {ncpu} CPUs): CPU timings will be noisy"
    if not threads_given and torch.get_num_threads() > 1:
        # Spinning thread pools on oversubscribed cores stall for whole time slices: one thread
        # gives slower but meaningful numbers.
        torch.set_num_threads(1)
        msg += "; timing with 1 thread (pass --threads N to choose)"
    warn(msg)
