"""Real-data comparison on Fashion-MNIST: dense, ManiDP, ManiDP without the manifold term
(FBS-like) and static channel-pruned networks; and the remain-rate schedule ablation.

This script only orchestrates.  Every run is a ``manidp-train`` child process, the
command a user would type, so one trainer (one loop, gradient clipping, weight-decay
groups, learning-rate schedule and data pipeline) trains every method, and each run
can be reproduced by hand from its command line.  A child process also returns its
memory when it ends and leaves no state behind in this one.  Runs, under ``--runs``::

    {arch}_s{seed}/dense             the dense baseline (--dense)
    {arch}_s{seed}/manidp_t{t}       ManiDP at target remain rate t
    {arch}_s{seed}/fbs_t{t}          ManiDP without the manifold term (--lambda_graph 0)
    {arch}_s{seed}/static_t{t}       static L1 pruning to the MACs ManiDP run t reached,
                                     gates counted (--static_target_macs)
    {arch}_s{seed}/static_k{k}       static L1 pruning at keep ratio k (--static-keeps;
                                     --static_keep)
    {arch}_s{seed}/manidp_t{t}_f{F}  ManiDP reaching t at fraction F of the epochs (--ablation)
    ..._w{S}                         the same with thresholds recalibrated every S steps
                                     (--thre-window S: ManiDP, FBS-like and their static matches)

A run whose directory holds ``last.pth`` is finished: it is skipped, once its recorded
settings are checked against the ones asked for (a mismatch stops the script).  Any
other run is started with ``--resume``, so a killed run continues from its last
checkpoint and ``manidp-train`` refuses one defined differently.  Each run's output
goes to ``{run}.out`` beside its directory, and its training log (``log.jsonl``, one line
per epoch) is copied beside the result JSON, to ``<out stem>_logs/{arch}_s{seed}/{run}.jsonl``,
where git keeps it while the checkpoints stay under ``--runs``.  Static runs and the ManiDP runs share
epochs, learning rate and batch size, and all start from the seed's dense run.

ManiDP and FBS-like models are compiled into engines, evaluated on the test split with
the deployed engine, and timed with ``manidp-bench`` (skip with ``--no-timing``) against
the fastest dense runtime of the run on this machine.

Examples::

    # the schedule of the committed CPU results (10,000 training images)
    python benchmarks/fashion_mnist.py --arch resnet20 --seeds 1 --train-subset 10000 \\
        --dense-epochs 12 --epochs 6 --targets 0.6,0.5 --runs runs/fm \\
        --out benchmarks/results/fashion_mnist_resnet20.json

    # full data: dense 15 epochs at lr 0.1, ManiDP/FBS-like/static 10 epochs at lr 0.05,
    # with a static frontier at three more widths
    python benchmarks/fashion_mnist.py --arch resnet20 --seeds 1,2 --dense-epochs 15 --epochs 10 \\
        --targets 0.6,0.5 --fbs-targets 0.6 --static-keeps 0.35,0.5,0.75 --runs runs/fm_full \\
        --out benchmarks/results/fashion_mnist_full_resnet20.json

    # the schedule ablation: ResNet-20, 10,000 training images, target 0.6, seeds 1 and 2,
    # target reached at the last epoch vs at 60% of the epochs
    python benchmarks/fashion_mnist.py --ablation --runs runs/fm

    # merge result files into one Markdown table
    python benchmarks/fashion_mnist.py summarize OUT.md RESULT.json...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch

import manidp
from manidp.bench.environment import cpu_model
from manidp.bench.frontier import engine_accuracy
from manidp.checkpoint import read_checkpoint
from manidp.data import build_dataset
from manidp.deploy import compile
from manidp.train import build_parser as train_parser, defining_arg_differences

# Settings of the schedule ablation (--ablation), where the command line does not give them.
ABLATION_DEFAULTS = {"seeds": "1,2", "targets": "0.6", "train_subset": 10000, "target_epoch_fracs": "1.0,0.6",
                     "out": "benchmarks/results/fashion_mnist_schedule_ablation.json"}
PIPELINE_DEFAULTS = {"seeds": "1", "targets": "0.6,0.5", "train_subset": None, "target_epoch_fracs": "1.0",
                     "out": "benchmarks/results/fashion_mnist.json"}
STATIC_METHOD = "static (L1, uniform)"


class RunError(RuntimeError):
    """A training run failed, or a finished run was trained with other settings than asked for."""


def parse_args(argv=None) -> argparse.Namespace:
    """Options; those left unset take the defaults of the mode (ABLATION_DEFAULTS or PIPELINE_DEFAULTS)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ablation", action="store_true",
                   help="the remain-rate schedule ablation: ManiDP runs reaching the target at each of "
                        "--target-epoch-fracs of the epochs (no FBS-like, static, engine or timing runs)")
    p.add_argument("--arch", default="resnet20", help="dense architecture name (resnet20, resnet56, ...)")
    p.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "synthetic"),
                   help="synthetic: generated images, for testing this script")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 1; ablation 1,2)")
    p.add_argument("--targets", default=None, help="ManiDP target remain rates (default 0.6,0.5; ablation 0.6)")
    p.add_argument("--fbs-targets", default=None,
                   help="targets of the no-manifold runs (default: all ManiDP targets; 'none' for no run)")
    p.add_argument("--static-keeps", default=None,
                   help="keep ratios of extra static runs (static_k{keep}), e.g. 0.35,0.5,0.75")
    p.add_argument("--target-epoch-fracs", default=None,
                   help="ablation: fractions of the epochs at which the remain rate reaches the target "
                        "(default 1.0,0.6)")
    p.add_argument("--train-subset", type=int, default=None, help="training images (default all; ablation 10000)")
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--dense-epochs", type=int, default=12)
    p.add_argument("--epochs", type=int, default=6, help="epochs of each ManiDP / FBS-like / static run")
    p.add_argument("--dense-lr", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=0.05, help="learning rate of each ManiDP / FBS-like / static run")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lambda-lasso", type=float, default=5e-3)
    p.add_argument("--lambda-graph", type=float, default=1.0)
    p.add_argument("--thre-window", type=int, default=0, metavar="S",
                   help="ManiDP / FBS-like runs recalibrate their thresholds every S training steps "
                        "(manidp-train --thre_window; 0: once per epoch, the paper's rule)")
    p.add_argument("--runs", default="runs/fashion_mnist", help="directory of the training runs")
    p.add_argument("--out", default=None, help="result JSON (a Markdown table is written beside it in --ablation)")
    p.add_argument("--no-timing", action="store_true", help="skip the manidp-bench timing of engines")
    p.add_argument("--bench-iters", type=int, default=30)
    p.add_argument("--bench-threads", type=int, default=None,
                   help="CPU threads of the manidp-bench timing (default: torch's choice)")
    args = p.parse_args(argv)
    for key, value in (ABLATION_DEFAULTS if args.ablation else PIPELINE_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def _floats(text: Optional[str]) -> List[float]:
    """``"0.6,0.5"`` -> ``[0.6, 0.5]``; ``None``, ``""`` and ``"none"`` -> ``[]``."""
    if not text or text == "none":
        return []
    return [float(v) for v in text.split(",")]


# ----------------------------------------------------------------------------- manidp-train runs
def common_flags(args, seed: int) -> List[str]:
    """``manidp-train`` flags every run of a seed shares (data, batch, seed, CPU)."""
    flags = ["--dataset", args.dataset, "--ngpu", "0", "--batch_size", str(args.batch_size),
             "--manualSeed", str(seed)]
    if args.train_subset is not None:
        flags += ["--train_subset", str(args.train_subset)]
    if args.test_subset is not None:
        flags += ["--test_subset", str(args.test_subset)]
    return flags


def dense_flags(args) -> List[str]:
    return ["--arch", args.arch, "--dense", "--epochs", str(args.dense_epochs), "--lr", str(args.dense_lr)]


def gated_flags(args, dense_ckpt: str, target: float, lambda_graph: float, frac: float = 1.0) -> List[str]:
    """A ManiDP run (FBS-like with ``lambda_graph`` 0) from the dense checkpoint; ``frac``: --target_epoch_frac."""
    flags = ["--arch", "dy" + args.arch, "--pretrain_path", dense_ckpt, "--target_remain_rate", str(target),
             "--lambda_lasso", str(args.lambda_lasso), "--lambda_graph", str(lambda_graph),
             "--epochs", str(args.epochs), "--lr", str(args.lr)]
    if frac != 1.0:  # 1.0 is manidp-train's default: leave it out, as a hand-typed command would
        flags += ["--target_epoch_frac", str(frac)]
    if args.thre_window:
        flags += ["--thre_window", str(args.thre_window)]
    return flags


def static_flags(args, dense_ckpt: str, flag: str, value: float) -> List[str]:
    """A static run cut from the dense checkpoint (``flag``: --static_keep or --static_target_macs)."""
    return ["--arch", args.arch, "--pretrain_path", dense_ckpt, flag, str(value),
            "--epochs", str(args.epochs), "--lr", str(args.lr)]


def manidp_train(save_path: str, flags: List[str]) -> dict:
    """Train ``save_path`` with ``manidp-train FLAGS`` unless it holds a finished run; return :func:`finished_run`."""
    save_path = os.path.abspath(save_path)
    flags = flags + ["--save_path", save_path, "--resume", "--quiet"]
    last = os.path.join(save_path, "last.pth")
    if os.path.isfile(last):
        result = finished_run(last)
        check_settings(save_path, flags, result["args"])
        print(f"  finished already: {save_path}", flush=True)
        return result
    os.makedirs(os.path.dirname(save_path), exist_ok=True)
    t0 = time.time()
    code = run_child(flags, save_path + ".out")
    if code != 0:
        raise RunError(f"manidp-train exited with code {code} for {save_path}: {_last_line(save_path + '.out')}")
    print(f"  trained {save_path} in {time.time() - t0:.0f}s", flush=True)
    return finished_run(last)


def run_child(flags: List[str], log: str) -> int:
    """``python -m manidp.train FLAGS`` with its output appended to ``log``; its exit code."""
    with open(log, "a") as out:
        return subprocess.run([sys.executable, "-m", "manidp.train", *flags], stdout=out,
                              stderr=subprocess.STDOUT, env=_child_env()).returncode


def _child_env() -> dict:
    """Environment of a ``manidp-train`` child: it imports the same ``manidp`` package as this script."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(manidp.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _last_line(path: str) -> str:
    """The last non-empty line of a text file (a child's error message)."""
    with open(path, errors="replace") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    return lines[-1] if lines else "(no output)"


def finished_run(last: str) -> dict:
    """Final metrics of the run whose ``last.pth`` is ``last``, with its arguments and (static runs) widths."""
    ckpt = read_checkpoint(last)
    metrics = ckpt["state"]["metrics"]
    return {"top1": metrics["top1"], "flops_reduction": metrics["flops_reduction"], "macs": metrics["mean_macs"],
            "dense_macs": metrics["dense_macs"], "epochs": ckpt["args"]["epochs"], "widths": ckpt.get("widths"),
            "args": ckpt["args"], "checkpoint": last}


def check_settings(save_path: str, flags: List[str], saved_args: dict) -> None:
    """RunError unless the finished run in ``save_path`` was trained with the settings ``flags`` ask for."""
    diffs = defining_arg_differences(train_parser().parse_args(flags), saved_args)
    if diffs:
        raise RunError(f"{save_path} holds a finished run with other settings: {'; '.join(diffs)}; "
                       "use another --runs directory")


# ----------------------------------------------------------------------------- engines
@torch.no_grad()
def engine_eval(ckpt: str, data) -> Dict[str, float]:
    """Top-1 and FLOPs reduction of the compiled engine on the test split (fastest CPU backend)."""
    m = engine_accuracy(compile(ckpt), data.test, 256)
    return {"engine_top1": m["engine_top1"], "engine_flops_reduction": 1.0 - m["engine_mac_fraction"],
            "backend": m["engine_backend"]}


def bench_engine(ckpt: str, out_dir: str, iters: int, threads: Optional[int] = None) -> Optional[dict]:
    """Time the engine against the best dense runtime with manidp-bench on Fashion-MNIST images; speedups per
    batch size."""
    cmd = [sys.executable, "-m", "manidp.bench", "--model", ckpt, "--data", "fashion-mnist",
           "--batch-sizes", "1,32", "--iters", str(iters), "--out", out_dir]
    if threads:
        cmd += ["--threads", str(threads)]
    if subprocess.run(cmd, stdout=subprocess.DEVNULL, env=_child_env()).returncode != 0:
        return None
    with open(os.path.join(out_dir, "report.json")) as f:
        report = json.load(f)
    env = report["environment"]
    return {"bench_report": os.path.join(out_dir, "report.json"), "speedups": extract_speedups(report),
            "bench_cpu": env.get("cpu_model"), "bench_threads": env.get("cpu_threads"),
            "bench_kernel": env.get("cpu_kernel")}


def extract_speedups(report: dict) -> dict:
    """{batch: {"ideal", "best_gated", "best_gated_speedup", "realized_over_ideal", "best_dense"}}
    from a manidp-bench report (speedups over the best dense method)."""
    keys = ("ideal_speedup", "best_dense", "best_gated", "best_gated_speedup", "realized_over_ideal",
            "static_speedup")
    return {str(row["batch_size"]): {k: row.get(k) for k in keys} for row in report.get("summary", [])}


# ----------------------------------------------------------------------------- one seed
def run_dense(args, seed: int, base: str) -> dict:
    """The seed's dense run and its row."""
    r = manidp_train(f"{base}/dense", common_flags(args, seed) + dense_flags(args))
    return {"arch": args.arch, "method": "dense", "seed": seed, "top1": r["top1"], "flops_reduction": 0.0,
            "epochs": r["epochs"]}


def run_gated(args, seed: int, base: str, target: float, lambda_graph: float, frac: float = 1.0) -> dict:
    """A ManiDP (or, with ``lambda_graph`` 0, FBS-like) run from the seed's dense checkpoint, and its row."""
    tag = "manidp" if lambda_graph else "fbs"
    run_dir = f"{base}/{tag}_t{target}" + ("" if frac == 1.0 else f"_f{frac}") + _window_suffix(args.thre_window)
    flags = common_flags(args, seed) + gated_flags(args, _dense_ckpt(base), target, lambda_graph, frac)
    r = manidp_train(run_dir, flags)
    return {"arch": args.arch, "method": "manidp" if lambda_graph else "no-manifold (FBS-like)", "seed": seed,
            "target_remain_rate": target, "target_epoch_frac": frac, "thre_window": args.thre_window,
            "top1": r["top1"],
            "flops_reduction": r["flops_reduction"], "epochs": r["epochs"], "checkpoint": r["checkpoint"]}


def run_static(args, seed: int, base: str, matched: Optional[dict] = None, keep: Optional[float] = None) -> dict:
    """A static run: to the MACs of the ManiDP row ``matched`` (static_t{t}), or at keep ratio ``keep``."""
    if matched is not None:
        target = matched["target_remain_rate"]
        # Gates cost MACs: a run too short to close channels can cost more than dense.
        frac = min(1.0 - matched["flops_reduction"], 1.0)
        window = matched.get("thre_window", 0)
        run_dir = f"{base}/static_t{target}{_window_suffix(window)}"
        flags = static_flags(args, _dense_ckpt(base), "--static_target_macs", frac)
        extra = {"matched_to_target": target, "matched_thre_window": window, "speedups": matched.get("speedups"),
                 **{k: matched[k] for k in ("bench_cpu", "bench_threads", "bench_kernel") if k in matched}}
    else:
        run_dir, flags = f"{base}/static_k{keep}", static_flags(args, _dense_ckpt(base), "--static_keep", keep)
        extra = {"keep": keep}
    r = manidp_train(run_dir, common_flags(args, seed) + flags)
    return {"arch": args.arch, "method": STATIC_METHOD, "seed": seed, "top1": r["top1"],
            "flops_reduction": r["flops_reduction"], "macs": r["macs"], "widths": r["widths"], "epochs": r["epochs"],
            **extra}


def _window_suffix(window: int) -> str:
    return f"_w{window}" if window else ""


def _dense_ckpt(base: str) -> str:
    return os.path.abspath(f"{base}/dense/last.pth")


def pipeline_seed(args, seed: int, data) -> List[dict]:
    """Every run of one seed (dense, ManiDP, FBS-like, static), with engine evaluation and timing."""
    base = os.path.join(args.runs, f"{args.arch}_s{seed}")
    rows = [run_dense(args, seed, base)]
    targets = _floats(args.targets)
    fbs_targets = targets if args.fbs_targets is None else _floats(args.fbs_targets)
    runs = [(t, args.lambda_graph) for t in targets] + [(t, 0.0) for t in fbs_targets]
    for target, lambda_graph in runs:
        row = run_gated(args, seed, base, target, lambda_graph)
        row.update(engine_eval(row["checkpoint"], data))
        if not args.no_timing:
            run_dir = os.path.dirname(row["checkpoint"])
            row.update(bench_engine(row["checkpoint"], f"{run_dir}/bench", args.bench_iters, args.bench_threads)
                       or {})
        rows.append(row)
    for target in targets:
        matched = next(r for r in rows if r["method"] == "manidp" and r["target_remain_rate"] == target)
        rows.append(run_static(args, seed, base, matched=matched))
    for keep in _floats(args.static_keeps):
        rows.append(run_static(args, seed, base, keep=keep))
    return rows


def ablation_seed(args, seed: int) -> List[dict]:
    """The schedule ablation of one seed: the dense run, then ManiDP at every (target, fraction)."""
    base = os.path.join(args.runs, f"{args.arch}_s{seed}")
    rows = [run_dense(args, seed, base)]
    for target in _floats(args.targets):
        for frac in _floats(args.target_epoch_fracs):
            rows.append(run_gated(args, seed, base, target, args.lambda_graph, frac))
    return rows


# ----------------------------------------------------------------------------- result files
def _row_key(r: dict) -> tuple:
    return (r["arch"], r["method"], r["seed"], r.get("target_remain_rate"), r.get("matched_to_target"),
            r.get("keep"), r.get("target_epoch_frac", 1.0), r.get("thre_window", r.get("matched_thre_window", 0)))


def _target(r: dict) -> str:
    if "target_remain_rate" in r:
        frac = r.get("target_epoch_frac", 1.0)
        return (f"{r['target_remain_rate']}" + ("" if frac == 1.0 else f", reached at {frac:.0%} of the epochs")
                + _window_note(r.get("thre_window", 0)))
    if r.get("keep") is not None:
        return f"keep {r['keep']}"
    if r.get("matched_to_target") is None:
        return "-"
    return f"FLOPs of ManiDP {r['matched_to_target']}" + _window_note(r.get("matched_thre_window", 0))


def _window_note(window: int) -> str:
    return f", thresholds every {window} steps" if window else ""


def _speedup(r: dict, batch: str) -> Optional[float]:
    """Measured CPU speedup over the best dense method at ``batch``: the engine's for dynamic rows,
    the same-MACs static narrow network's for static rows (both from the matched ManiDP row's bench)."""
    s = (r.get("speedups") or {}).get(batch) or {}
    return s.get("static_speedup" if r["method"].startswith("static") else "best_gated_speedup")


def _fmt_speedup(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _timed_on(r: dict) -> str:
    if not r.get("speedups"):
        return "-"
    return f"{r.get('bench_cpu')}, {r.get('bench_threads')} thread(s), kernel {r.get('bench_kernel')}"


def _mean_spread(values: List[float]) -> str:
    m = sum(values) / len(values)
    return f"{m:.2f}" if len(values) == 1 else f"{m:.2f} ± {(max(values) - min(values)) / 2:.2f}"


def _order(r: dict) -> tuple:
    return (r["arch"], -r["flops_reduction"] if r["method"] != "dense" else 1, r["method"], r["seed"])


def summarize(json_files: List[str], out_md: str, title: str = "Fashion-MNIST comparison") -> None:
    """Merge result files of several invocations into Markdown: one line per run, then the mean
    and spread over seeds of each (arch, method, target)."""
    rows: List[dict] = []
    for path in json_files:
        with open(path) as f:
            doc = json.load(f)
        env, settings = doc["environment"], doc["settings"]
        # The CPU of the process that wrote the file; its thread count is not recorded here,
        # as runs are often trained by an earlier invocation (results do not depend on it).
        cpu = env.get("cpu") or "CPU (model not recorded)"
        where = f"{cpu}; {settings['train_subset'] or 60000} train images, batch {settings['batch_size']}"
        for r in doc["rows"]:
            if _row_key(r) not in {_row_key(x) for x in rows}:
                rows.append(dict(r, where=where, source=path))
    runs = ["| arch | method | target remain rate | seed | epochs | test top-1 % | FLOPs reduction % | "
            "CPU speedup b1 | CPU speedup b32 | trained on | timed on |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=_order):
        runs.append(f"| {r['arch']} | {r['method']} | {_target(r)} | {r['seed']} | {r['epochs']} | "
                    f"{r['top1']:.2f} | {100 * r['flops_reduction']:.1f} | {_fmt_speedup(_speedup(r, '1'))} | "
                    f"{_fmt_speedup(_speedup(r, '32'))} | {r['where']} | {_timed_on(r)} |")
    groups: Dict[tuple, List[dict]] = {}
    for r in sorted(rows, key=_order):
        groups.setdefault((r["arch"], r["method"], _target(r), r["epochs"]), []).append(r)
    agg = ["| arch | method | target remain rate | epochs | seeds | test top-1 % | FLOPs reduction % | "
           "CPU speedup b1 |", "|---|---|---|---|---|---|---|---|"]
    for (arch, method, target, epochs), rs in groups.items():
        sp = [v for v in (_speedup(r, "1") for r in rs) if v is not None]
        agg.append(f"| {arch} | {method} | {target} | {epochs} | {len(rs)} | {_mean_spread([r['top1'] for r in rs])} | "
                   f"{_mean_spread([100 * r['flops_reduction'] for r in rs])} | "
                   f"{_mean_spread(sp) + 'x' if sp else '-'} |")
    with open(out_md, "w") as f:
        f.write(f"# {title}\n\n"
                "Mean ± half the range over seeds (one seed: the value):\n\n" + "\n".join(agg) + "\n\n"
                "Every run:\n\n" + "\n".join(runs) + "\n\n"
                "CPU speedup: `manidp-bench` on the run's checkpoint with Fashion-MNIST test images, over the "
                "fastest dense method of that run with the same weights (PyTorch eager, BN folded, channels-last; "
                "ONNX Runtime; OpenVINO; the engine with every gate open; torch.compile is opt-in on CPU); static "
                "rows give the speedup of the static narrow network of the same MACs (its fastest runtime) from "
                "the matched ManiDP run's bench.\n\n"
                f"Sources: {', '.join(json_files)}\n")


def write(args, rows: List[dict]) -> None:
    """The result JSON: environment, settings and one row per run."""
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    env = {"machine": platform.processor() or platform.machine(), "cpu": cpu_model() or "unknown CPU",
           "cpu_threads": torch.get_num_threads(),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    with open(args.out, "w") as f:
        json.dump({"environment": env, "settings": vars(args), "rows": rows}, f, indent=1)


def copy_logs(args, seeds: List[int]) -> str:
    """Every run's training log beside the result JSON, where git keeps it (the checkpoints stay in
    ``--runs``): ``<out stem>_logs/<arch>_s<seed>/<run>.jsonl``; returns that directory."""
    dest = os.path.splitext(args.out)[0] + "_logs"
    for seed in seeds:
        name = f"{args.arch}_s{seed}"
        base = os.path.join(args.runs, name)
        for run in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            src = os.path.join(base, run, "log.jsonl")
            if os.path.isfile(src):
                os.makedirs(os.path.join(dest, name), exist_ok=True)
                shutil.copyfile(src, os.path.join(dest, name, f"{run}.jsonl"))
    return dest


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "summarize":  # summarize OUT.md RESULT.json...
        summarize(argv[2:], argv[1])
        return 0
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    data = None if args.ablation else build_dataset(args.dataset, train_subset=args.train_subset,
                                                    test_subset=args.test_subset)
    rows: List[dict] = []
    try:
        for seed in seeds:
            rows += ablation_seed(args, seed) if args.ablation else pipeline_seed(args, seed, data)
            write(args, rows)
            copy_logs(args, [seed])
    except RunError as e:
        print(f"fashion_mnist.py: error: {e}", file=sys.stderr)
        return 1
    if args.ablation:
        summarize([args.out], os.path.splitext(args.out)[0] + ".md",
                  title="Fashion-MNIST: remain-rate schedule ablation (target at the end vs earlier)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
