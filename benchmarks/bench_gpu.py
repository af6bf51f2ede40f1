"""GPU benchmark of the gated engine (``triton`` and ``cuda`` backends) against the best dense network.

Run it from the repository root on a CUDA machine, after building the package (``pip install
--no-build-isolation -e .`` compiles the C++ and CUDA sources into ``manidp._C``; the ``triton``
backend needs no build)::

    python benchmarks/bench_gpu.py --out OUT_DIR                       # default cases, fp16 and bf16
    python benchmarks/bench_gpu.py --out OUT_DIR --cases r56-b1 --dtypes fp16 --no-compile --layers

``--max-minutes`` stops starting new measurements once that much time has passed, and
every result is written to ``--out`` as soon as it exists, so a run cut short by a time
limit still leaves its results.

What it does, in order:

1. Environment (:func:`manidp.bench.environment`, plus SMs, L2 size, memory and clocks) and
   the two ceilings, measured: device-to-device copy bandwidth (bytes read + written)
   and dense matrix-product rate per dtype (8192^3, random data).
2. Correctness, per architecture: engine logits with each backend in fp32/fp16/bf16
   against the ``reference`` backend on the same device and dtype (cuDNN, tf32 off),
   on instances whose active sets agree (gate values within rounding of a threshold may
   flip), plus the fraction that agree.  fp32 must agree everywhere.
3. Timing cases (default ``r34-b1,r34-b64,r34-b256,r56-b256``: ImageNet ResNet-34 at
   224x224, batch 1/64/256, CIFAR ResNet-56 at 32x32, batch 256), in fp16 and bf16.
   Random weights, BN statistics from sample data (``calibrate_bn``) and thresholds set
   so that the mean dynamic MACs are ``--target`` (0.45) of dense
   (``calibrate_target_macs``, gates counted).  Every method is timed with
   :func:`manidp.bench.measure` (CUDA events around each call, 4 rotating input batches;
   copying into the graph's static input included for graph methods):

   ``dense-cudnn-graph``   the same (BN-folded) weights as a dense network
                           (:func:`manidp.bench.folded_dense`), channels-last, cuDNN,
                           captured in a CUDA graph;
   ``dense-compile-graph`` the same through ``torch.compile`` (Inductor), then captured
                           (run last, skipped when out of time);
   ``gated-<b>-graph``     the engine with backend ``b`` captured with
                           :func:`manidp.deploy.cuda_graph.capture`;
   ``gated-<b>-eager``     the engine called from Python (launch overhead visible).

   Reported per case: throughput (images/s), gated vs best dense speedup, the ideal
   speedup ``dense MACs / mean dynamic MACs`` (so ideal throughput = best dense x that),
   the fraction of the ideal reached, and the roofline: MAC time at the measured peak
   (dense and gated) and a byte floor from the active channel counts.
4. ``--layers``: per-layer kernel timings (one gated conv1 and conv2 per ResNet-34 stage
   at ~60% active channels) against the dense cuDNN conv of the same shape.

Output: ``<out>/bench_gpu.json`` and ``<out>/bench_gpu.md`` (rewritten after every
measurement); a short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from manidp.bench import environment, folded_dense, graph_runner, measure, summarize_times  # noqa: E402
from manidp.calibrate import calibrate_bn, calibrate_target_macs  # noqa: E402
from manidp.deploy import DynamicResNet  # noqa: E402
from manidp.deploy.backends import BackendUnavailable, get_backend  # noqa: E402
from manidp.deploy.cuda_graph import capture  # noqa: E402
from manidp.flops import conv_out_size  # noqa: E402
from manidp.models import build_model  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CUDA = torch.device("cuda")
CASES = {  # name -> (arch, batch, input size)
    "r34-b1": ("dyresnet34", 1, 224), "r34-b64": ("dyresnet34", 64, 224), "r34-b256": ("dyresnet34", 256, 224),
    "r56-b256": ("dyresnet56", 256, 32), "r18-b1": ("dyresnet18", 1, 224), "r56-b1": ("dyresnet56", 1, 32),
}
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------- environment and ceilings
def gpu_properties() -> dict:
    """What the common environment does not hold: SMs, L2 size, memory, capability, clocks."""
    props = torch.cuda.get_device_properties(0)
    out = {"sms": props.multi_processor_count, "l2_bytes": getattr(props, "L2_cache_size", None),
           "total_memory": props.total_memory, "capability": f"{props.major}.{props.minor}", "cwd": os.getcwd()}
    try:
        out["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem,power.limit",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["nvidia_smi"] = None
    return out


def cuda_time(fn, inputs, batch: int = 1, min_iters: int = 10, max_iters: int = 200, budget_s: float = 1.5,
              warmup: int = 3) -> dict:
    """:func:`manidp.bench.summarize_times` of ``fn`` over rotated ``inputs`` (CUDA events around each call)."""
    times, _ = measure(fn, inputs, CUDA, warmup, max_iters, min_iters, budget_s)
    return summarize_times(times, batch)


def ceilings(dtypes) -> dict:
    out = {}
    n = 1 << 28  # 1 GiB of fp32
    a = torch.randn(n, device="cuda")
    b = torch.empty_like(a)
    r = cuda_time(lambda _: b.copy_(a), [None], min_iters=10, max_iters=30)
    out["copy_bandwidth_Bps"] = 2 * a.numel() * 4 / (r["median_ms"] / 1e3)
    del a, b
    for name in dtypes:
        dt = DTYPES[name]
        m = 8192
        x = torch.randn(m, m, device="cuda", dtype=dt)
        y = torch.randn(m, m, device="cuda", dtype=dt)
        r = cuda_time(lambda _: torch.matmul(x, y), [None], min_iters=10, max_iters=30)
        out[f"matmul_{name}_flops"] = 2 * m ** 3 / (r["median_ms"] / 1e3)
        del x, y
    torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- models
def build_engine(arch: str, size: int, target: float, seed: int = 0):
    """Random-weight gated model calibrated to ``target`` of dense MACs on sample data -> engine (CPU)."""
    torch.manual_seed(seed)
    kind_classes = 1000 if arch in ("dyresnet18", "dyresnet34") else 10
    model = build_model(arch, num_classes=kind_classes).eval().cuda()
    sample = torch.randn(64, 3, size, size, device="cuda")
    calibrate_bn(model, sample)
    achieved = calibrate_target_macs(model, sample, target)
    engine = DynamicResNet.from_model(model.cpu(), backend="reference")
    return engine, achieved


# ----------------------------------------------------------------------------- correctness
def rel_err(a, b):
    a, b = a.double(), b.double()
    if torch.isnan(a).any():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@torch.no_grad()
def check_correctness(engine, size, backends, dtypes, n=8) -> list:
    rows = []
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(123))
    for name in dtypes:
        dt = DTYPES[name]
        engine.to("cuda", dt)
        engine.set_backend("reference")
        xc = x.cuda().to(dt)
        ref, ref_stats = engine(xc, return_stats=True)
        for b in backends:
            row = {"dtype": name, "backend": b}
            try:
                engine.set_backend(b)
                out, stats = engine(xc, return_stats=True)
                torch.cuda.synchronize()
                same = (stats["active"] == ref_stats["active"]).all(1)
                row["agree_fraction"] = float(same.float().mean())
                row["rel_err"] = rel_err(out[same].float(), ref[same].float()) if same.any() else None
                tol = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}[name]
                row["ok"] = bool(row["rel_err"] is not None and row["rel_err"] < tol and
                                 (name != "fp32" or row["agree_fraction"] == 1.0))
            except Exception as e:  # noqa: BLE001 - reported, the benchmark goes on
                row["error"] = f"{type(e).__name__}: {e}"
                row["ok"] = False
            rows.append(row)
            log(f"  correctness {b:7s} {name}: {row}")
    torch.backends.cudnn.allow_tf32 = True
    engine.set_backend("reference")
    return rows


# ----------------------------------------------------------------------------- byte floor
def byte_floor(engine, active, size, batch, elem) -> float:
    """Fewest bytes a gated forward must move: active weights once per distinct use, activations once."""
    act = active.double().mean(0)  # mean active count per gate
    s = engine.config["stem"]
    h = w = conv_out_size(size, s["kernel"], s["stride"], s["padding"])
    if s["maxpool"]:
        h = w = conv_out_size(h, 3, 2, 1)
    act_bytes, wbytes_inst, wbytes_all = 0.0, 0.0, 0.0
    for i, blk in enumerate(engine.blocks):
        c1, c2 = float(act[2 * i]), float(act[2 * i + 1])
        ho, wo = conv_out_size(h, 3, blk.stride, 1), conv_out_size(w, 3, blk.stride, 1)
        cin, c = blk.in_channels, blk.planes
        act_bytes += (cin * h * w + c1 * ho * wo) + (c1 * ho * wo + 2 * c * ho * wo)  # conv1 in/out, conv2 in/res/out
        wbytes_inst += 9 * (c1 * cin + c1 * c2) + (cin * c if blk.has_shortcut else 0)
        wbytes_all += 9 * (c * cin + c * c) + (cin * c if blk.has_shortcut else 0)
        h, w = ho, wo
    return elem * (batch * act_bytes + min(wbytes_all, batch * wbytes_inst))


# ----------------------------------------------------------------------------- one case
def _workload(case, engine, inputs, backend, size, dt) -> None:
    """MACs the engine spends on ``inputs`` (gate decisions as ``backend`` makes them) and the byte floors."""
    batch = inputs[0].shape[0]
    dense_macs = engine.dense_macs_for((size, size))
    engine.set_backend(backend)
    with torch.no_grad():
        stats = [engine(x, return_stats=True)[1] for x in inputs]
    mean = float(torch.cat([s["macs"] for s in stats]).mean())
    active = torch.cat([s["active"] for s in stats]).cpu()
    case.update(dense_macs=dense_macs, dynamic_macs_mean=mean, dynamic_fraction=mean / dense_macs,
                ideal_speedup=dense_macs / mean)
    elem = torch.tensor([], dtype=dt).element_size()
    case["byte_floor_gated"] = byte_floor(engine, active, size, batch, elem)
    full = torch.tensor([blk.planes for blk in engine.blocks for _ in range(2)]).expand_as(active)
    case["byte_floor_dense"] = byte_floor(engine, full, size, batch, elem)


def _rooflines(case, ceil, dtype_name) -> None:
    """MAC time at the measured matmul peak and byte time at the measured copy bandwidth, dense and gated."""
    peak, bw, batch = ceil.get(f"matmul_{dtype_name}_flops"), ceil.get("copy_bandwidth_Bps"), case["batch"]
    if peak:
        case["mac_time_dense_ms"] = 2 * case["dense_macs"] * batch / peak * 1e3
        case["mac_time_gated_ms"] = 2 * case["dynamic_macs_mean"] * batch / peak * 1e3
    if bw:
        case["byte_time_dense_ms"] = case["byte_floor_dense"] / bw * 1e3
        case["byte_time_gated_ms"] = case["byte_floor_gated"] / bw * 1e3


def run_case(name, engine, size, batch, dtype_name, backends, ceil, results, compile_queue, args):
    dt = DTYPES[dtype_name]
    case = {"case": name, "arch": engine.config["arch"], "batch": batch, "size": size, "dtype": dtype_name,
            "methods": {}}
    results["cases"].append(case)
    engine.to("cuda", dt)
    gen = torch.Generator().manual_seed(1000 + batch)
    inputs = [torch.randn(batch, 3, size, size, generator=gen).cuda().to(dt) for _ in range(4)]
    try:
        _workload(case, engine, inputs, backends[0], size, dt)
    except Exception as e:  # noqa: BLE001
        case["error"] = f"stats: {type(e).__name__}: {e}"
        log(traceback.format_exc())
        return
    _rooflines(case, ceil, dtype_name)

    def record(method, fn, static=None):
        if time.time() - T0 > args.max_minutes * 60:
            case["methods"][method] = {"skipped": "time budget"}
            return
        try:
            r = cuda_time(fn, inputs, batch, budget_s=args.budget)
            case["methods"][method] = r
            log(f"  {name} {dtype_name} {method:24s} {r['median_ms']:9.3f} ms  {r['throughput_ips']:10.1f} img/s")
        except Exception as e:  # noqa: BLE001
            case["methods"][method] = {"error": f"{type(e).__name__}: {e}"}
            log(f"  {name} {dtype_name} {method}: FAILED {e}")
        finally:
            write_reports(results, args.out)

    # dense, cuDNN channels-last, CUDA graph
    dense = folded_dense(engine).to(CUDA, dt).to(memory_format=torch.channels_last)
    try:
        torch.backends.cudnn.benchmark = True
        with torch.no_grad():
            graphed = graph_runner(dense, inputs[0].contiguous(memory_format=torch.channels_last))
        record("dense-cudnn-graph", graphed)
        del graphed
    except Exception as e:  # noqa: BLE001
        case["methods"]["dense-cudnn-graph"] = {"error": f"{type(e).__name__}: {e}"}
    # gated engines
    for b in backends:
        try:
            engine.set_backend(b)
        except BackendUnavailable as e:
            case["methods"][f"gated-{b}-graph"] = {"error": str(e)}
            continue
        try:
            fwd = capture(engine, batch, input_size=(size, size))
            record(f"gated-{b}-graph", lambda x, fwd=fwd: fwd(x))
            del fwd
        except Exception as e:  # noqa: BLE001
            case["methods"][f"gated-{b}-graph"] = {"error": f"{type(e).__name__}: {e}"}
            log(traceback.format_exc())
        with torch.no_grad():
            record(f"gated-{b}-eager", lambda x: engine(x))
    torch.cuda.empty_cache()
    compile_queue.append((case, dense, inputs))
    summarize(case)


def run_compile(case, dense, inputs, args, results):
    if time.time() - T0 > args.max_minutes * 60:
        case["methods"]["dense-compile-graph"] = {"skipped": "time budget"}
        return
    try:
        compiled = torch.compile(dense, dynamic=False)
        t = time.time()
        with torch.no_grad():
            graphed = graph_runner(compiled, inputs[0].contiguous(memory_format=torch.channels_last))
        compile_s = time.time() - t
        r = cuda_time(graphed, inputs, case["batch"], budget_s=args.budget)
        r["compile_s"] = compile_s
        case["methods"]["dense-compile-graph"] = r
        log(f"  {case['case']} {case['dtype']} dense-compile-graph {r['median_ms']:9.3f} ms (compile {compile_s:.0f}s)")
    except Exception as e:  # noqa: BLE001
        case["methods"]["dense-compile-graph"] = {"error": f"{type(e).__name__}: {e}"}
    summarize(case)
    write_reports(results, args.out)


def summarize(case):
    m = {k: v for k, v in case["methods"].items() if "median_ms" in v}
    dense = {k: v for k, v in m.items() if k.startswith("dense")}
    gated = {k: v for k, v in m.items() if k.startswith("gated")}
    if not dense or not gated:
        return
    bd = min(dense, key=lambda k: dense[k]["median_ms"])
    bg = min(gated, key=lambda k: gated[k]["median_ms"])
    s = {"best_dense": bd, "best_dense_ms": dense[bd]["median_ms"], "best_gated": bg,
         "best_gated_ms": gated[bg]["median_ms"]}
    s["speedup"] = s["best_dense_ms"] / s["best_gated_ms"]
    s["ideal_throughput"] = dense[bd]["throughput_ips"] * case.get("ideal_speedup", float("nan"))
    s["gated_throughput"] = gated[bg]["throughput_ips"]
    s["fraction_of_ideal"] = s["gated_throughput"] / s["ideal_throughput"]
    floor_g = max(case.get("mac_time_gated_ms", 0), case.get("byte_time_gated_ms", 0))
    floor_d = max(case.get("mac_time_dense_ms", 0), case.get("byte_time_dense_ms", 0))
    if floor_g > 0:
        s["gated_over_floor"] = s["best_gated_ms"] / floor_g   # measured / max(MAC time, byte time)
    if floor_d > 0:
        s["dense_over_floor"] = s["best_dense_ms"] / floor_d
    case["summary"] = s


# ----------------------------------------------------------------------------- per-layer kernels
def layer_bench(backends, dtypes, args, results):
    """Gated conv1/conv2 kernels at ~60% active channels vs the dense cuDNN conv of the same shape."""
    from manidp.deploy.gpu_common import choose_block_m, min_block_m, weights_by_input, weights_by_output
    from manidp.kernels.build_config import MODE_CONV1, MODE_CONV2
    rows = []
    results["layers"] = rows
    shapes = [(64, 64, 56, 1), (128, 128, 28, 1), (256, 256, 14, 1), (512, 512, 7, 1), (64, 128, 56, 2)]
    for name in dtypes:
        dt = DTYPES[name]
        for batch in (1, 64, 256):
            for cin, c, hw, stride in shapes:
                if time.time() - T0 > args.max_minutes * 60:
                    return
                gen = torch.Generator().manual_seed(cin + hw)
                x = torch.randn(batch, cin, hw, hw, generator=gen).cuda().to(dt).contiguous(memory_format=torch.channels_last)
                w = (torch.randn(c, cin, 3, 3, generator=gen) / (3 * cin ** 0.5)).cuda().to(dt)
                b = torch.randn(c, generator=gen).cuda()
                ho = conv_out_size(hw, 3, stride, 1)
                act = torch.rand(batch, c, generator=gen) < 0.6
                ar = torch.arange(c).expand(batch, c)
                idx = torch.where(act, ar, ar + c).argsort(1).int().cuda()
                cnt = act.sum(1).int().cuda()
                g = torch.rand(batch, c, generator=gen).cuda() + 0.5
                wl = weights_by_output(w)
                wcl = w.contiguous(memory_format=torch.channels_last)
                xn = x.permute(0, 2, 3, 1)
                bm = choose_block_m(batch, ho * ho, c, torch.cuda.get_device_properties(0).multi_processor_count,
                                    min_block_m(CUDA))
                row = {"dtype": name, "batch": batch, "cin": cin, "c": c, "hw": hw, "stride": stride, "block_m": bm,
                       "active": float(act.float().mean())}
                dense_macs = batch * cin * c * 9 * ho * ho
                bd = b.to(dt)
                r = cuda_time(lambda _: F.conv2d(x, wcl, bd, stride=stride, padding=1), [None], budget_s=0.3)
                row["cudnn_ms"] = r["median_ms"]
                row["cudnn_tflops"] = 2 * dense_macs / r["median_ms"] / 1e9
                act_macs1 = float(cnt.sum()) * cin * 9 * ho * ho
                for bk in backends:
                    conv = _conv_op(bk)
                    if conv is None:
                        continue
                    r1 = cuda_time(lambda _: conv(xn, wl, b, None, None, idx, cnt, g, None, stride, 3, MODE_CONV1, bm,
                                                  True, False), [None], budget_s=0.3)
                    row[f"{bk}_conv1_ms"] = r1["median_ms"]
                    row[f"{bk}_conv1_tflops"] = 2 * act_macs1 / r1["median_ms"] / 1e9
                    if stride == 1 and cin == c:
                        a, _ = conv(xn, wl, b, None, None, idx, cnt, g, None, 1, 3, MODE_CONV1, bm, True, False)
                        act2 = torch.rand(batch, c, generator=gen) < 0.6
                        g2 = g * act2.cuda()  # the gate writes zero for inactive channels
                        w2, res = weights_by_input(w), xn.contiguous()
                        macs2 = float((cnt.cpu().double() * act2.sum(1).double()).sum()) * 9 * ho * ho
                        r2 = cuda_time(lambda _: conv(a, w2, b, idx, cnt, None, None, g2, res, 1, 3, MODE_CONV2, bm,
                                                      True, False), [None], budget_s=0.3)
                        row[f"{bk}_conv2_ms"] = r2["median_ms"]
                        row[f"{bk}_conv2_tflops"] = 2 * macs2 / r2["median_ms"] / 1e9
                rows.append(row)
                log(f"  layer {row}")
                write_reports(results, args.out)


CONV_OPS = {"triton": "triton_gated_conv", "cuda": "gated_conv"}  # the gated-conv op of each GPU backend


def _conv_op(backend):
    """The backend's gated-conv op (``torch.ops.manidp``), registered by loading the backend; None if it has none."""
    if backend not in CONV_OPS:
        return None
    get_backend(backend, CUDA, torch.float16)
    return getattr(torch.ops.manidp, CONV_OPS[backend])


# ----------------------------------------------------------------------------- reports
def write_reports(results, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, ".bench_gpu.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(tmp, os.path.join(out_dir, "bench_gpu.json"))
    with open(os.path.join(out_dir, "bench_gpu.md"), "w") as f:
        f.write(markdown(results))


def _fmt(v, spec=".3f"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown(results) -> str:
    env, ceil = results["environment"], results.get("ceilings", {})
    lines = [f"# GPU benchmark ({env.get('device_name')}, {env.get('date')})", "",
             f"Command: `{env.get('command_line')}`  ", f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
             f"triton {env.get('triton')}, driver {env.get('gpu_driver')}, git {env.get('git_commit')}", ""]
    if ceil:
        lines.append("Ceilings: copy " + _fmt(ceil.get("copy_bandwidth_Bps", 0) / 1e12, ".2f") + " TB/s; " +
                     ", ".join(f"{k[7:11]} matmul {v / 1e12:.0f} TFLOP/s" for k, v in ceil.items()
                               if k.startswith("matmul")))
        lines.append("")
    if results.get("correctness"):
        lines += ["## Correctness (vs reference backend, same device and dtype)", "",
                  "| arch | backend | dtype | agree | rel err | ok |", "|---|---|---|---|---|---|"]
        for arch, rows in results["correctness"].items():
            for r in rows:
                lines.append(f"| {arch} | {r['backend']} | {r['dtype']} | {_fmt(r.get('agree_fraction'), '.2f')} | "
                             f"{_fmt(r.get('rel_err'), '.2e')} | {r.get('ok')} {r.get('error', '')} |")
        lines.append("")
    lines += ["## Throughput", "",
              "| case | dtype | dyn MACs | best dense | dense ms | gated | gated ms | speedup | ideal | of ideal | "
              "MAC floor gated ms | byte floor gated ms |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        s = c.get("summary", {})
        lines.append(f"| {c['case']} | {c['dtype']} | {_fmt(c.get('dynamic_fraction'), '.3f')} | "
                     f"{s.get('best_dense', '-')} | {_fmt(s.get('best_dense_ms'))} | {s.get('best_gated', '-')} | "
                     f"{_fmt(s.get('best_gated_ms'))} | {_fmt(s.get('speedup'), '.2f')} | "
                     f"{_fmt(c.get('ideal_speedup'), '.2f')} | {_fmt(s.get('fraction_of_ideal'), '.2f')} | "
                     f"{_fmt(c.get('mac_time_gated_ms'))} | {_fmt(c.get('byte_time_gated_ms'))} |")
    lines += ["", "### All methods (median ms)", "", "| case | dtype | method | median ms | min | p90 | img/s |",
              "|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        for k, v in c["methods"].items():
            if "median_ms" in v:
                lines.append(f"| {c['case']} | {c['dtype']} | {k} | {v['median_ms']:.3f} | {v['min_ms']:.3f} | "
                             f"{v['p90_ms']:.3f} | {v['throughput_ips']:.1f} |")
            else:
                lines.append(f"| {c['case']} | {c['dtype']} | {k} | {v.get('error') or v.get('skipped')} | | | |")
    if results.get("layers"):
        lines += ["", "## Per-layer kernels (~60% active)", "", "| dtype | batch | cin | c | hw | s | cudnn ms | "
                  "cudnn TF/s | " + " | ".join(f"{b} conv1 ms | {b} conv1 TF/s | {b} conv2 ms | {b} conv2 TF/s"
                                               for b in results["config"]["backends"]) + " |",
                  "|" + "---|" * (8 + 4 * len(results["config"]["backends"]))]
        for r in results["layers"]:
            cells = [r["dtype"], r["batch"], r["cin"], r["c"], r["hw"], r["stride"], _fmt(r["cudnn_ms"]),
                     _fmt(r["cudnn_tflops"], ".1f")]
            for b in results["config"]["backends"]:
                cells += [_fmt(r.get(f"{b}_conv1_ms")), _fmt(r.get(f"{b}_conv1_tflops"), ".1f"),
                          _fmt(r.get(f"{b}_conv2_ms")), _fmt(r.get(f"{b}_conv2_tflops"), ".1f")]
            lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for bench_gpu.json / bench_gpu.md")
    ap.add_argument("--cases", default="r34-b1,r34-b64,r34-b256,r56-b256", help=f"from {sorted(CASES)}")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--backends", default="triton,cuda")
    ap.add_argument("--target", type=float, default=0.45, help="mean dynamic MACs / dense MACs")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timed iterations per measurement")
    ap.add_argument("--max-minutes", type=float, default=8.5, help="start no new measurement after this")
    ap.add_argument("--no-correctness", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile dense baseline")
    ap.add_argument("--layers", action="store_true", help="also time single gated convs against cuDNN")
    return ap.parse_args(argv)


def usable_backends(names: str) -> list:
    """The comma-separated backends that can run fp16 on this GPU (the others are logged)."""
    backends = []
    for b in [b for b in names.split(",") if b]:
        try:
            get_backend(b, CUDA, torch.float16)
            backends.append(b)
        except (BackendUnavailable, ValueError) as e:
            log(f"backend {b} unavailable: {e}")
    return backends


def print_summary(results) -> None:
    """The short table of every case, and the correctness verdicts."""
    print()
    print("case      dtype  dynMAC  best-dense        ms      best-gated          ms  speedup  ideal  of-ideal")
    for c in results["cases"]:
        s = c.get("summary", {})
        print(f"{c['case']:9s} {c['dtype']:5s} {_fmt(c.get('dynamic_fraction'), '6.3f')}  "
              f"{s.get('best_dense', '-'):17s} {_fmt(s.get('best_dense_ms'), '8.3f')}  {s.get('best_gated', '-'):18s} "
              f"{_fmt(s.get('best_gated_ms'), '8.3f')}  {_fmt(s.get('speedup'), '6.2f')}  "
              f"{_fmt(c.get('ideal_speedup'), '5.2f')}  {_fmt(s.get('fraction_of_ideal'), '6.2f')}")
    for arch, rows in results["correctness"].items():
        bad = [r for r in rows if not r.get("ok")]
        print(f"correctness {arch}: {len(rows) - len(bad)}/{len(rows)} ok" +
              (f"; FAILED {[(r['backend'], r['dtype'], r.get('rel_err'), r.get('error')) for r in bad]}" if bad else ""))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA device", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        print(f"unknown cases {unknown}; expected some of {sorted(CASES)}", file=sys.stderr)
        return 2
    dtypes = [d for d in args.dtypes.split(",") if d]
    backends = usable_backends(args.backends)
    env = dict(environment(argv, CUDA, program="benchmarks/bench_gpu.py"), **gpu_properties())
    results = {"schema": "manidp-bench-gpu/2", "environment": env,
               "config": {"cases": cases, "dtypes": dtypes, "backends": backends, "target": args.target,
                          "budget_s": args.budget, "max_minutes": args.max_minutes},
               "cases": [], "correctness": {}}
    log(f"device {results['environment']['device_name']}; backends {backends}")
    results["ceilings"] = ceilings(dtypes)
    log(f"ceilings {results['ceilings']}")
    write_reports(results, args.out)

    engines = {}
    compile_queue = []
    for case in cases:
        arch, batch, size = CASES[case]
        if arch not in engines:
            engine, achieved = build_engine(arch, size, args.target)
            engines[arch] = engine
            results.setdefault("calibration", {})[arch] = {"target": args.target, "achieved_on_sample": achieved}
            log(f"{arch}: calibrated MAC fraction {achieved:.3f}")
            if not args.no_correctness:
                results["correctness"][arch] = check_correctness(engine, size, backends, ["fp32"] + dtypes)
                write_reports(results, args.out)
        for dt in dtypes:
            run_case(case, engines[arch], size, batch, dt, backends, results["ceilings"], results, compile_queue,
                     args)
            write_reports(results, args.out)
    if not args.no_compile:
        for case, dense, inputs in compile_queue:
            run_compile(case, dense, inputs, args, results)
    if args.layers:
        layer_bench(backends, dtypes, args, results)
    write_reports(results, args.out)
    print_summary(results)
    print(f"report: {os.path.join(args.out, 'bench_gpu.md')}  ({time.time() - T0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
