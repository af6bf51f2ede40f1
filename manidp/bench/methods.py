"""What ``manidp-bench`` times, and timing each of them (docs/DESIGN.md 3.4, 8).

``dense-*``   the dense network with the same weights: eager with BN (``dense-eager``), BN
              folded (``dense-folded``), folded and channels-last (``dense-folded-cl``), and
              that compiled (``dense-compile``) or replayed as a CUDA graph (``dense-cl-graph``);
              on the CPU in fp32 also the folded network exported to ONNX under ONNX Runtime
              (``dense-ort``) and OpenVINO (``dense-openvino``), each timed in a child process
              (:mod:`manidp.bench.runtimes`);
``gated-<backend>-open``  the compiled engine with every gate open: the dense network run by the
              engine (kind ``dense``, so it competes for best dense);
``masked``    the original ManiDP forward (the gated model in eval mode: dense convs times
              the mask);
``gated-*``   the compiled engine on every backend, and on the GPU ``gated-<backend>-graph``;
``static-*``  the static narrow network of about the same MACs (:mod:`manidp.static_pruning`),
              in the PyTorch variants and, on the CPU, under ONNX Runtime and OpenVINO.

In-process methods' ``build(batch_size, example)`` returns a runner ``f(x) -> logits``;
:class:`RuntimeMethod` times in a child process instead.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import __version__ as MANIDP_VERSION
from ..models import build_model, load_dense_state_dict
from ..static_pruning import keep_for_target_macs, static_pruned_like
from .errors import MethodFailed, SkipMethod, short_error
from .environment import package_version
from .runtimes import RUNTIMES, Runtime, Workspace, missing_reason, time_in_child
from .timing import TimeShare, engine_graph_runner, graph_runner, measure, summarize_times, sync

__all__ = ["Method", "RuntimeMethod", "CompileBudget", "TimingPlan", "dense_model_from_gated", "folded_dense",
           "engine_with_gates_open", "static_network", "make_methods", "measure_method", "device_inputs",
           "measure_at_batch_sizes", "time_methods", "timing_order", "round_order", "best_round", "logit_agreement"]

CL = torch.channels_last


# ---------------------------------------------------------------------------- networks
def dense_model_from_gated(model: nn.Module) -> nn.Module:
    """``manidp.models.resnetXX`` holding the gated model's backbone weights (gates dropped)."""
    dense = build_model(f"resnet{model.depth}", num_classes=model.fc.out_features,
                        in_channels=model.conv1.in_channels)
    load_dense_state_dict(dense, {k: v for k, v in model.state_dict().items()
                                  if ".gate1." not in k and ".gate2." not in k})
    src = dict(model.named_modules())
    for name, m in dense.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = src[name].eps  # engine reconstructions use eps 0
    return dense.eval()


def folded_dense(model) -> nn.Module:
    """The dense network of ``model`` (gated or dense ResNet, or an engine) with BN folded into conv + bias."""
    return static_pruned_like(model, 1.0, fold_bn=True).eval()


@torch.no_grad()
def engine_with_gates_open(engine) -> nn.Module:
    """A copy of ``engine`` whose every gate keeps every channel at gate value 1: the dense network.

    fc2's weights are zeroed and its bias set to 1, so every gate value is exactly 1
    (``clamp_max`` raised to 1 where it is lower) and every channel is active
    (threshold -inf); the mask then scales nothing.  The gates still run, as they
    would in the deployed engine.
    """
    eng = copy.deepcopy(engine)
    eng.config["clamp_max"] = max(float(eng.config["clamp_max"]), 1.0)
    for blk in eng.blocks:
        for gate in (blk.gate1, blk.gate2):
            gate.fc2.zero_()
            gate.fc2_bias.fill_(1.0)
            gate.threshold.fill_(float("-inf"))
            gate.clamp_max = max(gate.clamp_max, 1.0)
    eng.backend.prepare(eng)  # its cached layouts hold the old gate tensors; the backend's settings stay
    return eng


def _matched_widths(gated: nn.Module, batches: Sequence[torch.Tensor]) -> List[int]:
    """Per-block widths whose conv MACs equal the block's mean dynamic conv MACs over ``batches``.

    A gated block with ``a1``, ``a2`` active channels costs ``(Cin a1 + a1 a2)`` per output pixel
    and 3x3 tap; a narrow block of width ``k`` costs ``(Cin + planes) k``.
    """
    blocks = list(gated.blocks())
    cost = torch.zeros(len(blocks), dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for x in batches:
            _, recs = gated(x, return_gates=True)
            for i, blk in enumerate(blocks):
                a1 = (recs[2 * i].mask > 0).sum(1).double()
                a2 = (recs[2 * i + 1].mask > 0).sum(1).double()
                cost[i] += float((a1 * (blk.conv1.in_channels + a2)).sum())
            count += x.shape[0]
    widths = []
    for c, blk in zip(cost / max(count, 1), blocks):
        planes = blk.conv1.out_channels
        widths.append(min(planes, max(1, int(round(float(c) / (blk.conv1.in_channels + planes))))))
    return widths


def static_network(gated: nn.Module, sizing: str, fraction: float, size: Tuple[int, int],
                   batches: Sequence[torch.Tensor]) -> Tuple[nn.Module, Optional[float], str]:
    """(BN-folded static narrow network, uniform keep ratio or None, how it was sized).

    ``sizing="macs"``: the uniform keep ratio whose MACs match ``fraction`` of dense;
    ``"widths"``: per-block widths matching each block's mean dynamic conv MACs on ``batches``.
    """
    if sizing == "macs":
        keep = keep_for_target_macs(gated, fraction, size)
        return (static_pruned_like(gated, keep, fold_bn=True).eval(), keep,
                f"uniform keep ratio matching the mean dynamic MAC fraction {fraction:.3f}")
    widths = _matched_widths(gated, batches)
    return (static_pruned_like(gated, widths=widths, fold_bn=True).eval(), None,
            "per-block widths whose conv MACs equal the block's mean dynamic conv MACs")


# ---------------------------------------------------------------------------- methods
@dataclass
class TimingPlan:
    """How every measurement runs: device, dtype, iteration cap, the shared time budget, the order of methods,
    the number of rounds, the workspace of the child-process methods, and where in-process methods are timed
    (``children``: a :class:`manidp.bench.isolation.MethodProcesses` times each in a process of its own; None:
    in this process)."""
    device: torch.device
    dtype: torch.dtype
    iters: int
    share: TimeShare
    order: str = "forward"
    workspace: Optional[Workspace] = None
    rounds: int = 1
    children: Optional[object] = None
    cbudget: Optional["CompileBudget"] = None


class Method:
    """One timed variant: ``build(batch_size, example)`` returns a runner ``f(x) -> logits``.

    ``baseline``: the method whose first-batch logits this one's are compared with.
    ``runtime``: ``pytorch``, ``manidp`` (the engine), ``onnxruntime`` or ``openvino``.
    """

    isolation = "in-process"

    def __init__(self, name: str, kind: str, description: str, build: Optional[Callable], *,
                 backend: Optional[str] = None, layout: str = "nchw", cuda_graph: bool = False, compiled: bool = False,
                 baseline: Optional[str] = None, skip: Optional[str] = None, runtime: str = "pytorch"):
        self.name, self.kind, self.description, self.build = name, kind, description, build
        self.backend, self.layout, self.cuda_graph, self.compiled = backend, layout, cuda_graph, compiled
        self.baseline, self.skip, self.runtime = baseline, skip, runtime
        self.runtime_version: Optional[str] = {"pytorch": torch.__version__, "manidp": MANIDP_VERSION}.get(runtime)
        self.runtime_settings: Optional[dict] = None
        self.results: List[dict] = []

    @property
    def channels_last(self) -> bool:
        return self.layout == "channels_last"

    @property
    def engine(self) -> bool:
        """Run by the compiled engine (gated, or every gate open)."""
        return self.backend is not None

    def measure(self, bs: int, batches: List[torch.Tensor], plan: TimingPlan, remaining: int,
                res: dict) -> torch.Tensor:
        """Time this method at ``bs`` into ``res``; returns the logits of the first batch (fp32)."""
        runner = self.build(bs, batches[0])
        out = _first_output(self, runner, batches[0], res)
        budget, warmup, min_iters = plan.share.limits(remaining)
        res["budget_s"] = budget if budget > 0 else None
        if self.compiled:
            res["compile_s"] = getattr(self.build, "last_compile_s", None)
        times, warm = measure(runner, batches, plan.device, warmup, plan.iters, min_iters, budget)
        res.update(summarize_times(times, bs))
        res["times_ms"], res["warmup_ms"] = times, warm
        return out

    def _status(self) -> Tuple[str, Optional[str]]:
        """``ok`` if any batch size was timed; else the first failure's (or skip's) reason."""
        if any(r["status"] == "ok" for r in self.results):
            return "ok", None
        if self.skip is not None:
            return "skipped", self.skip
        for status in ("failed", "skipped"):
            hit = next((r for r in self.results if r["status"] == status), None)
            if hit is not None:
                return status, hit["reason"]
        return "skipped", None

    def entry(self) -> dict:
        """The report's ``methods[]`` object."""
        status, reason = self._status()
        return {"name": self.name, "kind": self.kind, "description": self.description, "backend": self.backend,
                "layout": self.layout, "cuda_graph": self.cuda_graph, "compiled": self.compiled,
                "runtime": self.runtime, "runtime_version": self.runtime_version,
                "runtime_settings": self.runtime_settings, "isolation": self.isolation, "baseline": self.baseline,
                "status": status, "reason": reason, "results": self.results}


class RuntimeMethod(Method):
    """A network exported to ONNX and timed under ONNX Runtime or OpenVINO in a child process."""

    isolation = "child-process"

    def __init__(self, name: str, kind: str, description: str, rt: Runtime, net_key: str, net: nn.Module, *,
                 baseline: Optional[str], skip: Optional[str] = None):
        super().__init__(name, kind, description, None, baseline=baseline, skip=skip, runtime=rt.dist)
        self.rt, self.net_key, self.net = rt, net_key, net
        self.runtime_version = package_version(rt.dist)

    def measure(self, bs: int, batches: List[torch.Tensor], plan: TimingPlan, remaining: int,
                res: dict) -> torch.Tensor:
        model = plan.workspace.onnx(self.net_key, self.net, batches[0].shape)
        inputs = plan.workspace.inputs(batches)
        budget, warmup, min_iters = plan.share.limits(remaining)
        res["budget_s"] = budget if budget > 0 else None
        r = time_in_child(self.rt, model, inputs, torch.get_num_threads(), warmup, plan.iters, min_iters, budget)
        if r["status"] == "skipped":
            raise SkipMethod(r["reason"])
        if r["status"] != "ok":
            raise MethodFailed(r["reason"])
        self.runtime_version, self.runtime_settings = r["version"], r["settings"]
        res.update(summarize_times(r["times_ms"], bs))
        res["times_ms"], res["warmup_ms"] = r["times_ms"], r["warmup_ms"]
        return r["output"].float()


class CompileBudget:
    """Once one ``torch.compile`` takes longer than ``budget`` seconds, later compiled methods are skipped."""

    def __init__(self, budget: float):
        self.budget, self.exceeded = budget, None

    def spent(self, seconds: float) -> None:
        if seconds > self.budget:
            self.exceeded = (f"a torch.compile took {seconds:.0f} s > --compile-budget {self.budget:.0f} s; "
                             "later compiled measurements skipped")


class _Builders:
    """``build(batch_size, example)`` functions, each network prepared once per (device, dtype, layout)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, cbudget: CompileBudget):
        self.device, self.dtype, self.cbudget = device, dtype, cbudget
        self.cache: Dict[str, object] = {}

    def _prepared(self, key: str, module_fn: Callable[[], nn.Module], channels_last: bool) -> nn.Module:
        if key not in self.cache:
            m = copy.deepcopy(module_fn()).eval().to(device=self.device, dtype=self.dtype)
            self.cache[key] = m.to(memory_format=CL) if channels_last else m
        return self.cache[key]

    def plain(self, key: str, module_fn: Callable[[], nn.Module], channels_last: bool) -> Callable:
        return lambda bs, example: self._prepared(key, module_fn, channels_last)

    def compiled(self, key: str, module_fn: Callable[[], nn.Module]) -> Callable:
        def build(bs, example):
            if self.cbudget.exceeded:
                raise SkipMethod(self.cbudget.exceeded)
            ckey = f"{key}_compiled"
            if ckey not in self.cache:
                self.cache[ckey] = torch.compile(self._prepared(key, module_fn, True), dynamic=False)
            fn = self.cache[ckey]
            t0 = time.perf_counter()
            fn(example)  # compiles for this shape
            sync(self.device)
            build.last_compile_s = time.perf_counter() - t0
            self.cbudget.spent(build.last_compile_s)
            return fn
        return build

    def graphed(self, key: str, module_fn: Callable[[], nn.Module]) -> Callable:
        return lambda bs, example: graph_runner(self._prepared(key, module_fn, True), example)

    def engine(self, engine, backend: str, graph: bool, gates_open: bool = False) -> Callable:
        def build(bs, example):
            key = f"engine_{backend}{'_open' if gates_open else ''}"
            if key not in self.cache:
                eng = copy.deepcopy(engine).to(device=self.device, dtype=self.dtype).set_backend(backend).eval()
                self.cache[key] = engine_with_gates_open(eng) if gates_open else eng
            eng = self.cache[key]
            return engine_graph_runner(eng, example) if graph else eng
        return build


def _variants(prefix: str, kind: str, descriptions: Sequence[str], net: nn.Module, b: _Builders, gpu: bool,
              compile_skip: Optional[str], baseline: Optional[str]) -> List[Method]:
    """Folded, folded channels-last, compiled and (GPU) graph-replayed variants of ``net``.

    ``descriptions``: one per variant, in that order.
    """
    src = lambda: net  # noqa: E731
    folded, folded_cl, compiled, graphed = descriptions
    first = f"{prefix}-folded"
    later = baseline or first  # a variant without a baseline of its own is compared with the folded one
    methods = [Method(first, kind, folded, b.plain(f"{prefix}_fold", src, False), baseline=baseline),
               Method(f"{prefix}-folded-cl", kind, folded_cl, b.plain(f"{prefix}_fold_cl", src, True),
                      layout="channels_last", baseline=later),
               Method(f"{prefix}-compile", kind, compiled, b.compiled(f"{prefix}_fold_cl", src),
                      layout="channels_last", compiled=True, baseline=later, skip=compile_skip)]
    if gpu:
        methods.append(Method(f"{prefix}-cl-graph", kind, graphed, b.graphed(f"{prefix}_fold_cl", src),
                              layout="channels_last", cuda_graph=True, baseline=later))
    return methods


RUNTIME_SETTINGS = {"ort": "CPUExecutionProvider, ORT_ENABLE_ALL graph optimisations, intra-op threads = the "
                           "run's threads",
                    "openvino": "CPU, PERFORMANCE_HINT LATENCY, fp32, INFERENCE_NUM_THREADS = the run's threads"}


def _runtime_methods(prefix: str, kind: str, what: str, net: nn.Module, baseline: str, device: torch.device,
                     dtype: torch.dtype) -> List[RuntimeMethod]:
    """``<prefix>-ort`` and ``<prefix>-openvino``: ``net`` exported to ONNX, each timed in a child process.

    None on the GPU (they are CPU runtimes); skipped, with the reason, where a package is
    missing or the run is not in fp32.
    """
    if device.type != "cpu":
        return []
    methods = []
    for rt in RUNTIMES:
        skip = missing_reason(rt) or (None if dtype == torch.float32 else
                                      f"{rt.label} is timed in fp32 only; this run is in {str(dtype)[6:]}")
        methods.append(RuntimeMethod(f"{prefix}-{rt.tag}", kind, f"{what}, BN folded, exported to ONNX "
                                     f"(torch.onnx, dynamo), {rt.label} ({RUNTIME_SETTINGS[rt.tag]}), timed in a "
                                     "child process", rt, prefix, net, baseline=baseline, skip=skip))
    return methods


def _engine_methods(subject, backends: List[str], b: _Builders, gpu: bool) -> List[Method]:
    """``gated-<backend>`` (and ``-graph`` on the GPU) for every backend."""
    methods = []
    for name in backends:
        methods.append(Method(f"gated-{name}", "gated", f"DynamicResNet, backend {name!r}",
                              b.engine(subject.engine, name, False), backend=name, baseline="masked",
                              runtime="manidp"))
        if gpu:
            methods.append(Method(f"gated-{name}-graph", "gated", f"DynamicResNet, backend {name!r}, CUDA graph "
                                  "replay", b.engine(subject.engine, name, True), backend=name, cuda_graph=True,
                                  baseline="masked", runtime="manidp"))
    return methods


def _open_engine_methods(subject, backends: List[str], b: _Builders) -> List[Method]:
    """``gated-<backend>-open``: the engine with every gate open, a dense method."""
    return [Method(f"gated-{name}-open", "dense", f"DynamicResNet, backend {name!r}, every gate open (gate "
                   "values 1, threshold -inf): the dense network run by the engine, gates included",
                   b.engine(subject.engine, name, False, gates_open=True), backend=name, baseline="dense-eager",
                   runtime="manidp") for name in backends]


def make_methods(subject, dense_fold: nn.Module, static_net: nn.Module, static_label: str, backends: List[str],
                 device: torch.device, dtype: torch.dtype, compile_skip: Optional[str],
                 cbudget: CompileBudget) -> List[Method]:
    """Every method, in report order: dense (PyTorch, ONNX runtimes, engine all open), masked, gated, static.

    ``compile_skip``: why compiled methods are skipped (None: they run).
    """
    gpu = device.type == "cuda"
    b = _Builders(device, dtype, cbudget)
    dense_src = "folded weights (the engine file holds no BN)" if subject.folded_only else "BN unfolded"
    methods = [Method("dense-eager", "dense", f"manidp.models.resnet{subject.gated.depth}, same weights, "
                      f"{dense_src}, NCHW, eager",
                      b.plain("dense_eager", lambda: dense_model_from_gated(subject.gated), False))]
    methods += _variants("dense", "dense", ("dense, BN folded into conv + bias, NCHW, eager",
                                            "dense, BN folded, channels-last, eager",
                                            "dense, BN folded, channels-last, torch.compile",
                                            "dense, BN folded, channels-last, CUDA graph replay"),
                         dense_fold, b, gpu, compile_skip, "dense-eager")
    methods += _runtime_methods("dense", "dense", "dense", dense_fold, "dense-eager", device, dtype)
    methods += _open_engine_methods(subject, backends, b)
    methods.append(Method("masked", "masked", "original ManiDP forward: dense convs times the gate mask "
                          "(gated model, eval mode)", b.plain("masked", lambda: subject.gated, False)))
    methods += _engine_methods(subject, backends, b, gpu)
    static = f"static narrow network ({static_label})"
    methods += _variants("static", "static", (f"{static}, BN folded, NCHW", f"{static}, BN folded, channels-last",
                                              f"{static}, BN folded, channels-last, torch.compile",
                                              f"{static}, BN folded, channels-last, CUDA graph replay"),
                         static_net, b, gpu, compile_skip, None)
    return methods + _runtime_methods("static", "static", static, static_net, "static-folded", device, dtype)


# ---------------------------------------------------------------------------- timing every method
def _empty_result(bs: int) -> dict:
    return {"batch_size": bs, "status": "ok", "reason": None, "times_ms": [], "warmup_ms": [],
            "median_ms": None, "p90_ms": None, "mean_ms": None, "min_ms": None, "std_ms": None,
            "iters": 0, "throughput_ips": None, "speedup_vs_best_dense": None,
            "max_abs_diff": None, "argmax_agreement": None, "mean_macs": None, "budget_s": None}


def _first_output(m: Method, runner: Callable, x: torch.Tensor, res: dict) -> torch.Tensor:
    """Logits on the first batch (fp32 copy); engine methods outside CUDA graphs also record their mean MACs."""
    if m.engine and not m.cuda_graph:
        out, stats = runner(x, return_stats=True)
        res["mean_macs"] = float(stats["macs"].double().mean())
    else:
        out = runner(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.detach().float().clone()


def measure_method(m: Method, bs: int, batches: List[torch.Tensor], plan: TimingPlan,
                   remaining: int) -> Tuple[dict, Optional[torch.Tensor]]:
    """(one ``methods[].results[]`` object, first-batch logits or None): ``m`` at batch size ``bs``.

    Failures and skips are results too.
    """
    res = _empty_result(bs)
    out = None
    try:
        if m.skip is not None:
            raise SkipMethod(m.skip)
        out = m.measure(bs, batches, plan, remaining, res)
    except SkipMethod as e:
        res["status"], res["reason"] = "skipped", str(e)
    except MethodFailed as e:
        res["status"], res["reason"] = "failed", str(e)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a method failing at run time is a result, not a crash
        res["status"], res["reason"] = "failed", short_error(e)
        if plan.device.type == "cuda":
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
    return res, out


def logit_agreement(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """``max_abs_diff`` and ``argmax_agreement`` of a method's logits against its baseline's (report fields)."""
    return {"max_abs_diff": float((out - ref).abs().max()),
            "argmax_agreement": float((out.argmax(1) == ref.argmax(1)).float().mean())}


def _compare(methods: List[Method], bs: int, outputs: Dict[str, torch.Tensor]) -> None:
    """Each method's result at ``bs`` gets its logits' difference from its baseline's (both timed at ``bs``)."""
    for m in methods:
        out, ref = outputs.get(m.name), outputs.get(m.baseline)
        if out is None or ref is None:
            continue
        next(r for r in m.results if r["batch_size"] == bs).update(logit_agreement(out, ref))


def timing_order(methods: List[Method], order: str) -> List[Method]:
    """The methods in the order they are timed in a round: ``forward`` (report order) or ``reverse``."""
    if order not in ("forward", "reverse"):
        raise ValueError(f"order must be 'forward' or 'reverse'; got {order!r}")
    return list(methods) if order == "forward" else list(reversed(methods))


def round_order(order: str, r: int) -> str:
    """Round ``r``'s order: ``order`` in even rounds, the other one in odd rounds."""
    return order if r % 2 == 0 else {"forward": "reverse", "reverse": "forward"}[order]


def best_round(results: List[dict]) -> dict:
    """The result of the round with the lowest median (the first one if none was timed), with every round's
    median (None where that round was not timed) in ``round_medians_ms``."""
    ok = [r for r in results if r["status"] == "ok"]
    best = dict(min(ok, key=lambda r: r["median_ms"]) if ok else results[0])
    best["round_medians_ms"] = [r["median_ms"] if r["status"] == "ok" else None for r in results]
    return best


def device_inputs(cpu_batches: Dict[int, List[torch.Tensor]], plan: TimingPlan) -> Dict[int, Dict[bool, list]]:
    """Every batch size's batches on the run's device and dtype, NCHW (False) and channels-last (True)."""
    inputs = {}
    for bs, xs in cpu_batches.items():
        nchw = [x.to(device=plan.device, dtype=plan.dtype) for x in xs]
        inputs[bs] = {False: nchw, True: [x.contiguous(memory_format=CL) for x in nchw]}
    return inputs


def measure_at_batch_sizes(m: Method, inputs: Dict[int, Dict[bool, list]], plan: TimingPlan,
                  remaining: int) -> List[Tuple[dict, Optional[torch.Tensor]]]:
    """``(result, first-batch logits)`` of ``m`` at every batch size of ``inputs`` (:func:`device_inputs`),
    timed in this process."""
    if plan.device.type == "cuda":  # autotune cuDNN for the fixed-shape dense convs, not per-instance shapes
        torch.backends.cudnn.benchmark = not m.engine
    return [measure_method(m, bs, xs[m.channels_last], plan, remaining - i) for i, (bs, xs) in
            enumerate(inputs.items())]


def time_methods(methods: List[Method], cpu_batches: Dict[int, List[torch.Tensor]], plan: TimingPlan,
                 quiet: bool) -> None:
    """Time every method at every batch size, ``plan.rounds`` times; ``Method.results`` gets each batch
    size's best round.

    A round times the methods one after the other, each at every batch size, in ``plan.order``
    (odd rounds in the other order), each in a process of its own where ``plan.children`` is set
    (methods that run a runtime in a child process do so anyway).  Logits are compared with the
    baselines' once every round ran, so the order of timing changes no result but the timings.
    """
    from tqdm import tqdm
    total = plan.rounds * len(cpu_batches) * len(methods)
    inputs = device_inputs(cpu_batches, plan)
    rounds: Dict[Tuple[str, int], List[dict]] = {}
    outputs: Dict[int, Dict[str, torch.Tensor]] = {bs: {} for bs in cpu_batches}
    done = 0
    with tqdm(total=total, desc="benchmark", unit="run", file=sys.stderr, disable=quiet, leave=False,
              dynamic_ncols=True) as bar, torch.inference_mode():
        for r in range(plan.rounds):
            for m in timing_order(methods, round_order(plan.order, r)):
                bar.set_description(f"round {r + 1}/{plan.rounds} {m.name}")
                here = plan.children is None or m.isolation == "child-process" or m.skip is not None
                got = (measure_at_batch_sizes(m, inputs, plan, total - done) if here
                       else plan.children.measure(m, list(cpu_batches), plan, total - done))
                for bs, (res, out) in zip(cpu_batches, got):
                    rounds.setdefault((m.name, bs), []).append(res)
                    if out is not None:
                        outputs[bs].setdefault(m.name, out)
                done += len(cpu_batches)
                bar.update(len(cpu_batches))
    for m in methods:
        m.results = [best_round(rounds[(m.name, bs)]) for bs in cpu_batches]
    for bs in cpu_batches:
        _compare(methods, bs, outputs[bs])
