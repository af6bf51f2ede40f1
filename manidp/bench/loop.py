"""The measurement loop itself, with nothing but the standard library (docs/DESIGN.md 8).

:mod:`manidp.bench.timing` wraps it for torch devices; the child process that
times ONNX Runtime or OpenVINO (:mod:`manidp.bench.runtime_worker`) runs it
directly, so that child loads neither torch nor the engine, and both sides time
with the same loop.  A *timer* is ``timer(run, x) -> milliseconds`` of one call.
"""

from __future__ import annotations

import time
from typing import Callable, List, Sequence, Tuple

__all__ = ["Timer", "wall_timer", "thread_timer", "rounds", "measure_with"]

Timer = Callable[[Callable, object], float]
Case = Tuple[Callable, Sequence]


def wall_timer(run: Callable, x) -> float:
    """Milliseconds of ``run(x)`` on the wall clock (``time.perf_counter``)."""
    t0 = time.perf_counter()
    run(x)
    return (time.perf_counter() - t0) * 1e3


def thread_timer(run: Callable, x) -> float:
    """Milliseconds of this thread's CPU time during ``run(x)``, which other jobs on the cores do not inflate."""
    t0 = time.thread_time()
    run(x)
    return (time.thread_time() - t0) * 1e3


def rounds(cases: Sequence[Case], timer: Timer, first: int, count: int, budget: float = 0.0,
           floor: int = 0) -> List[List[float]]:
    """Per-case times of up to ``count`` rounds, each calling every case once on its next batch.

    Round ``r`` feeds batch ``(first + r) % len(batches)``.  Stops early once ``budget``
    seconds (> 0) are spent and ``floor`` rounds are done.
    """
    times: List[List[float]] = [[] for _ in cases]
    start = time.perf_counter()
    for r in range(count):
        for t, (run, batches) in zip(times, cases):
            t.append(timer(run, batches[(first + r) % len(batches)]))
        if budget > 0 and time.perf_counter() - start >= budget and r + 1 >= floor:
            break
    return times


def measure_with(run: Callable, batches: Sequence, timer: Timer, warm_timer: Timer, warmup: int, iters: int,
                 min_iters: int = 1, budget: float = 0.0) -> Tuple[List[float], List[float]]:
    """Per-iteration times (ms) of ``run`` over rotated ``batches``: (timed, warm-up).

    Warm-up iterations (``warm_timer``) stop early after ``budget / 2`` seconds; timed
    ones (``timer``) after ``budget`` seconds once ``min_iters`` are done (``budget`` 0:
    exactly ``iters``).
    """
    case = [(run, batches)]
    warm = rounds(case, warm_timer, 0, warmup, budget / 2)[0]
    times = rounds(case, timer, len(warm), iters, budget, min(min_iters, iters))[0]
    return times, warm
