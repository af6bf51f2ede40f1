"""Stage-by-stage GMAC/s of the CPU engine against ONNX Runtime on the same dense network.

For a calibrated random-weight gated ResNet (manidp.calibrate) this measures, with one
intra-op thread and per-thread CPU time (which other jobs on a shared machine do not inflate):

* ONNX Runtime: the BN-folded dense network exported to ONNX, run with ORT's profiler in a
  child process of its own; every Conv node's time and MACs (from its input shapes), summed
  per stage (the blocks that share an output shape);
* the engine with every gate open (the same MACs as the dense network, gates added): each
  block alone through ``manidp::gated_block`` (per-instance gconv), summed per stage, and the
  whole forward through the one-call network (``torch.classes.manidp.CpuNetwork``);
* the gated engine at ``--target-macs`` of dense MACs, the same two ways.

Writes a Markdown table (and JSON) used by benchmarks/results/cpu_design_notes.md::

    python benchmarks/cpu_layer_profile.py --model dyresnet56 --batch 1 --out benchmarks/results/cpu_layers
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from typing import Dict, List, Tuple

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from manidp.bench.environment import cpu_model  # noqa: E402
from manidp.bench.methods import engine_with_gates_open, folded_dense  # noqa: E402
from manidp.bench.report import write_json_and_markdown  # noqa: E402
from manidp.bench.runtimes import export_onnx  # noqa: E402
from manidp.calibrate import calibrate_bn, calibrate_target_macs  # noqa: E402
from manidp.deploy import compile  # noqa: E402
from manidp.models import build_model  # noqa: E402

Stage = Tuple[int, int, int]  # output (channels, height, width)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dyresnet56", help="gated architecture (random weights, calibrated)")
    p.add_argument("--size", type=int, default=32, help="input height and width")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--target-macs", type=float, default=0.45, help="dynamic MACs of the gated engine / dense")
    p.add_argument("--reps", type=int, default=40, help="timed calls per measurement (best quartile kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for MODEL_bN.md and MODEL_bN.json (default: print only)")
    p.add_argument("--ort-child", nargs=3, metavar=("ONNX", "INPUT", "REPS"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- ONNX Runtime (child process)
def conv_macs(shapes: List[dict], out_shape: List[int]) -> int:
    """MACs of a Conv node from its input shapes (x, weight, ...) and output shape."""
    w = next(iter(shapes[1].values()))
    n, cout, ho, wo = out_shape
    return int(n * cout * ho * wo * np.prod(w[1:]))


def ort_child(model: str, inputs: str, reps: int) -> None:
    """Print {stage: [ms, macs]} of the Conv nodes, best-quartile per node over ``reps`` profiled runs."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(os.path.dirname(model), "ort_profile")
    x = np.load(inputs)
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for _ in range(reps):
        sess.run(None, {name: x})
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    per_node: Dict[str, List[float]] = {}
    meta: Dict[str, Tuple[Stage, int]] = {}
    order: List[str] = []
    for e in events:
        args = e.get("args", {})
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or "Conv" not in args.get("op_name", ""):
            continue
        node = e["name"][: -len("_kernel_time")]
        out = next(iter(args["output_type_shape"][0].values()))
        if node not in meta:
            meta[node] = ((out[1], out[2], out[3]), conv_macs(args["input_type_shape"], out))
            order.append(node)
        per_node.setdefault(node, []).append(e["dur"] / 1e3)
    stages: Dict[str, List[float]] = OrderedDict()
    for i, node in enumerate(order):
        stage, macs = meta[node]
        key = "stem" if i == 0 else "x".join(map(str, stage))
        ts = sorted(per_node[node])
        ms = ts[len(ts) // 4]
        acc = stages.setdefault(key, [0.0, 0])
        acc[0] += ms
        acc[1] += macs
    print(json.dumps({"stages": stages, "version": ort.__version__}))


def ort_stages(dense, x: torch.Tensor, reps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="manidp-layers-") as d:
        model = export_onnx(folded_dense(dense), os.path.join(d, "dense.onnx"), x.shape)
        inputs = os.path.join(d, "x.npy")
        np.save(inputs, x.numpy())
        p = subprocess.run([sys.executable, __file__, "--ort-child", model, inputs, str(reps)], capture_output=True,
                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if p.returncode != 0:
            raise RuntimeError(f"ONNX Runtime profiling failed: {p.stderr[-2000:]}")
        return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- the engine (this process)
def best_quartile(fn, reps: int) -> float:
    """Per-thread CPU milliseconds of ``fn()``: the 25th percentile of ``reps`` calls after 3 warm-ups."""
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        ts.append(time.thread_time() - t0)
    ts.sort()
    return ts[len(ts) // 4] * 1e3


@torch.no_grad()
def engine_stages(engine, x: torch.Tensor, reps: int) -> Tuple[Dict[str, List[float]], float]:
    """({stage: [ms, dense MACs]} of the blocks run one op call each, whole one-call forward ms)."""
    backend = engine.backend
    backend.mode = "instance"
    h = backend.prepare_input(engine._stem(x))
    stages: Dict[str, List[float]] = OrderedDict()
    for blk in engine.blocks:
        out = backend.block(blk, h).out
        key = "x".join(map(str, out.shape[1:]))
        ms = best_quartile(lambda: backend.block(blk, h), reps)
        macs = blk.macs(h.shape[2], h.shape[3])[0] * x.shape[0]
        acc = stages.setdefault(key, [0.0, 0])
        acc[0] += ms
        acc[1] += int(macs)
        h = out
    backend.mode = "auto"
    whole = best_quartile(lambda: engine(x), reps)
    return stages, whole


def gmacs(ms: float, macs: float) -> float:
    return macs / (ms * 1e-3) / 1e9 if ms > 0 else float("nan")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.ort_child:
        ort_child(args.ort_child[0], args.ort_child[1], int(args.ort_child[2]))
        return 0
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    gated = build_model(args.model, num_classes=10, in_channels=3)
    calib = torch.randn(max(64, args.batch), 3, args.size, args.size)
    calibrate_bn(gated, calib)
    calibrate_target_macs(gated, calib, args.target_macs)
    gated.eval()
    x = calib[: args.batch].contiguous()
    engine = compile(gated, backend="cpu")
    open_engine = engine_with_gates_open(engine)
    dense = build_model(args.model[2:], num_classes=10, in_channels=3)
    dense.load_state_dict({k: v for k, v in gated.state_dict().items() if k in dense.state_dict()})
    dense.eval()
    ort = ort_stages(dense, x, args.reps)
    open_st, open_whole = engine_stages(open_engine, x, args.reps)
    gated_st, gated_whole = engine_stages(engine, x, args.reps)
    with torch.no_grad():
        dyn = float(engine(x, return_stats=True)[1]["macs"].sum())
    rows = []
    for key in list(open_st):
        o_ms, o_macs = open_st[key]
        r_ms, r_macs = ort["stages"].get(key, [float("nan"), 0])
        g_ms = gated_st[key][0]
        rows.append({"stage": key, "dense_mmac": o_macs / 1e6, "ort_ms": r_ms, "ort_gmacs": gmacs(r_ms, r_macs),
                     "open_ms": o_ms, "open_gmacs": gmacs(o_ms, o_macs), "open_vs_ort": o_ms / r_ms,
                     "gated_ms": g_ms})
    ort_total = sum(v[0] for v in ort["stages"].values())
    dense_macs = sum(v[1] for v in ort["stages"].values())
    report = {"model": args.model, "batch": args.batch, "size": args.size, "target_macs": args.target_macs,
              "cpu": cpu_model(), "threads": 1, "onnxruntime": ort["version"], "torch": torch.__version__,
              "isa": torch.ops.manidp.gconv_isa(), "load_average": list(os.getloadavg()),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(["python", "benchmarks/cpu_layer_profile.py"]
                                                                          + (argv if argv is not None else sys.argv[1:])),
              "rows": rows, "ort_conv_total_ms": ort_total, "dense_mmac": dense_macs / 1e6,
              "open_network_ms": open_whole, "gated_network_ms": gated_whole, "gated_mmac": dyn / 1e6}
    text = markdown(report)
    print(text)
    if args.out:
        write_json_and_markdown(report, text, os.path.join(args.out, f"{args.model}_b{args.batch}"))
    return 0


def markdown(r: dict) -> str:
    lines = [f"### {r['model']}, batch {r['batch']}, {r['size']}x{r['size']}, one thread",
             "",
             f"{r['cpu']}, gconv ISA {r['isa']}, ONNX Runtime {r['onnxruntime']}, torch {r['torch']}, "
             f"load average {r['load_average'][0]:.2f}, {r['date']}. Command: `{r['command']}`",
             "",
             "| stage (C x H x W) | dense MMAC | ORT conv ms | ORT GMAC/s | engine all-open ms | engine GMAC/s "
             "| all-open / ORT | gated ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['stage']} | {row['dense_mmac']:.1f} | {row['ort_ms']:.3f} | {row['ort_gmacs']:.1f} "
                     f"| {row['open_ms']:.3f} | {row['open_gmacs']:.1f} | {row['open_vs_ort']:.2f} "
                     f"| {row['gated_ms']:.3f} |")
    lines += ["",
              f"Blocks run one op call each (sum of the rows above); whole network: ORT conv nodes "
              f"{r['ort_conv_total_ms']:.3f} ms for {r['dense_mmac']:.1f} MMAC; engine one-call forward "
              f"all-open {r['open_network_ms']:.3f} ms, gated {r['gated_network_ms']:.3f} ms "
              f"({r['gated_mmac'] / r['batch']:.1f} MMAC per image).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
