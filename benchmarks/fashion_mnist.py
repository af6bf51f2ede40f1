"""Real-data comparison on Fashion-MNIST: dense, ManiDP, ManiDP without the manifold term
(FBS-like), and a static channel-pruned network of the same FLOPs.

Every run goes through ``manidp.train.train`` (the ``manidp-train`` code path);
the static baseline is the narrow network cut from the dense one by filter L1
norm (``manidp.static_pruning``: each block keeps fewer channels inside, the
residual width stays) and fine-tuned with the same epochs, batch size and
learning-rate schedule as the ManiDP runs.  Each finished run is skipped when
the script is started again, so an interrupted pipeline continues where it
stopped.  ManiDP models are compiled into engines, evaluated on the test split
with the deployed engine, and timed with ``manidp-bench`` against the fastest
dense runtime of the run (PyTorch, ONNX Runtime, OpenVINO, the engine with every
gate open) on this machine.

``python benchmarks/fashion_mnist.py summarize OUT.md RESULT.json...`` merges
result files into one Markdown table.

Example (the schedule of the committed CPU results)::

    python benchmarks/fashion_mnist.py --arch resnet20 --seeds 1 --train-subset 10000 \\
        --dense-epochs 12 --epochs 6 --targets 0.6,0.5 --runs /work/runs \\
        --out benchmarks/results/fashion_mnist_resnet20.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from manidp.bench.environment import cpu_model
from manidp.data import build_dataset, eval_batches, train_batches
from manidp.deploy import compile
from manidp.flops import dense_macs
from manidp.models import build_model, load_dense_state_dict
from manidp.static_pruning import keep_for_target_macs, static_pruned_like
from manidp.train import cosine_lr, train

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet20", help="dense architecture name (resnet20, resnet56, ...)")
    p.add_argument("--seeds", default="1", help="comma-separated seeds")
    p.add_argument("--targets", default="0.6,0.5", help="ManiDP target remain rates")
    p.add_argument("--fbs-targets", default=None,
                   help="targets of the no-manifold runs (default: all ManiDP targets; 'none' for no run)")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--dense-epochs", type=int, default=12)
    p.add_argument("--epochs", type=int, default=6, help="epochs of each ManiDP / FBS / static run")
    p.add_argument("--dense-lr", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lambda-lasso", type=float, default=5e-3)
    p.add_argument("--lambda-graph", type=float, default=1.0)
    p.add_argument("--runs", default="runs/fashion_mnist", help="directory of the training runs")
    p.add_argument("--out", default="benchmarks/results/fashion_mnist.json")
    p.add_argument("--no-timing", action="store_true", help="skip the manidp-bench timing of engines")
    p.add_argument("--bench-iters", type=int, default=30)
    p.add_argument("--bench-threads", type=int, default=None,
                   help="CPU threads of the manidp-bench timing (default: torch's choice)")
    return p.parse_args(argv)


def common(args, seed: int) -> dict:
    return dict(dataset="fashion-mnist", ngpu=0, batch_size=args.batch_size, train_subset=args.train_subset,
                test_subset=args.test_subset, manualSeed=seed, quiet=True)


def run_or_load(save_path: str, **kwargs) -> dict:
    """Train unless ``save_path`` already holds a finished run; return its final log line."""
    log = os.path.join(save_path, "log.jsonl")
    done = os.path.join(save_path, "last.pth")
    if not os.path.isfile(done):
        t0 = time.time()
        train(save_path=save_path, resume=True, **kwargs)  # continues a killed run, else starts fresh
        print(f"  trained {save_path} in {time.time() - t0:.0f}s", flush=True)
    with open(log) as f:
        lines = [json.loads(l) for l in f if l.strip()]
    return lines[-1]


def finetune_static(args, seed: int, dense_ckpt: str, target_frac: float, save_path: str) -> dict:
    """Cut a static narrow network of ``target_frac`` x dense MACs from the dense model, fine-tune it."""
    result_file = os.path.join(save_path, "result.json")
    if os.path.isfile(result_file):
        with open(result_file) as f:
            return json.load(f)
    os.makedirs(save_path, exist_ok=True)
    torch.manual_seed(seed)
    data = build_dataset("fashion-mnist", train_subset=args.train_subset, test_subset=args.test_subset)
    dense = build_model(args.arch, num_classes=10, in_channels=data.info.in_channels)
    ckpt = torch.load(dense_ckpt, map_location="cpu", weights_only=True)
    load_dense_state_dict(dense, ckpt["state_dict"])
    size = data.info.input_size
    keep = keep_for_target_macs(dense, target_frac, size)
    net = static_pruned_like(dense, keep)
    decay, rest = [], []
    for name, p in net.named_parameters():
        (rest if p.dim() == 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": rest, "weight_decay": 5e-4}],
                          lr=args.lr, momentum=0.9, nesterov=True)
    steps = math.ceil(len(data.train) / args.batch_size)
    total, it = steps * args.epochs, 0
    for epoch in range(args.epochs):
        net.train()
        for x, y in train_batches(data.train, epoch, args.batch_size, seed):
            for g in opt.param_groups:
                g["lr"] = cosine_lr(args.lr, it, total)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            it += 1
    top1 = accuracy(net, data.test)
    macs = net.macs(size)
    res = {"top1": top1, "flops_reduction": 1 - macs / dense_macs(dense, size), "keep": keep,
           "macs": macs, "epochs": args.epochs}
    with open(result_file, "w") as f:
        json.dump(res, f)
    return res


@torch.no_grad()
def accuracy(net, test_ds) -> float:
    net.eval()
    correct = total = 0
    for x, y in eval_batches(test_ds, 500):
        correct += int((net(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


@torch.no_grad()
def evaluate_engine(engine, test_ds) -> dict:
    """Top-1 (%) and MACs of ``engine`` on a test split, as the engine reports them (gates counted)."""
    correct = total = 0
    macs = []
    for x, y in eval_batches(test_ds, 256):
        logits, stats = engine(x.contiguous(), return_stats=True)
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
        macs.append(stats["macs"])
    mean = float(torch.cat(macs).mean())
    return {"test_top1": 100.0 * correct / total, "test_images": total,
            "flops_reduction": 1.0 - mean / engine.dense_macs, "mean_macs": mean, "dense_macs": engine.dense_macs}


def engine_eval(ckpt: str, data) -> Dict[str, float]:
    """Top-1 and FLOPs reduction of the compiled engine on the test split (fastest CPU backend)."""
    engine = compile(ckpt)
    m = evaluate_engine(engine, data.test)
    return {"engine_top1": m["test_top1"], "engine_flops_reduction": m["flops_reduction"],
            "backend": engine.backend.name}


def bench_engine(ckpt: str, out_dir: str, iters: int, threads: Optional[int] = None) -> Optional[dict]:
    """Time the engine against the best dense runtime with manidp-bench on Fashion-MNIST images; speedups per
    batch size."""
    cmd = [sys.executable, "-m", "manidp.bench", "--model", ckpt, "--data", "fashion-mnist",
           "--batch-sizes", "1,32", "--iters", str(iters), "--out", out_dir]
    if threads:
        cmd += ["--threads", str(threads)]
    if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
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


def _row_key(r: dict) -> tuple:
    return (r["arch"], r["method"], r["seed"], r.get("target_remain_rate"), r.get("matched_to_target"))


def _target(r: dict) -> str:
    if "target_remain_rate" in r:
        return f"{r['target_remain_rate']}"
    return "-" if r.get("matched_to_target") is None else f"FLOPs of ManiDP {r['matched_to_target']}"


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


def summarize(json_files: List[str], out_md: str) -> None:
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
        f.write("# Fashion-MNIST comparison\n\n"
                "Mean ± half the range over seeds (one seed: the value):\n\n" + "\n".join(agg) + "\n\n"
                "Every run:\n\n" + "\n".join(runs) + "\n\n"
                "CPU speedup: `manidp-bench` on the run's checkpoint with Fashion-MNIST test images, over the "
                "fastest dense method of that run with the same weights (PyTorch eager, BN folded, channels-last; "
                "ONNX Runtime; OpenVINO; the engine with every gate open; torch.compile is opt-in on CPU); static "
                "rows give the speedup of the static narrow network of the same MACs (its fastest runtime) from "
                "the matched ManiDP run's bench.\n\n"
                f"Sources: {', '.join(json_files)}\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "summarize":  # summarize OUT.md RESULT.json...
        summarize(argv[2:], argv[1])
        return 0
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    targets = [float(t) for t in args.targets.split(",")]
    fbs_targets = targets if args.fbs_targets is None else \
        [] if args.fbs_targets == "none" else [float(t) for t in args.fbs_targets.split(",")]
    gated = "dy" + args.arch
    rows: List[dict] = []
    data = build_dataset("fashion-mnist", train_subset=args.train_subset, test_subset=args.test_subset)
    for seed in seeds:
        base = os.path.join(args.runs, f"{args.arch}_s{seed}")
        dense_dir = f"{base}/dense"
        d = run_or_load(dense_dir, arch=args.arch, dense=True, epochs=args.dense_epochs, lr=args.dense_lr,
                        **common(args, seed))
        rows.append({"arch": args.arch, "method": "dense", "seed": seed, "top1": d["top1"],
                     "flops_reduction": 0.0, "epochs": args.dense_epochs})
        dense_ckpt = f"{dense_dir}/last.pth"
        for method, lam, tlist in (("manidp", args.lambda_graph, targets), ("no-manifold (FBS-like)", 0.0, fbs_targets)):
            for t in tlist:
                tag = "manidp" if lam else "fbs"
                run_dir = f"{base}/{tag}_t{t}"
                r = run_or_load(run_dir, arch=gated, pretrain_path=dense_ckpt, target_remain_rate=t,
                                lambda_lasso=args.lambda_lasso, lambda_graph=lam, epochs=args.epochs,
                                lr=args.lr, **common(args, seed))
                row = {"arch": args.arch, "method": method, "seed": seed, "target_remain_rate": t,
                       "top1": r["top1"], "flops_reduction": r["flops_reduction"], "epochs": args.epochs,
                       "checkpoint": f"{run_dir}/last.pth"}
                row.update(engine_eval(row["checkpoint"], data))
                if not args.no_timing:
                    timing = bench_engine(row["checkpoint"], f"{run_dir}/bench", args.bench_iters, args.bench_threads)
                    if timing:
                        row.update(timing)
                rows.append(row)
        for t in targets:
            ref = next(r for r in rows if r["method"] == "manidp" and r["seed"] == seed
                       and r["target_remain_rate"] == t)
            # Gates cost MACs: a run too short to close channels can cost more than dense.
            frac = min(1.0 - ref["flops_reduction"], 1.0)
            s = finetune_static(args, seed, dense_ckpt, frac, f"{base}/static_t{t}")
            rows.append({"arch": args.arch, "method": "static (L1, uniform)", "seed": seed,
                         "matched_to_target": t, "top1": s["top1"], "flops_reduction": s["flops_reduction"],
                         "epochs": args.epochs, "speedups": ref.get("speedups"),
                         **{k: ref[k] for k in ("bench_cpu", "bench_threads", "bench_kernel") if k in ref}})
        write(args, rows)
    write(args, rows)
    return 0


def write(args, rows: List[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    env = {"machine": platform.processor() or platform.machine(), "cpu": cpu_model() or "unknown CPU",
           "cpu_threads": torch.get_num_threads(),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    with open(args.out, "w") as f:
        json.dump({"environment": env, "settings": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
