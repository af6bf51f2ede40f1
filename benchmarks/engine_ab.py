"""Time the ``cpu`` engine of whichever ``manidp`` is imported, for A/B comparisons of two source trees.

    PYTHONPATH=/path/to/tree_a python benchmarks/engine_ab.py dyresnet56 1,32
    PYTHONPATH=/path/to/tree_b python benchmarks/engine_ab.py dyresnet56 1,32
    PYTHONPATH=/path/to/tree_b python benchmarks/engine_ab.py dyresnet56 1,32 --open

Each tree needs its extension built in place (``python setup.py build_ext --inplace``).
The model is ``manidp-bench``'s random-weight subject (same seed, thresholds calibrated to
45% of dense MACs), so both trees time the same network on the same inputs.  Per batch
size: five rounds of 0.6 s each (at least five calls), the median of each round and the
best of them; one line on stdout.  ``--open`` times the engine with every gate open (the
dense network, for kernel efficiency at full width).  Run the trees alternately, several times, in separate
processes: on shared machines a whole process can run slower than the next one.
"""

from __future__ import annotations

import copy
import os
import sys
import time

import numpy as np
import torch

import manidp
from manidp.bench.cli import build_parser, prepare, resolve_settings
from manidp.bench.methods import engine_with_gates_open


def round_medians(engine, xs, rounds: int = 5, seconds: float = 0.6):
    meds = []
    for _ in range(rounds):
        ts, i, end = [], 0, time.perf_counter() + seconds
        while time.perf_counter() < end or len(ts) < 5:
            t0 = time.perf_counter()
            engine(xs[i % len(xs)])
            ts.append((time.perf_counter() - t0) * 1e3)
            i += 1
        meds.append(float(np.median(ts)))
    return meds


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    gates_open = "--open" in argv
    argv = [a for a in argv if a != "--open"]
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    model, sizes = argv
    args = build_parser().parse_args(["--model", model, "--target-macs", "0.45", "--batch-sizes", sizes,
                                      "--backends", "cpu", "--threads", "2", "--quiet"])
    settings = resolve_settings(args)
    torch.manual_seed(0)
    work = prepare(args, settings)
    engine = copy.deepcopy(work.subject.engine).set_backend("cpu").eval()
    if gates_open:
        engine = engine_with_gates_open(engine)
    parts = []
    with torch.inference_mode():
        for bs in settings.batch_sizes:
            xs = work.batches[bs]
            for i in range(5):
                engine(xs[i % len(xs)])
            meds = round_medians(engine, xs)
            parts.append(f"b{bs} best-median {min(meds):.3f} ms (medians {' '.join(f'{m:.3f}' for m in meds)})")
    tree = os.path.dirname(os.path.dirname(os.path.abspath(manidp.__file__)))
    print(f"{tree} {model}{' open' if gates_open else ''} | {' | '.join(parts)} | load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
