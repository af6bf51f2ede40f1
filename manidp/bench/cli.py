"""``manidp-bench``: the command line, resolved settings, and the run from model to report."""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .environment import environment
from .errors import PROG, BenchError, error
from .inputs import load_images, rotated_batches, split_pool
from .methods import CompileBudget, TimingPlan, folded_dense, make_methods, static_network, time_methods
from .report import build_report, print_report, write_reports
from .isolation import ISOLATIONS, MethodProcesses, isolation_note
from .runtimes import Workspace
from .subject import (DEFAULT_TARGET_MACS, Subject, build_random, default_data, macs_section, make_subject,
                      resolve_model, warn_if_ill_conditioned)
from .timing import TimeShare, gpu_flags, single_thread_if_busy

__all__ = ["build_parser", "run", "main", "DTYPES"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------- arguments
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump, exit status 2 via BenchError
        raise BenchError(f"{message} (see --help)")


def _int_list(text: str) -> List[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive batch sizes, got {text!r}")
    return sorted(set(vals))


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return v


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a DynamicResNet file, a manidp-train checkpoint (compiled here), or a gated architecture "
                        "name (dyresnet20/32/56/110/18/34: random weights, BN calibrated on sample data). "
                        "Default: the shipped model (manidp/assets/default_model.pt) if present, else a random "
                        "dyresnet56 at --target-macs 0.45")
    p.add_argument("--target-macs", type=_fraction, default=None,
                   help="calibrate gate thresholds on sample data so mean dynamic MACs are this fraction of dense "
                        "(default 0.45 for architecture names; model files keep their thresholds unless given)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--batch-sizes", type=_int_list, default=None, help="default 1,8,64 on CPU, 1,8,64,256 on GPU")
    p.add_argument("--backends", default=None,
                   help="comma-separated gated backends (default: all available for device/dtype)")
    p.add_argument("--data", default=None,
                   help="'synthetic', 'fashion-mnist', a directory of images (or of IDX .gz files), or a .pt file "
                        "holding an image tensor. Default: the built-in model's test images, else synthetic")


def _add_timing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations per measurement (default 10 CPU, 5 GPU)")
    p.add_argument("--iters", type=int, default=None, help="maximum timed iterations per measurement "
                   "(default 1000 CPU, 200 GPU: on the CPU --time-budget ends a sub-millisecond "
                   "measurement, not a count that would stop it after a few dozen milliseconds)")
    p.add_argument("--min-iters", type=int, default=3, help="timed iterations done even past --time-budget")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds per (method, batch size) after which timing stops (0: exactly --iters; "
                        "default 1.5 CPU, 1.0 GPU)")
    p.add_argument("--num-batches", type=int, default=4, help="distinct input batches rotated during timing")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the dense and static networks (auto: on for cuda, off for cpu, where "
                        "compiling on few cores takes minutes)")
    p.add_argument("--max-time", type=float, default=None,
                   help="seconds for all timing together (default 120 CPU, 600 GPU; 0: no limit): each "
                        "measurement gets at most its share of what is left, and once it is spent every "
                        "remaining measurement runs one warm-up and one timed iteration")
    p.add_argument("--compile-budget", type=float, default=180.0,
                   help="seconds: once one compilation takes longer, compiled methods are skipped from then on")
    p.add_argument("--order", choices=["forward", "reverse"], default="forward",
                   help="order in which the methods are timed in the first round (later rounds alternate; the "
                        "report lists them in the same order either way): reverse checks that the order does not "
                        "change the numbers")
    p.add_argument("--rounds", type=int, default=None,
                   help="times every method is timed, in alternating order; each batch size reports the round "
                        "with the lowest median and lists every round's (default 2 on CPU, 1 on GPU)")
    p.add_argument("--isolation", choices=list(ISOLATIONS), default=None,
                   help="process: time every method (each round) in a fresh child process, so none runs where "
                        "another ran; in-process: PyTorch and engine methods in this process (faster to run). "
                        "ONNX Runtime and OpenVINO always run in child processes. Default: process on CPU, "
                        "in-process on GPU")
    p.add_argument("--tf32", choices=["on", "off"], default="on",
                   help="GPU fp32 only: allow TF32 in cuDNN convs and matmuls (and so in the Triton kernels) "
                        "for every method alike (on is cuDNN's default for convs)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Latency and throughput of dense versus gated (ManiDP) ResNets: "
                "the dense network under PyTorch, ONNX Runtime, OpenVINO and the engine with every gate open, "
                "the original masked forward, every gated backend and a static narrow network of the same "
                "MACs; writes report.json, report.md and report.png.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(p)
    _add_timing_args(p)
    p.add_argument("--static-sizing", choices=["macs", "widths"], default="macs",
                   help="static network: uniform keep ratio matching the mean dynamic MACs (macs), or per-block "
                        "widths matching each block's mean dynamic conv MACs (widths)")
    p.add_argument("--calib-images", type=int, default=64, help="sample images for BN/threshold calibration")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of torch, the engine, ONNX Runtime and "
                   "OpenVINO (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default ./manidp-bench-<date>-<time>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--list-backends", action="store_true", help="print the backends available for "
                   "--device/--dtype and exit")
    return p


# ---------------------------------------------------------------------------- settings
def _resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda asked for, but no CUDA GPU is available here (torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use --device cpu")
    return torch.device(name)


def _resolve_backends(spec: Optional[str], device: torch.device, dtype: torch.dtype) -> Tuple[List[str], List[str]]:
    """(backends to time, backends available) for ``--backends``."""
    from ..deploy.backends import BackendUnavailable, available_backends, get_backend
    avail = available_backends(device, dtype)
    if spec is None:
        # Triton on CPU tensors is its interpreter (TRITON_INTERPRET=1): a test tool, far too slow to time
        # by default; naming it in --backends still times it.
        return [n for n in avail if not (n == "triton" and device.type == "cpu")], avail
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise BenchError("--backends is empty")
    for n in names:
        try:
            get_backend(n, device, dtype)
        except ValueError:
            raise BenchError(f"unknown backend {n!r}; available for {device.type}/{str(dtype)[6:]}: "
                             f"{', '.join(avail) or 'none'}") from None
        except BackendUnavailable as e:
            raise BenchError(f"backend {n!r} cannot run here: {e}") from None
    if "auto" in names:
        raise BenchError("--backends takes backend names, not 'auto'")
    return list(dict.fromkeys(names)), avail


def _check_counts(args) -> None:
    for flag in ("warmup", "iters", "num_batches", "calib_images", "min_iters", "rounds"):
        v = getattr(args, flag)
        if v is not None and v < (0 if flag == "warmup" else 1):
            raise BenchError(f"--{flag.replace('_', '-')} must be {'>= 0' if flag == 'warmup' else '>= 1'}")
    for flag in ("time_budget", "max_time"):
        v = getattr(args, flag)
        if v is not None and v < 0:
            raise BenchError(f"--{flag.replace('_', '-')} must be >= 0")


def _make_out_dir(out: Optional[str]) -> str:
    out_dir = out or f"manidp-bench-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise BenchError(f"cannot create the --out directory {out_dir!r}: {e.strerror}") from None
    return out_dir


@dataclass
class Settings:
    """The command line with every default filled in for the device."""
    device: torch.device
    dtype: torch.dtype
    backends: List[str]
    available: List[str]
    batch_sizes: List[int]
    warmup: int
    iters: int
    budget: float
    max_time: float
    compile_on: bool
    compile_skip: Optional[str]
    tf32: bool
    rounds: int
    isolation: str

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"


def _compile_skip(args, compile_on: bool) -> Optional[str]:
    if compile_on:
        return None
    if args.compile == "off":
        return "torch.compile is off (--compile off)"
    return "torch.compile is opt-in on the CPU (compiling takes minutes on few cores): pass --compile on"


def resolve_settings(args) -> Settings:
    """Check the arguments and fill in the device-dependent defaults."""
    if args.threads is not None:
        if args.threads < 1:
            raise BenchError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    device = _resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    backends, avail = _resolve_backends(args.backends, device, dtype)
    gpu = device.type == "cuda"
    compile_on = args.compile == "on" or (args.compile == "auto" and gpu)

    def pick(value, on_gpu, on_cpu):
        return value if value is not None else (on_gpu if gpu else on_cpu)
    return Settings(device, dtype, backends, avail, pick(args.batch_sizes, [1, 8, 64, 256], [1, 8, 64]),
                    pick(args.warmup, 5, 10), pick(args.iters, 200, 1000), pick(args.time_budget, 1.0, 1.5),
                    pick(args.max_time, 600.0, 120.0), compile_on, _compile_skip(args, compile_on),
                    args.tf32 == "on", pick(args.rounds, 1, 2), pick(args.isolation, "in-process", "process"))


def _config(args, s: Settings, subject, data_spec: str, size, target: Optional[float]) -> dict:
    """The report's ``config`` object."""
    return {"model": subject.name, "model_source": subject.source, "arch": subject.arch,
            "num_classes": subject.num_classes, "in_channels": subject.in_channels,
            "input_size": list(size), "device": str(s.device), "dtype": args.dtype,
            "batch_sizes": s.batch_sizes, "backends": s.backends, "backends_available": s.available,
            "data": data_spec, "warmup": s.warmup, "iters": s.iters, "min_iters": args.min_iters,
            "time_budget_s": s.budget, "max_time_s": s.max_time, "num_batches": args.num_batches,
            "compile": s.compile_on, "compile_budget_s": args.compile_budget, "target_macs": target,
            "seed": args.seed, "static_sizing": args.static_sizing, "tf32": s.tf32 if s.gpu else None,
            "method_order": args.order, "rounds": s.rounds, "isolation": s.isolation}


def _static_section(net, keep: Optional[float], sized_from: str, dense_macs: int, size) -> dict:
    macs = net.macs(size)
    return {"keep": keep, "widths": list(net.widths), "macs": macs, "fraction": macs / dense_macs,
            "sized_from": sized_from}


# ---------------------------------------------------------------------------- the run
@dataclass
class Workload:
    """The model under test and the images that drive it."""
    subject: Subject
    data_spec: str
    data_info: dict
    size: Tuple[int, int]
    target: Optional[float]
    batches: dict  # batch size -> rotated input batches (CPU, fp32)


def prepare(args, s: Settings) -> Workload:
    """Resolve ``--model`` and ``--data``, load the images, calibrate and compile the model."""
    choice = resolve_model(args.model)
    data_spec, in_ch, size = default_data(choice, args.data)
    gated = build_random(choice, in_ch) if choice.random else choice.gated
    max_bs = max(s.batch_sizes)
    pool, data_info = load_images(data_spec, in_ch, size, max_bs * args.num_batches + args.calib_images,
                                  args.seed, choice.preprocess)
    calib, timing_pool = split_pool(pool, args.calib_images, max_bs)
    if not s.gpu:
        single_thread_if_busy(args.threads is not None)
    target = args.target_macs if args.target_macs is not None else (DEFAULT_TARGET_MACS if choice.random else None)
    subject = make_subject(choice, gated, calib, target, size)
    batches = {bs: rotated_batches(timing_pool, bs, args.num_batches) for bs in s.batch_sizes}
    warn_if_ill_conditioned(subject.gated, batches[max_bs][0][:16])
    return Workload(subject, data_spec, data_info, size, target, batches)


def run(args, argv: List[str]) -> dict:
    """Run the benchmark described by parsed ``args``; returns the report dict (files written)."""
    s = resolve_settings(args)
    if args.list_backends:
        print("\n".join(s.available))
        return {}
    _check_counts(args)
    torch.manual_seed(args.seed)
    out_dir = _make_out_dir(args.out)
    w = prepare(args, s)
    subject, size = w.subject, w.size

    dense_macs = int(subject.engine.dense_macs_for(size))
    macs = macs_section(subject.gated, dense_macs, w.batches)
    static_net, keep, sized_from = static_network(subject.gated, args.static_sizing, macs["overall_mean_fraction"],
                                                  size, [x for xs in w.batches.values() for x in xs])
    static = _static_section(static_net, keep, sized_from, dense_macs, size)
    make_args = dict(subject=subject, dense_fold=folded_dense(subject.gated), static_net=static_net,
                     static_label=f"{static['fraction']:.3f} of dense MACs", backends=s.backends, device=s.device,
                     dtype=s.dtype, compile_skip=s.compile_skip, cbudget=CompileBudget(args.compile_budget))
    methods = make_methods(**make_args)
    env = dict(environment(argv, s.device), runtime_isolation=isolation_note(s.isolation))
    workspace = Workspace()
    plan = TimingPlan(s.device, s.dtype, s.iters, TimeShare(s.max_time, s.budget, s.warmup, args.min_iters),
                      args.order, workspace, s.rounds, cbudget=make_args["cbudget"])
    try:
        if s.isolation == "process":
            plan.children = MethodProcesses(workspace.path, make_args, w.batches, torch.get_num_threads(),
                                            timeout=300.0 + args.compile_budget)
        with gpu_flags(s.tf32) if s.gpu else contextlib.nullcontext():
            time_methods(methods, w.batches, plan, args.quiet)
    finally:
        workspace.close()

    model = {"arch": subject.arch, "dense_macs": dense_macs, "num_gates": subject.engine.num_gates,
             "calibration": subject.calibration, "preprocess": subject.preprocess}
    report = build_report(env, _config(args, s, subject, w.data_spec, size, w.target), model, w.data_info, macs,
                          static, [m.entry() for m in methods])
    print_report(report, write_reports(report, out_dir))
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point; returns the exit status (0 ok, 2 usage error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    threads = torch.get_num_threads()
    try:
        run(build_parser().parse_args(argv), argv)
        return 0
    except BenchError as e:
        error(str(e))
        return 2
    except SystemExit as e:  # --help
        return int(e.code) if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        error("interrupted")
        return 130
    finally:
        torch.set_num_threads(threads)
