"""The fastest deployable runtime of a network, for accuracy-against-latency plots (docs/DESIGN.md 8.1).

A point of such a plot is one trained network at one batch size, placed at the
time of the fastest way a user could run it on this machine:

* a dense or static (narrow) network: the fastest of its dense runtimes
  (:func:`dense_runtime_methods`): PyTorch eager, BN folded, folded and
  channels-last, ONNX Runtime and OpenVINO (each in a child process of its own,
  :mod:`manidp.bench.runtimes`), and, where the network has an engine form, the
  engine with every gate open;
* a gated network: the fastest gated engine backend (:func:`gated_methods`).

Every measurement goes through :func:`manidp.bench.methods.measure_method`, the
loop ``manidp-bench`` times with, and records the load average when it starts.
:func:`engine_accuracy` gives a gated point its deployed engine's test top-1.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..data import eval_batches
from ..deploy import compile as compile_engine
from ..models import build_model, load_dense_state_dict
from .environment import load_average
from .methods import RUNTIME_SETTINGS, Method, RuntimeMethod, TimingPlan, best_round, engine_with_gates_open, \
    folded_dense, logit_agreement, measure_method, round_order, timing_order
from .runtimes import RUNTIMES, missing_reason

__all__ = ["DENSE_KIND", "GATED_KIND", "dense_runtime_methods", "gated_twin", "open_engines", "gated_methods",
           "is_dense_runtime", "engine_accuracy", "time_at_batch_size", "fastest"]

DENSE_KIND, GATED_KIND = "dense", "gated"
CL = torch.channels_last


# ---------------------------------------------------------------------------- networks
def _module_runner(net: nn.Module, channels_last: bool) -> Callable:
    """``build(batch_size, example)`` returning ``net`` in eval mode, fp32, on the CPU, in the given layout."""
    prepared = net.eval().float().cpu()
    if channels_last:  # Module.to converts in place: the NCHW method keeps its own copy
        prepared = copy.deepcopy(prepared).to(memory_format=CL)
    return lambda bs, example: prepared


def _engine_runner(engine) -> Callable:
    return lambda bs, example: engine


@torch.no_grad()
def gated_twin(dense: nn.Module) -> nn.Module:
    """The gated ResNet holding ``dense``'s weights, gates fresh: compiled and opened, it runs the dense network.

    ``dense`` is a :mod:`manidp.models` dense ResNet (``depth``, ``conv1``, ``fc``).
    """
    for attr in ("depth", "conv1", "fc"):
        if not hasattr(dense, attr):
            raise TypeError(f"expected a manidp.models dense ResNet (with depth, conv1, fc); got "
                            f"{type(dense).__name__} without {attr!r}")
    gated = build_model(f"dyresnet{dense.depth}", num_classes=dense.fc.out_features,
                        in_channels=dense.conv1.in_channels)
    load_dense_state_dict(gated, dense.state_dict())
    src = dict(dense.named_modules())
    for name, m in gated.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = src[name].eps
    return gated.eval()


def open_engines(gated: nn.Module, backends: Sequence[str]) -> Dict[str, nn.Module]:
    """``{backend: engine of gated with every gate open}`` (docs/DESIGN.md 3.4) for each backend."""
    return {name: engine_with_gates_open(compile_engine(gated, backend=name).eval()) for name in backends}


def dense_runtime_methods(net: nn.Module, key: str, engines_open: Optional[Dict[str, nn.Module]] = None
                          ) -> List[Method]:
    """Every dense runtime of ``net`` (a dense or static ResNet, BN unfolded or not), fastest unknown.

    ``key`` names the network's ONNX file in the workspace (one per network).  The first
    method, ``pytorch-eager``, is ``net`` as given and the baseline of the others' logits.
    ``engines_open``: ``{backend: engine with every gate open}`` computing the same network.
    """
    folded = folded_dense(net)
    methods = [Method("pytorch-eager", DENSE_KIND, "PyTorch eager, NCHW, the network as trained",
                      _module_runner(net, False)),
               Method("pytorch-folded", DENSE_KIND, "PyTorch eager, BN folded into conv + bias, NCHW",
                      _module_runner(folded, False), baseline="pytorch-eager"),
               Method("pytorch-folded-cl", DENSE_KIND, "PyTorch eager, BN folded, channels-last",
                      _module_runner(folded, True), layout="channels_last", baseline="pytorch-eager")]
    for rt in RUNTIMES:
        methods.append(RuntimeMethod(rt.dist, DENSE_KIND, f"BN folded, exported to ONNX, {rt.label} "
                                     f"({RUNTIME_SETTINGS[rt.tag]}), timed in a child process", rt, key, folded,
                                     baseline="pytorch-eager", skip=missing_reason(rt)))
    for backend, engine in (engines_open or {}).items():
        methods.append(Method(f"engine-open-{backend}", DENSE_KIND, f"DynamicResNet, backend {backend!r}, every "
                              "gate open: the dense network run by the engine", _engine_runner(engine),
                              backend=backend, baseline="pytorch-eager", runtime="manidp"))
    return methods


def gated_methods(engines: Dict[str, nn.Module]) -> List[Method]:
    """``engine-<backend>`` for each ``{backend: compiled gated engine}``."""
    return [Method(f"engine-{backend}", GATED_KIND, f"DynamicResNet, backend {backend!r}", _engine_runner(engine),
                   backend=backend, runtime="manidp") for backend, engine in engines.items()]


def is_dense_runtime(name: str) -> bool:
    """Whether ``name`` is one of the runtimes :func:`dense_runtime_methods` makes."""
    return name in ("pytorch-eager", "pytorch-folded", "pytorch-folded-cl") or \
        name in {rt.dist for rt in RUNTIMES} or name.startswith("engine-open-")


# ---------------------------------------------------------------------------- accuracy and timing
@torch.no_grad()
def engine_accuracy(engine, test_ds, batch_size: int) -> dict:
    """Top-1 (%) and mean MAC fraction (gates counted) of ``engine`` on ``test_ds``."""
    correct = total = 0
    macs = []
    for x, y in eval_batches(test_ds, batch_size):
        logits, stats = engine(x.contiguous(), return_stats=True)
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
        macs.append(stats["macs"].double())
    return {"engine_top1": 100.0 * correct / total, "engine_images": total, "engine_backend": engine.backend.name,
            "engine_mac_fraction": float(torch.cat(macs).mean()) / engine.dense_macs}


def time_at_batch_size(methods: Sequence[Method], batches: List[torch.Tensor], plan: TimingPlan
                       ) -> Dict[str, dict]:
    """``{method name: result}`` of every method at one batch size, ``plan.rounds`` rounds in alternating order.

    A result is ``manidp-bench``'s ``methods[].results[]`` object of the method's best round
    (lowest median; every round's median in ``round_medians_ms``) without the raw
    per-iteration lists, plus ``runtime``, ``runtime_version``, ``load_average`` (1, 5,
    15 minutes, taken as that round's measurement starts) and ``max_abs_diff`` /
    ``argmax_agreement`` of its first-batch logits against its baseline's.
    """
    bs = int(batches[0].shape[0])
    layouts = {False: batches, True: [x.contiguous(memory_format=CL) for x in batches]}
    rounds: Dict[str, List[dict]] = {m.name: [] for m in methods}
    outputs: Dict[str, torch.Tensor] = {}
    total = plan.rounds * len(methods)
    with torch.inference_mode():
        for r in range(plan.rounds):
            for m in timing_order(list(methods), round_order(plan.order, r)):
                load = load_average()
                res, out = measure_method(m, bs, layouts[m.channels_last], plan, total)
                total -= 1
                res["load_average"] = load
                rounds[m.name].append(res)
                if out is not None:
                    outputs.setdefault(m.name, out)
    results = {}
    for m in methods:
        res = best_round(rounds[m.name])
        for unused in ("times_ms", "warmup_ms", "speedup_vs_best_dense"):  # raw lists; a bench-report field
            res.pop(unused, None)
        res.update(runtime=m.runtime, runtime_version=m.runtime_version)
        results[m.name] = res
    for m in methods:
        out, ref = outputs.get(m.name), outputs.get(m.baseline)
        if out is not None and ref is not None:
            results[m.name].update(logit_agreement(out, ref))
    return results


def fastest(results: Dict[str, dict]) -> Optional[str]:
    """The name of the timed result with the lowest median, or None when none was timed."""
    ok = {name: r["median_ms"] for name, r in results.items() if r["status"] == "ok" and r.get("median_ms") is not None}
    return min(ok, key=ok.get) if ok else None
