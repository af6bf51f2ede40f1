"""Benchmark the C++ ``cpu`` backend against the dense network on this CPU (fp32).

For each model (random weights, BN statistics and gate thresholds calibrated so that
dynamic MACs are about ``--target`` of dense, gates counted) and batch size it times:

* ``dense``:  the dense network (``manidp.models.resnetXX``) with the gated model's weights
  minus the gates, eager PyTorch, the better of contiguous and channels-last;
* ``masked``: the original masked forward (the gated training model in eval mode: dense
  convs, then multiply by the mask);
* ``engine``: the compiled :class:`DynamicResNet` with backend ``cpu``.

Speedups are dense time / engine time; the ideal is dense MACs / mean dynamic MACs of
the same timed instances.  Times are medians over ``--iters`` iterations after
``--warmup`` untimed ones, rotating through ``--rotate`` different input batches.

    .venv/bin/python benchmarks/bench_cpu.py                 # full run, writes results
    .venv/bin/python benchmarks/bench_cpu.py --quick --no-write
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from manidp.calibrate import calibrate_bn, calibrate_target_macs
from manidp.deploy import compile
from manidp.deploy.folding import fold_bn
from manidp.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {"resnet56": (32, 10), "resnet34": (224, 1000)}  # input size, classes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--target", type=float, default=0.4, help="dynamic MACs / dense MACs to calibrate for")
    p.add_argument("--iters", type=int, default=0, help="timed iterations (0: 50 at batch 1, 7 at larger batch)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rotate", type=int, default=4, help="different input batches cycled through")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--calib-batch", type=int, default=32, help="batch the thresholds are calibrated on")
    p.add_argument("--mode", default="auto", choices=["auto", "instance", "union"], help="cpu backend strategy")
    p.add_argument("--skip-masked", action="store_true", help="do not time the masked forward")
    p.add_argument("--profile", action="store_true", help="add a torch.profiler table of the engine per case")
    p.add_argument("--quick", action="store_true", help="few iterations, for development")
    p.add_argument("--no-write", action="store_true", help="print only, write no result files")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="LOAD",
                   help="before timing, wait (up to --wait-max s) until the 1-minute load average is below LOAD")
    p.add_argument("--wait-max", type=float, default=1800.0)
    return p.parse_args(argv)


# ---------------------------------------------------------------- models
def build_models(arch: str, target: float, calib_batch: int, seed: int):
    """(gated model calibrated to ``target``, dense model with the same weights, achieved fraction)."""
    size, classes = MODELS[arch]
    torch.manual_seed(seed)
    gated = build_model("dy" + arch, num_classes=classes)
    x = torch.randn(calib_batch, 3, size, size)
    calibrate_bn(gated, x)
    frac = calibrate_target_macs(gated, x, target)
    gated.eval()
    dense = build_model(arch, num_classes=classes)
    state = {k: v for k, v in gated.state_dict().items() if ".gate1." not in k and ".gate2." not in k}
    dense.load_state_dict(state)
    return gated, dense.eval(), frac


@torch.no_grad()
def fold_dense(dense):
    """A copy of ``dense`` with every BN folded into the conv before it (BN becomes Identity).

    The stricter baseline of DESIGN 3.4: what a deployment of the dense network would run.
    """
    folded = copy.deepcopy(dense)

    def fold(conv, bn):
        w, b = fold_bn(conv, bn)
        conv.weight.copy_(w)
        conv.bias = torch.nn.Parameter(b)

    fold(folded.conv1, folded.bn1)
    folded.bn1 = torch.nn.Identity()
    for blk in folded.blocks():
        fold(blk.conv1, blk.bn1)
        fold(blk.conv2, blk.bn2)
        blk.bn1, blk.bn2 = torch.nn.Identity(), torch.nn.Identity()
        if blk.downsample is not None and len(blk.downsample) > 1:
            fold(blk.downsample[0], blk.downsample[1])
            blk.downsample[1] = torch.nn.Identity()
    return folded.eval()


# ---------------------------------------------------------------- timing
def time_interleaved(cases: dict, iters: int, warmup: int) -> dict:
    """Milliseconds per call of each ``name: (fn, inputs)``, the cases interleaved call by call.

    Interleaving spreads any background load over all cases alike (the machine is shared);
    each call cycles through the case's input batches.
    """
    times = {name: [] for name in cases}
    with torch.inference_mode():
        for name, (fn, inputs) in cases.items():
            for i in range(warmup):
                fn(inputs[i % len(inputs)])
        for i in range(iters):
            for name, (fn, inputs) in cases.items():
                x = inputs[i % len(inputs)]
                t0 = time.perf_counter()
                fn(x)
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"median_ms": statistics.median(ts), "min_ms": min(ts), "mean_ms": statistics.fmean(ts),
                   "iters": iters} for name, ts in times.items()}


def profile_table(engine, x, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile
    with torch.inference_mode():
        for _ in range(2):
            engine(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                engine(x)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def bench_case(arch, batch, gated, dense, engine, args):
    size, _ = MODELS[arch]
    iters = args.iters or (50 if batch == 1 else 7)
    if args.quick:
        iters = max(3, iters // 3)
    g = torch.Generator().manual_seed(1000 + batch)
    inputs = [torch.randn(batch, 3, size, size, generator=g) for _ in range(args.rotate)]
    with torch.inference_mode():
        macs = torch.cat([engine(x, return_stats=True)[1]["macs"] for x in inputs])
    dense_macs = engine.dense_macs_for((size, size))
    res = {"arch": arch, "batch": batch, "input_size": [size, size], "dense_macs": dense_macs,
           "dynamic_macs_mean": float(macs.mean()), "ideal_speedup": dense_macs / float(macs.mean())}
    cl = torch.channels_last
    folded = fold_dense(dense)
    cl_inputs = [x.contiguous(memory_format=cl) for x in inputs]
    cases = {"dense_contiguous": (dense, inputs), "dense_channels_last": (copy.deepcopy(dense).to(memory_format=cl),
                                                                           cl_inputs),
             "folded_contiguous": (folded, inputs),
             "folded_channels_last": (copy.deepcopy(folded).to(memory_format=cl), cl_inputs),
             "engine": (engine, inputs)}
    if not args.skip_masked:
        cases["masked"] = (gated, inputs)
    t = time_interleaved(cases, iters, args.warmup)
    for kind in ("dense", "folded"):
        layout = min(("contiguous", "channels_last"), key=lambda k: t[f"{kind}_{k}"]["median_ms"])
        res[kind] = dict(t[f"{kind}_{layout}"], layout=layout,
                         layouts={k: t[f"{kind}_{k}"]["median_ms"] for k in ("contiguous", "channels_last")})
    res["engine"] = t["engine"]
    if "masked" in t:
        res["masked"] = t["masked"]
    res["speedup"] = res["dense"]["median_ms"] / res["engine"]["median_ms"]
    res["fraction_of_ideal"] = res["speedup"] / res["ideal_speedup"]
    res["speedup_vs_folded"] = res["folded"]["median_ms"] / res["engine"]["median_ms"]
    if "masked" in res:
        res["masked_vs_dense"] = res["masked"]["median_ms"] / res["dense"]["median_ms"]
    if args.profile:
        res["profile"] = profile_table(engine, inputs[0])
    return res


# ---------------------------------------------------------------- report
def environment(argv) -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = bool(subprocess.check_output(["git", "status", "--porcelain", "--", "csrc", "manidp"], cwd=ROOT,
                                             text=True).strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "git_commit": commit, "source_dirty": dirty,
            "gconv_kernel": torch.ops.manidp.gconv_isa(), "loadavg_start": os.getloadavg(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([os.path.relpath(sys.executable, ROOT), "benchmarks/bench_cpu.py", *argv])}


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# CPU backend benchmark ({env['date']})", "",
             f"- CPU: {env['cpu']}, {env['cores']} cores, torch threads {env['torch_threads']}",
             f"- torch {env['torch']}, python {env['python']}, commit `{env['git_commit']}`"
             + (" (uncommitted changes in csrc/ or manidp/)" if env.get("source_dirty") else ""),
             f"- load average at start {tuple(round(v, 2) for v in env['loadavg_start'])}, "
             f"at end {tuple(round(v, 2) for v in env['loadavg_end'])}",
             f"- command: `{env['command']}`",
             f"- fp32, random weights, thresholds calibrated to {report['target']:.2f} of dense MACs "
             f"(achieved on the calibration batch: "
             + ", ".join(f"{a} {f:.3f}" for a, f in report["calibrated_fraction"].items()) + ")",
             "- dense: `manidp.models.resnetXX` in eager mode (BN as its own op) with the gated model's weights, the "
             "faster of contiguous and channels-last (the baseline the bars refer to); dense, BN folded: the same with "
             "BN folded into the convs (the stricter baseline of DESIGN 3.4); masked: the gated model in eval mode (dense convs times the mask); "
             "engine: `manidp.deploy.compile(model, backend=\"cpu\")`",
             "- times: median ms; speedup = dense / engine; ideal = dense MACs / dynamic MACs (gates counted)",
             "- dense, masked and engine are timed interleaved, call by call, so background load hits them alike; "
             "absolute times on this shared VM still vary by up to ~30% between runs, the ratios much less",
             "- load averages count this benchmark's own 2 threads",
             "",
             "| model | batch | dense ms (layout) | masked ms | engine ms | speedup | ideal | of ideal | masked/dense "
             "| dense, BN folded ms | speedup over it |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        masked = f"{r['masked']['median_ms']:.2f}" if "masked" in r else "-"
        mvd = f"{r['masked_vs_dense']:.2f}x" if "masked_vs_dense" in r else "-"
        lines.append(f"| {r['arch']} {r['input_size'][0]}x{r['input_size'][1]} | {r['batch']} | "
                     f"{r['dense']['median_ms']:.2f} ({r['dense']['layout']}) | {masked} | "
                     f"{r['engine']['median_ms']:.2f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | "
                     f"{r['fraction_of_ideal']:.2f} | {mvd} | "
                     + (f"{r['folded']['median_ms']:.2f} ({r['folded']['layout']}) | {r['speedup_vs_folded']:.2f}x |"
                        if "folded" in r else "- | - |"))
    for r in report["results"]:
        if "profile" in r:
            lines += ["", f"## Profile: {r['arch']} batch {r['batch']} (engine, 5 calls)", "", "```",
                      r["profile"], "```"]
    return "\n".join(lines) + "\n"


def wait_quiet(limit: float, max_s: float) -> float:
    """Sleep until the 1-minute load average is below ``limit`` (or ``max_s`` passed); returns it."""
    t0 = time.time()
    while os.getloadavg()[0] >= limit and time.time() - t0 < max_s:
        time.sleep(15)
    return os.getloadavg()[0]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.wait_quiet:
        print(f"load average now {wait_quiet(args.wait_quiet, args.wait_max):.2f}", flush=True)
    report = {"environment": environment(argv), "target": args.target, "mode": args.mode,
              "calibrated_fraction": {}, "results": []}
    for arch in args.archs:
        gated, dense, frac = build_models(arch, args.target, args.calib_batch, args.seed)
        report["calibrated_fraction"][arch] = frac
        engine = compile(gated, backend="cpu")
        engine.backend.mode = args.mode
        for batch in args.batches:
            r = bench_case(arch, batch, gated, dense, engine, args)
            report["results"].append(r)
            print(f"{arch:9s} b{batch:<3d} dense {r['dense']['median_ms']:8.2f} ms  "
                  + (f"masked {r['masked']['median_ms']:8.2f} ms  " if "masked" in r else "")
                  + f"engine {r['engine']['median_ms']:8.2f} ms  speedup {r['speedup']:.2f}x "
                  f"(ideal {r['ideal_speedup']:.2f}x, {r['fraction_of_ideal']:.2f} of ideal; "
                  f"{r['speedup_vs_folded']:.2f}x over BN-folded dense)", flush=True)
    report["environment"]["loadavg_end"] = os.getloadavg()
    md = markdown(report)
    print(md)
    if not args.no_write:
        os.makedirs(args.out_dir, exist_ok=True)
        stem = os.path.join(args.out_dir, f"cpu_{datetime.date.today().isoformat()}")
        with open(stem + ".json", "w") as f:
            json.dump(report, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(md)
        print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
