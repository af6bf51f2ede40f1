"""Benchmark the C++ ``cpu`` backend against the fastest dense runtime on this CPU (fp32).

For each model (random weights, BN statistics and gate thresholds calibrated so that
dynamic MACs are about ``--target`` of dense, gates counted) and batch size it times:

* ``dense``:  the dense network (``manidp.models.resnetXX``) with the gated model's weights
  minus the gates, eager PyTorch, the better of contiguous and channels-last; ``folded``:
  the same with BN folded into the convs;
* ``engine_open``: the engine with every gate open (the dense network run by the engine);
* ``ort`` and ``openvino``: the folded dense network exported to ONNX under ONNX Runtime and
  OpenVINO, each in a child process of its own (``manidp.bench.runtimes``), so their
  spinning thread pools never run beside the in-process cases;
* ``masked``: the original masked forward (the gated training model in eval mode: dense
  convs, then multiply by the mask);
* ``engine``: the compiled :class:`DynamicResNet` with backend ``cpu``.

The in-process cases are timed interleaved, call by call.  ``best_dense`` is the fastest
dense case (PyTorch, engine all open, ONNX Runtime, OpenVINO); the speedup is best dense
time / engine time (``speedup_vs_pytorch`` keeps the eager-PyTorch ratio, labelled as
such); the ideal is dense MACs / mean dynamic MACs of the same timed instances.  Times are
medians over ``--iters`` iterations after ``--warmup`` untimed ones, rotating through
``--rotate`` different input batches.

    .venv/bin/python benchmarks/bench_cpu.py                 # full run, writes results
    .venv/bin/python benchmarks/bench_cpu.py --quick --no-write
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

from manidp.bench import (RUNTIMES, Workspace, dense_model_from_gated, engine_with_gates_open, environment,
                          folded_dense, measure_interleaved, summarize_times, time_in_child)
from manidp.bench.report import write_json_and_markdown
from manidp.bench.runtimes import missing_reason
from manidp.calibrate import calibrate_bn, calibrate_target_macs
from manidp.deploy import compile
from manidp.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {"resnet56": (32, 10), "resnet34": (224, 1000)}  # input size, classes
CPU = torch.device("cpu")
RUNTIME_LABELS = {rt.tag: rt.label for rt in RUNTIMES}


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
    p.add_argument("--no-runtimes", action="store_true", help="do not time ONNX Runtime and OpenVINO")
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
    return gated, dense_model_from_gated(gated), frac


# ---------------------------------------------------------------- timing
def time_interleaved(cases: dict, batch: int, iters: int, warmup: int) -> dict:
    """Statistics (ms) of each ``name: (fn, inputs)``, the cases interleaved call by call.

    Interleaving spreads any background load over all cases alike (the machine is shared);
    each call cycles through the case's input batches.
    """
    with torch.inference_mode():
        times = measure_interleaved(cases, CPU, warmup, iters)
    return {name: summarize_times(ts, batch) for name, ts in times.items()}


def time_runtimes(workspace: Workspace, arch: str, dense, inputs, batch: int, iters: int, warmup: int) -> dict:
    """Statistics (ms) of the folded dense network under each installed ONNX runtime, each in its own process."""
    out = {}
    for rt in RUNTIMES:
        if missing_reason(rt) is not None:
            continue
        model = workspace.onnx(arch, folded_dense(dense), inputs[0].shape)
        r = time_in_child(rt, model, workspace.inputs(inputs), torch.get_num_threads(), warmup, iters, iters, 0.0)
        if r["status"] == "ok":
            out[rt.tag] = dict(summarize_times(r["times_ms"], batch), version=r["version"])
        else:
            print(f"{arch} b{batch} {rt.label}: {r['status']} ({r['reason']})", flush=True)
    return out


def best_dense(res: dict, timings: dict) -> dict:
    """The fastest dense case of ``res`` / ``timings`` as ``{"method", "median_ms"}``."""
    cands = {f"pytorch {res[k]['layout']}" + (", BN folded" if k == "folded" else ""): res[k]["median_ms"]
             for k in ("dense", "folded")}
    cands.update({name: t["median_ms"] for name, t in timings.items()})
    name = min(cands, key=cands.get)
    return {"method": name, "median_ms": cands[name]}


def profile_table(engine, x, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile
    with torch.inference_mode():
        for _ in range(2):
            engine(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                engine(x)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def bench_case(arch, batch, gated, dense, engine, args, workspace):
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
    cl_inputs = [x.contiguous(memory_format=cl) for x in inputs]
    cases = {"dense_contiguous": (dense, inputs),
             "dense_channels_last": (dense_model_from_gated(gated).to(memory_format=cl), cl_inputs),
             "folded_contiguous": (folded_dense(dense), inputs),
             "folded_channels_last": (folded_dense(dense).to(memory_format=cl), cl_inputs),
             "engine_open": (engine_with_gates_open(engine), inputs),
             "engine": (engine, inputs)}
    if not args.skip_masked:
        cases["masked"] = (gated, inputs)
    t = time_interleaved(cases, batch, iters, args.warmup)
    for kind in ("dense", "folded"):
        layout = min(("contiguous", "channels_last"), key=lambda k: t[f"{kind}_{k}"]["median_ms"])
        res[kind] = dict(t[f"{kind}_{layout}"], layout=layout,
                         layouts={k: t[f"{kind}_{k}"]["median_ms"] for k in ("contiguous", "channels_last")})
    res["engine"], res["engine_open"] = t["engine"], t["engine_open"]
    if "masked" in t:
        res["masked"] = t["masked"]
    others = {"engine all open": t["engine_open"]}
    if not args.no_runtimes:
        res["runtimes"] = time_runtimes(workspace, arch, dense, inputs, batch, iters, args.warmup)
        others.update({RUNTIME_LABELS[k]: v for k, v in res["runtimes"].items()})
    res["best_dense"] = best_dense(res, others)
    res["speedup"] = res["best_dense"]["median_ms"] / res["engine"]["median_ms"]
    res["fraction_of_ideal"] = res["speedup"] / res["ideal_speedup"]
    res["speedup_vs_pytorch"] = res["dense"]["median_ms"] / res["engine"]["median_ms"]
    res["speedup_vs_folded"] = res["folded"]["median_ms"] / res["engine"]["median_ms"]
    if "masked" in res:
        res["masked_vs_dense"] = res["masked"]["median_ms"] / res["dense"]["median_ms"]
    if args.profile:
        res["profile"] = profile_table(engine, inputs[0])
    return res


# ---------------------------------------------------------------- report
def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# CPU backend benchmark ({env['date']})", "",
             f"- CPU: {env['cpu_model']}, {env['cpu_count']} cores, torch threads {env['cpu_threads']}, "
             f"gathered-conv kernel {env['cpu_kernel']}",
             f"- torch {env['torch']}, python {env['python']}, commit `{env['git_commit']}`"
             + (" (uncommitted changes)" if env.get("git_dirty") else ""),
             f"- load average at start {_rounded(env['load_average'])}, at end {_rounded(report['load_average_end'])}",
             f"- command: `{env['command_line']}`",
             f"- fp32, random weights, thresholds calibrated to {report['target']:.2f} of dense MACs "
             f"(achieved on the calibration batch: "
             + ", ".join(f"{a} {f:.3f}" for a, f in report["calibrated_fraction"].items()) + ")",
             "- PyTorch dense: `manidp.models.resnetXX` in eager mode (BN as its own op) with the gated model's "
             "weights, the faster of contiguous and channels-last; BN folded: the same with BN folded into the convs; "
             "engine all open: the engine with every gate open; ORT / OpenVINO: the folded network exported to ONNX, "
             "each timed in a child process; masked: the gated model in eval mode (dense convs times the mask); "
             "engine: `manidp.deploy.compile(model, backend=\"cpu\")`",
             "- best dense: the fastest of the dense cases (docs/DESIGN.md 3.4)",
             "- times: median ms; speedup = best dense / engine; ideal = dense MACs / dynamic MACs (gates counted); "
             "vs PyTorch = PyTorch eager dense / engine, against eager PyTorch only",
             "- the in-process cases are timed interleaved, call by call, so background load hits them alike",
             "- load averages count this benchmark's own threads",
             "",
             "| model | batch | best dense ms (method) | PyTorch dense ms (layout) | BN folded ms | engine all open ms "
             "| ORT ms | OpenVINO ms | masked ms | engine ms | speedup | ideal | of ideal | vs PyTorch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(_markdown_row(r))
    for r in report["results"]:
        if "profile" in r:
            lines += ["", f"## Profile: {r['arch']} batch {r['batch']} (engine, 5 calls)", "", "```",
                      r["profile"], "```"]
    return "\n".join(lines) + "\n"


def _ms(entry) -> str:
    return "-" if not entry else f"{entry['median_ms']:.2f}"


def _markdown_row(r: dict) -> str:
    rts = r.get("runtimes", {})
    return (f"| {r['arch']} {r['input_size'][0]}x{r['input_size'][1]} | {r['batch']} | "
            f"{r['best_dense']['median_ms']:.2f} ({r['best_dense']['method']}) | "
            f"{r['dense']['median_ms']:.2f} ({r['dense']['layout']}) | {_ms(r['folded'])} | {_ms(r['engine_open'])} | "
            f"{_ms(rts.get('ort'))} | {_ms(rts.get('openvino'))} | {_ms(r.get('masked'))} | {_ms(r['engine'])} | "
            f"{r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {r['fraction_of_ideal']:.2f} | "
            f"{r['speedup_vs_pytorch']:.2f}x |")


def _rounded(load) -> str:
    return "unknown" if load is None else str(tuple(round(v, 2) for v in load))


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
    report = {"environment": environment(argv, CPU, program="benchmarks/bench_cpu.py"), "target": args.target,
              "mode": args.mode,
              "calibrated_fraction": {}, "results": []}
    workspace = Workspace()
    try:
        for arch in args.archs:
            gated, dense, frac = build_models(arch, args.target, args.calib_batch, args.seed)
            report["calibrated_fraction"][arch] = frac
            engine = compile(gated, backend="cpu")
            engine.backend.mode = args.mode
            for batch in args.batches:
                r = bench_case(arch, batch, gated, dense, engine, args, workspace)
                report["results"].append(r)
                print(f"{arch:9s} b{batch:<3d} best dense {r['best_dense']['median_ms']:8.2f} ms "
                      f"({r['best_dense']['method']})  "
                      + (f"masked {r['masked']['median_ms']:8.2f} ms  " if "masked" in r else "")
                      + f"engine {r['engine']['median_ms']:8.2f} ms  speedup {r['speedup']:.2f}x "
                      f"(ideal {r['ideal_speedup']:.2f}x, {r['fraction_of_ideal']:.2f} of ideal; "
                      f"{r['speedup_vs_pytorch']:.2f}x over eager PyTorch)", flush=True)
    finally:
        workspace.close()
    report["load_average_end"] = list(os.getloadavg())
    md = markdown(report)
    print(md)
    if not args.no_write:
        paths = write_json_and_markdown(report, md, os.path.join(args.out_dir, f"cpu_{datetime.date.today().isoformat()}"))
        print("wrote", " and ".join(paths))


if __name__ == "__main__":
    main()
