"""Test top-1 against measured CPU latency: dense, static, ManiDP and FBS-like networks (docs/DESIGN.md 8.1).

Reads the training runs that ``benchmarks/fashion_mnist.py`` writes::

    RUNS/{arch}_s{seed}/dense            the dense baseline
    RUNS/{arch}_s{seed}/manidp_t{t}      ManiDP at target remain rate t
    RUNS/{arch}_s{seed}/fbs_t{t}         ManiDP without the manifold term (FBS-like)
    RUNS/{arch}_s{seed}/static_t{t}      static L1 pruning at ManiDP t's FLOPs
    RUNS/{arch}_s{seed}/static_k{keep}   static L1 pruning at keep ratio keep
    ..._w{S}                             ManiDP / FBS-like runs whose thresholds were recalibrated
                                         every S steps (--thre_window), and their static matches

each holding ``log.jsonl`` and ``last.pth`` (a ``manidp-train`` checkpoint), and any compiled engine
files given with ``--engine`` (``builtin``: the built-in model), as ManiDP points.  ``--static-from``
adds the static runs recorded in an earlier ``results.json`` whose checkpoints are gone: a static
network's latency under a dense runtime depends on its widths alone, so each is cut to its recorded
widths from this run's dense network of the same architecture and seed, timed here, and placed at its
recorded top-1.  Per batch size it
places every finished run at the time of the fastest way to deploy it on this CPU, fp32:

* dense and static networks: the fastest of PyTorch eager, BN folded, folded channels-last,
  ONNX Runtime, OpenVINO (each in a child process) and, for dense networks, the engine with
  every gate open (:mod:`manidp.bench.frontier`);
* ManiDP and FBS-like networks: the fastest gated engine backend, with the best dense time of
  the same architecture in the same run beside it.

Accuracy is the run's final test top-1 from ``log.jsonl``; gated runs are also compiled and
evaluated on the same test split with the deployed engine (``engine_top1``).  An engine file has
no training log: its top-1 and MAC fraction are the deployed engine's on its dataset's whole test
split.  Runs that are missing or unfinished are skipped with a note.  Writes ``results.json``, ``README.md`` (a table
per batch size and where ManiDP is ahead or behind) and ``b{batch}.png``::

    python benchmarks/accuracy_latency.py --runs DIR --engine builtin --out benchmarks/results/accuracy_latency
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from manidp.bench.environment import environment, load_average
from manidp.bench.errors import BenchError
from manidp.bench.frontier import (DENSE_KIND, GATED_KIND, dense_runtime_methods, engine_accuracy, fastest,
                                   gated_methods, gated_twin, open_engines, time_at_batch_size)
from manidp.bench.inputs import load_images, rotated_batches
from manidp.bench.methods import TimingPlan, dense_model_from_gated
from manidp.bench.runtimes import ISOLATION, Workspace
from manidp.bench.timing import TimeShare
from manidp.checkpoint import CheckpointError, read_checkpoint, rebuild_model
from manidp.data import DatasetError, build_dataset
from manidp.deploy import compile as compile_engine
from manidp.deploy.backends import available_backends
from manidp.deploy.engine import DynamicResNet
from manidp.preprocess import preprocess_spec
from manidp.pretrained import DEFAULT_MODEL_PATH, default_model_info
from manidp.static_pruning import StaticPrunedResNet, static_pruned_like

FORMAT = "manidp.accuracy_latency/1"
CPU = torch.device("cpu")
STATIC_KIND = "static"
SEED_DIR = re.compile(r"^(?P<arch>[a-z]+[0-9]+)_s(?P<seed>[0-9]+)$")
RUN_DIR = re.compile(r"^(?:(?P<dense>dense)|(?P<method>manidp|fbs)_t(?P<t>[0-9.]+)(?P<w>_w[0-9]+)?|"
                     r"static_(?P<static>[tk])(?P<value>[0-9.]+)(?P<sw>_w[0-9]+)?)$")
METHOD_LABELS = {"dense": "dense", "static": "static (L1)", "manidp": "ManiDP", "fbs": "FBS-like"}
METHOD_KINDS = {"dense": DENSE_KIND, "static": STATIC_KIND, "manidp": GATED_KIND, "fbs": GATED_KIND}
STYLES = {"dense": ("k", "s"), "static": ("tab:blue", "o"), "manidp": ("tab:red", "*"), "fbs": ("tab:orange", "D")}


# ---------------------------------------------------------------------------- arguments
def _batch_sizes(text: str) -> List[int]:
    try:
        sizes = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive batch sizes, got {text!r}")
    return sizes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", required=True, help="directory of the training runs (benchmarks/fashion_mnist.py --runs)")
    p.add_argument("--engine", action="append", default=[], metavar="PATH",
                   help="a compiled engine file (DynamicResNet.save) to place as a ManiDP point, 'builtin' for the "
                        "built-in model; may be repeated")
    p.add_argument("--static-from", action="append", default=[], metavar="RESULTS_JSON",
                   help="an earlier results.json of this script: its static runs not under --runs are timed at "
                        "their recorded widths and placed at their recorded top-1; may be repeated")
    p.add_argument("--out", default="benchmarks/results/accuracy_latency", help="output directory")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=[1, 64])
    p.add_argument("--threads", type=int, default=2, help="CPU threads of torch, the engine, ONNX Runtime and OpenVINO")
    p.add_argument("--data", default="fashion-mnist",
                   help="timing images: 'fashion-mnist' (test images), 'synthetic', or what manidp-bench --data takes")
    p.add_argument("--backends", default=None,
                   help="comma-separated gated engine backends to time (default: every one available on the CPU "
                        "but the Triton interpreter)")
    # As manidp-bench on the CPU: the time budget, not a count of a few dozen calls, ends a
    # sub-millisecond measurement.
    p.add_argument("--warmup", type=int, default=10, help="warm-up iterations per measurement")
    p.add_argument("--iters", type=int, default=1000, help="maximum timed iterations per measurement")
    p.add_argument("--min-iters", type=int, default=3, help="timed iterations done even past --time-budget")
    p.add_argument("--time-budget", type=float, default=1.5, help="seconds per measurement (0: exactly --iters)")
    p.add_argument("--num-batches", type=int, default=4, help="distinct input batches rotated during timing")
    p.add_argument("--rounds", type=int, default=2,
                   help="times every method of a run is timed, in alternating order; the best round counts")
    p.add_argument("--eval-batch-size", type=int, default=256, help="batch size of the engine's test-set evaluation")
    args = p.parse_args(argv)
    if min(args.threads, args.iters, args.min_iters, args.num_batches, args.rounds) < 1 or args.warmup < 0:
        p.error("--threads, --iters, --min-iters, --num-batches and --rounds must be >= 1, --warmup >= 0")
    return args


def resolve_backends(spec: Optional[str]) -> List[str]:
    """The gated backends to time: ``spec``'s names, each available on the CPU, or every available one."""
    available = available_backends(CPU, torch.float32)
    if spec is None:
        # Triton on CPU tensors is its interpreter, a test tool, far too slow to time.
        return [b for b in available if b != "triton"]
    names = [b.strip() for b in spec.split(",") if b.strip()]
    if not names or any(b not in available for b in names):
        raise BenchError(f"--backends {spec!r}: expected names among {', '.join(available)}")
    return names


# ---------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One training run directory and what its name says."""
    arch: str
    seed: int
    method: str                 # dense, static, manidp, fbs
    setting: Optional[str]      # "t0.6", "t0.6_w50", "k0.5" or None (dense); an engine file's name
    path: str
    engine_file: bool = False   # path is a compiled engine (--engine), not a run directory
    recorded: Optional[dict] = None  # a static run of an earlier results.json (--static-from): widths, top-1
    recorded_in: Optional[str] = None

    @property
    def name(self) -> str:
        if self.recorded is not None:
            return self.recorded["run"]
        return self.setting if self.engine_file else f"{self.arch}_s{self.seed}/{os.path.basename(self.path)}"

    @property
    def kind(self) -> str:
        return METHOD_KINDS[self.method]

    @property
    def label(self) -> str:
        """The method and its setting as the tables show them (``static (L1) at ManiDP t0.6 FLOPs``)."""
        if self.method == "static" and self.setting.startswith("t"):
            return f"{METHOD_LABELS['static']} at ManiDP {self.setting} FLOPs"
        return METHOD_LABELS[self.method] + (f" {self.setting}" if self.setting else "")


@dataclass
class LoadedRun:
    """A finished run: its final log line, the network rebuilt from ``last.pth``, and its data."""
    run: Run
    log: dict
    model: nn.Module
    checkpoint: dict
    engine_eval: dict = field(default_factory=dict)

    @property
    def dataset(self) -> dict:
        return self.checkpoint.get("dataset") or {}

    @property
    def input_size(self) -> Tuple[int, int]:
        return tuple(self.dataset.get("input_size") or (32, 32))

    @property
    def in_channels(self) -> int:
        if isinstance(self.model, DynamicResNet):
            return int(self.model.config["in_channels"])
        return int(self.model.conv1.in_channels)

    @property
    def mac_fraction(self) -> Optional[float]:
        """Mean MACs over dense MACs on the test split, as the trainer counted them (gates counted)."""
        reduction = self.log.get("flops_reduction")
        return None if reduction is None else 1.0 - float(reduction)


def _run_of(seed_dir: str, name: str, m: re.Match) -> Run:
    arch, seed = m.group("arch"), int(m.group("seed"))
    r = RUN_DIR.match(name)
    path = os.path.join(seed_dir, name)
    if r.group("dense"):
        return Run(arch, seed, "dense", None, path)
    if r.group("method"):
        return Run(arch, seed, r.group("method"), f"t{r.group('t')}{r.group('w') or ''}", path)
    return Run(arch, seed, "static", f"{r.group('static')}{r.group('value')}{r.group('sw') or ''}", path)


def find_runs(runs_dir: str) -> Tuple[List[Run], List[dict]]:
    """(run directories found, notes on what is missing), dense runs first."""
    runs, notes = [], []
    for seed_name in sorted(os.listdir(runs_dir)):
        m = SEED_DIR.match(seed_name)
        seed_dir = os.path.join(runs_dir, seed_name)
        if not m or not os.path.isdir(seed_dir):
            continue
        names = sorted(n for n in os.listdir(seed_dir) if RUN_DIR.match(n) and os.path.isdir(os.path.join(seed_dir, n)))
        if "dense" not in names:
            notes.append({"run": f"{seed_name}/dense", "reason": "missing: no dense run in this directory"})
        runs += [_run_of(seed_dir, n, m) for n in names]
    return sorted(runs, key=_run_order), notes


def _run_order(r: Run) -> tuple:
    return {DENSE_KIND: 0, STATIC_KIND: 1, GATED_KIND: 2}[r.kind], r.arch, r.seed, r.name


def engine_run(spec: str) -> Run:
    """The ManiDP point of an ``--engine`` argument: a compiled engine file, or ``builtin``.

    Its seed is the training seed the built-in model records, 0 for other files.
    Raises :class:`BenchError` when the file is missing or is not an engine.
    """
    if spec == "builtin":
        path, name = DEFAULT_MODEL_PATH, "built-in model"
        seed = int((default_model_info().get("training_args") or {}).get("manualSeed", 0))
    else:
        path, name, seed = spec, os.path.basename(spec), 0
    if not os.path.isfile(path):
        raise BenchError(f"--engine {spec!r}: expected a compiled engine file (DynamicResNet.save) or 'builtin'; "
                         f"{path} does not exist")
    try:
        config = DynamicResNet.load(path, backend="reference").config
    except Exception as e:  # any unreadable file is a usage error, named
        raise BenchError(f"--engine {spec!r}: not a compiled engine file: {type(e).__name__}: {e}") from None
    return Run(config["arch"].removeprefix("dy"), seed, "manidp", name, path, engine_file=True)


def recorded_static_runs(path: str, found: List[Run]) -> List[Run]:
    """The static runs recorded in the results.json ``path`` whose names are not among ``found``.

    Raises :class:`BenchError` when ``path`` is not a results.json of this script.
    """
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise BenchError(f"--static-from {path!r}: expected a results.json of this script: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BenchError(f"--static-from {path!r}: expected a results.json of this script (format {FORMAT})")
    names = {r.name for r in found}
    runs = []
    for rec in doc.get("runs") or []:
        if rec.get("kind") != STATIC_KIND or rec.get("run") in names:
            continue
        if not rec.get("widths") or rec.get("top1") is None:
            raise BenchError(f"--static-from {path!r}: static run {rec.get('run')!r} records no widths or top-1")
        runs.append(Run(rec["arch"], int(rec["seed"]), "static", rec["setting"], rec["path"], recorded=rec,
                        recorded_in=rec.get("recorded_in") or path))
        names.add(rec["run"])
    return runs


def load_recorded_run(run: Run, dense: Dict[Tuple[str, int], LoadedRun]) -> Tuple[Optional[LoadedRun], Optional[str]]:
    """A recorded static run cut to its widths from the dense run of its architecture and seed."""
    base = dense.get((run.arch, run.seed))
    if base is None:
        return None, f"recorded in {run.recorded_in}: no finished dense {run.arch} seed {run.seed} run to cut it from"
    try:
        model = static_pruned_like(base.model, widths=run.recorded["widths"]).eval()
    except ValueError as e:
        return None, f"recorded in {run.recorded_in}: widths {run.recorded['widths']} do not fit: {e}"
    rec = run.recorded
    mac = rec.get("mac_fraction")
    log = {"top1": rec["top1"], "epoch": rec.get("epoch"), "flops_reduction": None if mac is None else 1.0 - mac}
    return LoadedRun(run, log, model, base.checkpoint), None


def load_engine_run(run: Run) -> LoadedRun:
    """An engine file as a loaded run; its log (top-1, FLOPs reduction) is filled in when it is evaluated."""
    engine = DynamicResNet.load(run.path, backend="reference")
    dataset = (engine.config.get("preprocess") or {}).get("dataset") or "fashion-mnist"
    ckpt = {"args": {"dataset": dataset}, "dataset": {"name": dataset, "input_size": engine.config["input_size"]}}
    return LoadedRun(run, {}, engine.eval(), ckpt)


def last_log_line(path: str) -> Optional[dict]:
    """The last JSON line of ``path``, or None if there is none."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    return json.loads(lines[-1]) if lines else None


def unfinished_reason(run: Run, log: Optional[dict]) -> Optional[str]:
    """Why ``run`` cannot be used (not started, unfinished), or None when it has finished."""
    if log is None:
        return "missing: no log.jsonl line (not started)"
    if not os.path.isfile(os.path.join(run.path, "last.pth")):
        return f"unfinished: log.jsonl ends at epoch {log.get('epoch', '?')} and there is no last.pth"
    if "top1" not in log:
        return "log.jsonl's last line has no top1"
    return None


def rebuild(run: Run, ckpt: dict) -> nn.Module:
    """The network of ``run``'s checkpoint; ValueError when it is not the kind the directory name says."""
    path = os.path.join(run.path, "last.pth")
    model = rebuild_model(ckpt, path)
    gated = any(True for _ in model.gates()) if hasattr(model, "gates") else False
    kind = STATIC_KIND if isinstance(model, StaticPrunedResNet) else GATED_KIND if gated else DENSE_KIND
    if kind != run.kind:
        raise ValueError(f"{path} holds a {kind} network; a {run.method} run should hold a {run.kind} one")
    return model.eval()


def load_run(run: Run, dense: Dict[Tuple[str, int], LoadedRun]) -> Tuple[Optional[LoadedRun], Optional[str]]:
    """(the loaded run, None) or (None, why it is skipped); ``dense``: the dense runs loaded so far."""
    if run.recorded is not None:
        return load_recorded_run(run, dense)
    if run.engine_file:
        return load_engine_run(run), None
    log = last_log_line(os.path.join(run.path, "log.jsonl"))
    reason = unfinished_reason(run, log)
    if reason is not None:
        return None, reason
    try:
        ckpt = read_checkpoint(os.path.join(run.path, "last.pth"))
        return LoadedRun(run, log, rebuild(run, ckpt), ckpt), None
    except (CheckpointError, ValueError, KeyError, TypeError) as e:
        return None, f"cannot rebuild the network from last.pth: {e}"


# ---------------------------------------------------------------------------- timing
class Bench:
    """Times runs at every batch size on the same images, and keeps each architecture's best dense time."""

    def __init__(self, args, backends: List[str]):
        self.args, self.backends = args, backends
        self.workspace = Workspace()
        self.plan = TimingPlan(CPU, torch.float32, args.iters, TimeShare(0.0, args.time_budget, args.warmup,
                                                                         args.min_iters), "forward", self.workspace,
                               args.rounds)
        self.pools: Dict[tuple, torch.Tensor] = {}
        self.best_dense: Dict[Tuple[str, int], Dict[int, dict]] = {}  # (arch, seed) -> batch size -> best dense
        self.data_info: Dict[tuple, dict] = {}
        self.test_splits: Dict[tuple, object] = {}

    def test_split(self, lr: LoadedRun):
        """The test split ``lr`` was evaluated on during training (its recorded dataset and subsets)."""
        args = lr.checkpoint.get("args") or {}
        key = tuple(args.get(k) for k in ("dataset", "data_path", "train_subset", "test_subset", "image_size"))
        if key not in self.test_splits:
            self.test_splits[key] = build_dataset(*key).test
        return self.test_splits[key]

    def batches(self, lr: LoadedRun, bs: int) -> List[torch.Tensor]:
        """``--num-batches`` rotated batches of the timing images, preprocessed as the run's dataset is."""
        spec = preprocess_spec(lr.dataset.get("name", ""))
        key = (lr.in_channels, lr.input_size, json.dumps(spec, sort_keys=True))
        if key not in self.pools:
            count = max(self.args.batch_sizes) * self.args.num_batches
            self.pools[key], self.data_info[key] = load_images(self.args.data, lr.in_channels, lr.input_size, count,
                                                               preprocess=spec)
        return rotated_batches(self.pools[key], bs, self.args.num_batches)

    def time(self, lr: LoadedRun, methods, bs: int) -> Dict[str, dict]:
        return time_at_batch_size(methods, self.batches(lr, bs), self.plan)

    def close(self) -> None:
        self.workspace.close()


def _winner_fields(results: Dict[str, dict], winner: Optional[str]) -> dict:
    r = results.get(winner) or {}
    return {"latency_ms": r.get("median_ms"), "runtime": winner, "runtime_version": r.get("runtime_version"),
            "load_average": r.get("load_average")}


def _point(lr: LoadedRun, bs: int, results: Dict[str, dict], winner: Optional[str]) -> dict:
    run = lr.run
    return {"batch_size": bs, "run": run.name, "arch": run.arch, "seed": run.seed, "method": run.method,
            "setting": run.setting, "label": run.label, "kind": run.kind, "top1": float(lr.log["top1"]),
            "recorded_in": run.recorded_in,
            "engine_top1": lr.engine_eval.get("engine_top1"), "mac_fraction": lr.mac_fraction,
            **_winner_fields(results, winner), "timings": results}


def _dense_methods(lr: LoadedRun, bench: Bench):
    """The dense runtimes of a dense or static run (dense ones with the engine, every gate open, too)."""
    engines = open_engines(gated_twin(lr.model), bench.backends) if lr.run.kind == DENSE_KIND else None
    return dense_runtime_methods(lr.model, lr.run.name.replace("/", "_"), engines)


def _reference_dense(lr: LoadedRun, bench: Bench, bs: int) -> dict:
    """The best dense time of ``lr``'s architecture in this run: its seed's dense run, else another seed's;
    for a gated run without either, its own backbone timed now (with its engine, every gate open)."""
    arch = lr.run.arch
    found = bench.best_dense.get((arch, lr.run.seed)) or next(
        (v for (a, _), v in sorted(bench.best_dense.items()) if a == arch), {})
    if bs in found:
        return found[bs]
    if lr.run.kind != GATED_KIND or lr.run.engine_file:  # an engine file has no backbone model to time
        return {"run": None, "runtime": None, "median_ms": None}
    methods = dense_runtime_methods(dense_model_from_gated(lr.model), f"{arch}_backbone_of_" +
                                    lr.run.name.replace("/", "_"), open_engines(lr.model, bench.backends))
    results = bench.time(lr, methods, bs)
    winner = fastest(results)
    ref = {"run": f"backbone of {lr.run.name}", "runtime": winner,
           "median_ms": results[winner]["median_ms"] if winner else None, "timings": results}
    bench.best_dense.setdefault((arch, lr.run.seed), {})[bs] = ref
    return ref


def _with_speedup(point: dict, ref: dict) -> dict:
    point["best_dense"] = dict(ref)  # a gated run's own backbone brings its timings along
    ok = point["latency_ms"] and ref.get("median_ms")
    point["speedup_vs_best_dense"] = ref["median_ms"] / point["latency_ms"] if ok else None
    return point


def time_dense_like(lr: LoadedRun, bench: Bench) -> List[dict]:
    """Points of a dense or static run: the fastest dense runtime at each batch size."""
    methods = _dense_methods(lr, bench)
    points = []
    for bs in bench.args.batch_sizes:
        results = bench.time(lr, methods, bs)
        point = _point(lr, bs, results, fastest(results))
        if lr.run.kind == DENSE_KIND and point["latency_ms"] is not None:
            ref = {"run": lr.run.name, "runtime": point["runtime"], "median_ms": point["latency_ms"]}
            bench.best_dense.setdefault((lr.run.arch, lr.run.seed), {}).setdefault(bs, ref)
        points.append(_with_speedup(point, _reference_dense(lr, bench, bs)))
    return points


def time_gated(lr: LoadedRun, bench: Bench) -> List[dict]:
    """Points of a ManiDP or FBS-like run: the fastest gated backend, and the best dense time beside it."""
    if lr.run.engine_file:
        engines = {b: DynamicResNet.load(lr.run.path, backend=b) for b in bench.backends}
        deployed = DynamicResNet.load(lr.run.path)
    else:
        path = os.path.join(lr.run.path, "last.pth")
        engines = {b: compile_engine(path, backend=b) for b in bench.backends}
        deployed = compile_engine(path)
    # The deployed engine: the backend a user gets by default (backend "auto").
    lr.engine_eval = engine_accuracy(deployed, bench.test_split(lr), bench.args.eval_batch_size)
    if lr.run.engine_file:  # no training log: the deployed engine's figures are the point's
        lr.log = {"top1": lr.engine_eval["engine_top1"], "flops_reduction": 1.0 - lr.engine_eval["engine_mac_fraction"]}
    methods = gated_methods(engines)
    points = []
    for bs in bench.args.batch_sizes:
        results = bench.time(lr, methods, bs)
        point = _point(lr, bs, results, fastest(results))
        points.append(_with_speedup(point, _reference_dense(lr, bench, bs)))
    return points


def _progress(i: int, n: int, lr: LoadedRun, points: List[dict]) -> None:
    for p in points:
        ms = "-" if p["latency_ms"] is None else f"{p['latency_ms']:.3f} ms"
        dense = p["best_dense"]
        extra = "" if dense["median_ms"] is None else \
            f"; best dense {dense['median_ms']:.3f} ms ({dense['runtime']}, {dense['run']})"
        load = p["load_average"][0] if p["load_average"] else float("nan")
        print(f"[{i}/{n}] {lr.run.name} b{p['batch_size']}: top-1 {p['top1']:.2f}%, {ms} ({p['runtime']}){extra}; "
              f"load {load:.2f}", flush=True)


# ---------------------------------------------------------------------------- the frontier reading
def _fmt(p: dict) -> str:
    return f"{p['run']} ({p['latency_ms']:.3f} ms, {p['top1']:.2f}%)"


def reading(points: List[dict], bs: int) -> List[str]:
    """One plain sentence per gated point at batch size ``bs``: ahead of, or behind, every dense and static point."""
    lines = []
    timed = [p for p in points if p["batch_size"] == bs and p["latency_ms"] is not None]
    for p in (q for q in timed if q["kind"] == GATED_KIND):
        rivals = [q for q in timed if q["kind"] != GATED_KIND and q["arch"] == p["arch"]]
        better = [q for q in rivals if q["latency_ms"] <= p["latency_ms"] and q["top1"] >= p["top1"]]
        if better:
            q = max(better, key=lambda q: (q["top1"], -q["latency_ms"]))
            lines.append(f"{_fmt(p)} is **behind**: {_fmt(q)} is at least as fast and at least as accurate.")
            continue
        faster = [q for q in rivals if q["latency_ms"] <= p["latency_ms"]]
        if faster:
            q = max(faster, key=lambda q: q["top1"])
            lines.append(f"{_fmt(p)} is **ahead**: every dense or static network at least as fast is less accurate "
                         f"(the best of them: {_fmt(q)}).")
        else:
            lines.append(f"{_fmt(p)} is **ahead** on speed: it is faster than every dense and static network timed"
                         + (f" (the fastest: {_fmt(min(rivals, key=lambda q: q['latency_ms']))})" if rivals else "")
                         + ".")
    return lines


# ---------------------------------------------------------------------------- outputs
def static_frontier(points: List[dict]) -> List[dict]:
    """The static points no faster static point matches in top-1, by latency: the line a static user can reach."""
    line = []
    for p in sorted(points, key=lambda p: (p["latency_ms"], -p["top1"])):
        if not line or p["top1"] > line[-1]["top1"]:
            line.append(p)
    return line


def plot(points: List[dict], bs: int, path: str) -> None:
    """``path``: top-1 against latency at batch size ``bs``, one panel per architecture, the static frontier a line."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    pts = [p for p in points if p["batch_size"] == bs and p["latency_ms"] is not None]
    archs = sorted({p["arch"] for p in pts}) or ["(no runs)"]
    fig, axes = plt.subplots(1, len(archs), figsize=(6.5 * len(archs), 4.8), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        mine = [p for p in pts if p["arch"] == arch]
        line = static_frontier([p for p in mine if p["method"] == "static"])
        if len(line) > 1:
            ax.plot([p["latency_ms"] for p in line], [p["top1"] for p in line], "-", color=STYLES["static"][0],
                    alpha=0.6, zorder=1, label="static frontier")
        for method, (colour, marker) in STYLES.items():
            sel = [p for p in mine if p["method"] == method]
            if sel:
                ax.scatter([p["latency_ms"] for p in sel], [p["top1"] for p in sel], c=colour, marker=marker,
                           s=90 if marker == "*" else 50, label=METHOD_LABELS[method], zorder=2)
            for p in sel:
                ax.annotate(f"{p['setting'] or ''} s{p['seed']}".strip(), (p["latency_ms"], p["top1"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set(title=f"{arch}, batch {bs}", xlabel="latency (ms, median; fastest runtime or backend)",
               ylabel="test top-1 (%)")
        ax.grid(alpha=0.3)
        if mine:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cell(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _table(points: List[dict], bs: int) -> List[str]:
    rows = ["| arch | method | seed | top-1 % | engine top-1 % | MAC fraction | latency ms | runtime that won | "
            "best dense ms (runtime) | vs best dense (x) | load average (1 min) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {DENSE_KIND: 0, STATIC_KIND: 1, GATED_KIND: 2}
    for p in sorted((p for p in points if p["batch_size"] == bs),
                    key=lambda p: (p["arch"], order[p["kind"]], p["method"], p["setting"] or "", p["seed"])):
        dense = p["best_dense"]
        load = p["load_average"][0] if p["load_average"] else None
        mark = " (recorded)" if p.get("recorded_in") else ""
        rows.append(f"| {p['arch']} | {p['label']}{mark} | {p['seed']} | {p['top1']:.2f} | "
                    f"{_cell(p['engine_top1'], '.2f')} | {_cell(p['mac_fraction'], '.3f')} | "
                    f"{_cell(p['latency_ms'], '.3f')} | {p['runtime'] or '-'} | "
                    f"{_cell(dense['median_ms'], '.3f')} ({dense['runtime'] or '-'}) | "
                    f"{_cell(p['speedup_vs_best_dense'], '.2f')} | {_cell(load, '.2f')} |")
    return rows


def _busy_note(doc: dict) -> List[str]:
    ncpu = doc["environment"]["cpu_count"] or 1
    loads = [r["load_average"][0] for p in doc["points"] for r in p["timings"].values() if r.get("load_average")]
    busy = sum(v > ncpu for v in loads)
    if not busy:
        return [f"Every timing started with the 1-minute load average at or below the {ncpu} CPUs "
                f"(highest {max(loads, default=0):.2f})."]
    return [f"**{busy} of {len(loads)} timings started with the 1-minute load average above the {ncpu} CPUs** "
            f"(highest {max(loads):.2f}): those times are not comparable with other runs (docs/DESIGN.md 8)."]


def readme(doc: dict) -> str:
    env, s = doc["environment"], doc["settings"]
    out = ["# Accuracy against measured CPU latency", "",
           f"`{env['command_line']}`", "",
           f"{env['cpu_model']}, {s['threads']} thread(s), fp32, torch {env['torch']}, ONNX Runtime "
           f"{env.get('onnxruntime') or 'not installed'}, OpenVINO {env.get('openvino') or 'not installed'}, "
           f"engine kernel {env.get('cpu_kernel')}; {env['date']}, commit {env.get('git_commit')}"
           + (" (uncommitted changes)" if env.get("git_dirty") else "") + ".", "",
           "Each point is one trained run at the median time of the fastest way to deploy it here: dense and "
           "static networks under the fastest of PyTorch (eager, BN folded, folded channels-last), ONNX Runtime "
           "and OpenVINO (each in a child process), and, for dense networks, the engine with every gate open; "
           f"ManiDP and FBS-like networks under the fastest gated engine backend ({', '.join(s['backends'])}). "
           "*vs best dense* is the best dense time of the same architecture in this run over the point's time. "
           "Top-1 is the run's final test top-1 (log.jsonl); *engine top-1* is the deployed engine on the same "
           f"test split" + ("; an engine file (--engine) has no log, and its top-1 is the deployed engine's on the "
                            "whole test split" if s.get("engine") else "") +
           f". Timing images: {s['data']}, {s['num_batches']} batches rotated.", ""]
    recorded = sorted({p["recorded_in"] for p in doc["points"] if p.get("recorded_in")})
    if recorded:
        out += [f"Rows marked *(recorded)* are static runs of {', '.join(recorded)} whose checkpoints are not here "
                "(--static-from): their top-1 and MAC fraction are the recorded ones, and the network timed is "
                "cut to their recorded widths from this run's dense network of the same seed (a dense runtime's "
                "time depends on the widths, not on the weights).", ""]
    out += _busy_note(doc) + [""]
    for bs in s["batch_sizes"]:
        out += [f"## Batch {bs}", "", f"![top-1 against latency, batch {bs}](b{bs}.png)", ""]
        out += _table(doc["points"], bs) + [""]
        lines = reading(doc["points"], bs)
        out += ["Where ManiDP and FBS-like stand against every dense and static network of the same architecture:",
                ""] + [f"- {line}" for line in lines] + [""] if lines else ["No gated run was timed.", ""]
    differ = [r for r in doc["runs"] if r.get("engine_top1") is not None and r["engine_top1"] != r["top1"]]
    if differ:
        out += ["## Deployed engine against the training log", ""]
        out += [f"- {r['run']}: the deployed engine's top-1 {r['engine_top1']:.2f}% differs from the log's "
                f"{r['top1']:.2f}%." for r in differ] + [""]
    if doc["skipped"]:
        out += ["## Skipped runs", ""] + [f"- {n['run']}: {n['reason']}" for n in doc["skipped"]]
    return "\n".join(out) + "\n"


def _run_record(lr: LoadedRun) -> dict:
    r = lr.run
    return {"run": r.name, "path": r.path, "arch": r.arch, "seed": r.seed, "method": r.method, "setting": r.setting,
            "kind": r.kind, "top1": float(lr.log["top1"]), "mac_fraction": lr.mac_fraction,
            "recorded_in": r.recorded_in,
            "epoch": lr.log.get("epoch"), "widths": list(lr.model.widths) if r.kind == STATIC_KIND else None,
            **{k: lr.engine_eval.get(k) for k in ("engine_top1", "engine_images", "engine_backend",
                                                  "engine_mac_fraction")}}


def write_outputs(doc: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    for bs in doc["settings"]["batch_sizes"]:
        plot(doc["points"], bs, os.path.join(out_dir, f"b{bs}.png"))
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(readme(doc))


# ---------------------------------------------------------------------------- main
def measure_runs(runs: List[Run], bench: Bench) -> Tuple[List[dict], List[dict], List[dict]]:
    """(run records, points, skipped notes) of every run, in order."""
    records, points, skipped = [], [], []
    dense: Dict[Tuple[str, int], LoadedRun] = {}
    for i, run in enumerate(runs, 1):
        lr, reason = load_run(run, dense)
        if lr is None:
            print(f"[{i}/{len(runs)}] {run.name}: skipped, {reason}", flush=True)
            skipped.append({"run": run.name, "reason": reason})
            continue
        try:
            new = time_gated(lr, bench) if run.kind == GATED_KIND else time_dense_like(lr, bench)
        except (DatasetError, CheckpointError, ValueError, RuntimeError) as e:
            reason = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"[{i}/{len(runs)}] {run.name}: skipped, {reason}", flush=True)
            skipped.append({"run": run.name, "reason": reason})
            continue
        _progress(i, len(runs), lr, new)
        if run.kind == DENSE_KIND:
            dense.setdefault((run.arch, run.seed), lr)
        records.append(_run_record(lr))
        points += new
    return records, points, skipped


def run(args, argv: List[str]) -> dict:
    """Measure every run under ``--runs``; the ``results.json`` document."""
    if not os.path.isdir(args.runs):
        raise BenchError(f"--runs {args.runs!r} is not a directory")
    bench = Bench(args, resolve_backends(args.backends))
    try:
        runs, notes = find_runs(args.runs)
        for path in args.static_from:
            runs += recorded_static_runs(path, runs)
        runs = sorted(runs, key=_run_order)  # dense runs first: recorded static runs are cut from them
        runs += [engine_run(spec) for spec in args.engine]
        for n in notes:
            print(f"{n['run']}: {n['reason']}", flush=True)
        env = dict(environment(argv, CPU, program="benchmarks/accuracy_latency.py"), runtime_isolation=ISOLATION)
        records, points, skipped = measure_runs(runs, bench)
    finally:
        bench.close()
    settings = {k: getattr(args, k) for k in ("runs", "engine", "static_from", "batch_sizes", "threads", "data", "warmup", "iters",
                                              "min_iters", "time_budget", "num_batches", "eval_batch_size")}
    settings.update(backends=bench.backends, timing_data=list(bench.data_info.values()))
    return {"format": FORMAT, "environment": env, "load_average_end": load_average(), "settings": settings,
            "runs": records, "points": points, "skipped": notes + skipped}


def main(argv=None) -> int:
    """Exit status: 0 when at least one run was measured, 1 when none was, 2 on a usage error."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        doc = run(args, argv)
    except BenchError as e:
        print(f"accuracy_latency.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    write_outputs(doc, args.out)
    print(f"wrote {args.out}/results.json, README.md and "
          f"{', '.join(f'b{bs}.png' for bs in args.batch_sizes)}: {len(doc['runs'])} runs, {len(doc['points'])} "
          f"points, {len(doc['skipped'])} skipped", flush=True)
    return 0 if doc["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
