"""One-thread batch timings of the cpu engine against dense, for comparing gconv kernels.

The gconv instruction set is chosen once per process, so run it once per setting, e.g.::

    python benchmarks/gconv_isa_compare.py dyresnet56 1
    MANIDP_GCONV_ISA=off python benchmarks/gconv_isa_compare.py dyresnet56 1
    python benchmarks/gconv_isa_compare.py dyresnet34 1 224

Random weights, BN statistics and thresholds calibrated to about 40% of dense MACs; the best
per-thread CPU time (``time.thread_time``, which time-sharing with other jobs does not inflate)
of 20 runs.  Section 6 of ``benchmarks/results/cpu_design_notes.md`` was measured with it.
"""

import argparse

import torch

from manidp.bench import dense_model_from_gated, measure
from manidp.calibrate import calibrate_bn, calibrate_target_macs
from manidp.deploy import compile
from manidp.models import build_model


def best_ms(fn, x, runs: int = 20) -> float:
    """Best per-thread CPU time (ms) of ``runs`` calls after 3 warm-up calls."""
    with torch.no_grad():
        times, _ = measure(fn, [x], torch.device("cpu"), warmup=3, iters=runs, clock="thread")
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("arch", help="gated architecture, e.g. dyresnet56 or dyresnet34")
    p.add_argument("batch", type=int)
    p.add_argument("size", type=int, nargs="?", default=None, help="input size of ImageNet models (default 224)")
    args = p.parse_args()
    torch.set_num_threads(1)
    cifar = args.arch in ("dyresnet20", "dyresnet32", "dyresnet56", "dyresnet110")
    size = (32, 32) if cifar else (args.size or 224,) * 2
    torch.manual_seed(0)
    model = build_model(args.arch, num_classes=10)
    sample = torch.randn(16 if cifar else 4, 3, *size)
    calibrate_bn(model, sample)
    frac = calibrate_target_macs(model, sample, 0.4)
    model.eval()
    engine = compile(model, backend="cpu")
    dense = dense_model_from_gated(model)
    x = torch.randn(args.batch, 3, *size)
    print(f"{args.arch} {size[0]}x{size[1]} batch {args.batch}: kernel {torch.ops.manidp.gconv_isa()}, "
          f"MACs {frac:.2f} of dense, engine {best_ms(engine, x):.2f} ms, dense {best_ms(dense, x):.2f} ms")


if __name__ == "__main__":
    main()
