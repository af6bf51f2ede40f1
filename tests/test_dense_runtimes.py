"""The dense baselines of manidp-bench: the ONNX export under ONNX Runtime and OpenVINO, the child process
that times them, the engine with every gate open, and the order methods are timed in."""

import importlib.metadata
import importlib.util

import pytest
import torch

from conftest import calibrated, threads
from manidp import bench
from manidp.bench import methods as bench_methods
from manidp.bench.runtimes import RUNTIMES, Workspace, missing_reason, time_in_child
from manidp.bench.timing import TimeShare
from manidp.deploy import compile as compile_engine

HAVE = {rt.tag: missing_reason(rt) is None for rt in RUNTIMES}
CPU = torch.device("cpu")
M = bench_methods.Method


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with threads(1):
        yield


def _ort_logits(path, x):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _openvino_logits(path, x):
    import openvino as ov
    core = ov.Core()
    model = core.read_model(path)
    model.reshape(list(x.shape))
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"})
    return torch.from_numpy(compiled([x.numpy()])[0].copy())


@pytest.fixture(scope="module", params=[("dyresnet20", 32, 3), ("dyresnet18", 64, 2)], ids=["resnet20", "resnet18"])
def exported(request, tmp_path_factory):
    """(folded dense network, ONNX path, inputs of a batch size other than the export's)."""
    if not HAVE["ort"]:
        pytest.skip(missing_reason(RUNTIMES[0]))
    arch, size, n = request.param
    model, x = calibrated(arch, (size, size), n=n, num_classes=7)
    net = bench.folded_dense(model)
    path = str(tmp_path_factory.mktemp("onnx") / f"{arch}.onnx")
    bench.export_onnx(net, path, x.shape)
    return net, path, x


def test_onnx_export_matches_pytorch(exported):
    net, path, x = exported
    with torch.no_grad():
        ref = net(x)
    torch.testing.assert_close(_ort_logits(path, x), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_ort_logits(path, x[:1]), ref[:1], rtol=1e-4, atol=1e-4)  # batch is dynamic
    if HAVE["openvino"]:
        torch.testing.assert_close(_openvino_logits(path, x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rt", RUNTIMES, ids=[rt.tag for rt in RUNTIMES])
def test_child_process_times_and_matches(exported, rt):
    """The worker in its own process: times every iteration, returns the first batch's logits."""
    if not HAVE[rt.tag]:
        pytest.skip(missing_reason(rt))
    net, path, x = exported
    ws = Workspace()
    try:
        batches = [x, torch.randn_like(x)]
        r = time_in_child(rt, path, ws.inputs(batches), 1, warmup=1, iters=3, min_iters=1, budget=0.0)
    finally:
        ws.close()
    assert r["status"] == "ok", r
    assert len(r["times_ms"]) == 3 and len(r["warmup_ms"]) == 1 and min(r["times_ms"]) > 0
    assert r["version"] == importlib.metadata.version(rt.dist)
    threads_key = "intra_op_num_threads" if rt.tag == "ort" else "INFERENCE_NUM_THREADS"
    assert r["settings"][threads_key] == 1
    if rt.tag == "ort":
        assert r["settings"]["batch_dimension_fixed"] and r["settings"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    if rt.tag == "openvino":
        assert r["settings"]["INFERENCE_PRECISION_HINT"] == "f32" and r["settings"]["PERFORMANCE_HINT"] == "LATENCY"
    with torch.no_grad():
        torch.testing.assert_close(r["output"], net(x), rtol=1e-4, atol=1e-4)


def test_child_process_failure_is_a_reason(tmp_path):
    ws = Workspace()
    try:
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(b"not an onnx file")
        r = time_in_child(RUNTIMES[0], str(bad), ws.inputs([torch.zeros(1, 3, 8, 8)]), 1, 0, 1, 1, 0.0)
    finally:
        ws.close()
    assert r["status"] in ("failed", "skipped") and r["reason"]
    assert "Traceback" not in r["reason"]


def test_missing_runtime_is_skipped_with_its_reason(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    reason = missing_reason(RUNTIMES[1])
    assert "openvino is not installed" in reason and "requirements.txt" in reason
    monkeypatch.undo()
    model, _ = calibrated("dyresnet20", (32, 32), n=2)
    ms = bench_methods._runtime_methods("dense", "dense", "dense", bench.folded_dense(model), "dense-eager", CPU,
                                        torch.float32)
    assert [m.name for m in ms] == ["dense-ort", "dense-openvino"]
    ms[1].skip = reason
    plan = bench_methods.TimingPlan(CPU, torch.float32, 1, TimeShare(0, 0, 0, 1), "forward", None)
    res, out = bench_methods.measure_method(ms[1], 1, [torch.zeros(1, 3, 32, 32)], plan, 1)
    ms[1].results.append(res)
    assert out is None and res["status"] == "skipped" and res["reason"] == reason
    entry = ms[1].entry()
    assert entry["status"] == "skipped" and entry["reason"] == reason and entry["isolation"] == "child-process"
    assert bench_methods._runtime_methods("dense", "dense", "dense", None, "dense-eager",
                                          torch.device("cuda"), torch.float32) == []
    bf16 = bench_methods._runtime_methods("dense", "dense", "dense", None, "dense-eager", CPU, torch.bfloat16)
    assert all("fp32 only" in m.skip for m in bf16 if HAVE[m.rt.tag])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_all_open_engine_equals_the_dense_network(backend):
    from manidp.deploy.backends import available_backends
    if backend not in available_backends(CPU, torch.float32):
        pytest.skip(f"backend {backend!r} is not available here")
    model, x = calibrated("dyresnet20", (32, 32), n=3, target_macs=0.4)
    engine = compile_engine(model, backend=backend)
    opened = bench.engine_with_gates_open(engine)
    with torch.no_grad():
        logits, stats = opened(x, return_stats=True)
        dense = bench.dense_model_from_gated(model)(x)
        _, gated_stats = engine(x, return_stats=True)
    torch.testing.assert_close(logits, dense, rtol=1e-4, atol=1e-4)
    planes = torch.tensor([b.planes for b in engine.blocks for _ in (1, 2)], dtype=stats["active"].dtype)
    assert torch.equal(stats["active"], planes.expand_as(stats["active"]))
    assert bool((gated_stats["active"] < planes).any())  # the original engine is untouched
    assert float(stats["macs"][0]) > engine.dense_macs  # the dense MACs plus the gates'


# ---------------------------------------------------------------------------- order of timing
def _fake_methods(calls):
    """Methods that record when they run: two dense, one failing, one skipped, one compared with a baseline."""
    def builder(name, value):
        def build(bs, example):
            calls.append(name)
            return lambda x: torch.full((x.shape[0], 3), value)
        return build

    def broken(bs, example):
        calls.append("broken")
        raise RuntimeError("does not run")
    return [M("dense-a", "dense", "a", builder("dense-a", 1.0)),
            M("dense-b", "dense", "b", builder("dense-b", 1.5), baseline="dense-a"),
            M("broken", "static", "fails", broken),
            M("absent", "static", "skipped", None, skip="not here"),
            M("static-c", "static", "c", builder("static-c", 0.5), baseline="dense-a")]


def _entries(order, rounds=1):
    calls = []
    methods = _fake_methods(calls)
    plan = bench_methods.TimingPlan(CPU, torch.float32, 2, TimeShare(0, 0, 0, 1), order, None, rounds)
    batches = {1: [torch.zeros(1, 3, 4, 4)], 2: [torch.zeros(2, 3, 4, 4)]}
    bench_methods.time_methods(methods, batches, plan, quiet=True)
    keep = ("name", "kind", "status", "reason", "baseline", "isolation", "runtime")
    return calls, [({k: e[k] for k in keep}, [(r["batch_size"], r["status"], r["reason"], r["max_abs_diff"],
                                              r["iters"]) for r in e["results"]]) for e in map(M.entry, methods)]


def test_timing_order_changes_no_row():
    """Reversed timing order: the same methods, rows, statuses, reasons and comparisons, in report order."""
    calls_f, forward = _entries("forward")
    calls_r, reverse = _entries("reverse")
    assert forward == reverse
    # each method at both batch sizes before the next one
    assert calls_f == ["dense-a", "dense-a", "dense-b", "dense-b", "broken", "broken", "static-c", "static-c"]
    assert calls_r == calls_f[::-1]
    rows = dict((e["name"], r) for e, r in forward)
    assert rows["dense-b"][0][3] == pytest.approx(0.5) and rows["static-c"][1][3] == pytest.approx(0.5)
    assert rows["broken"][0][1:3] == ("failed", "RuntimeError: does not run")
    assert rows["absent"][0][1:3] == ("skipped", "not here")
    with pytest.raises(ValueError):
        bench_methods.timing_order([], "sideways")
    assert bench.main.__module__ == "manidp.bench.cli"
    from manidp.bench.cli import build_parser
    assert build_parser().parse_args(["--order", "reverse"]).order == "reverse"


def test_rounds_alternate_order_and_keep_the_best():
    """Round 2 runs in the other order; each row is its best round, every round's median listed."""
    calls, rows = _entries("forward", rounds=3)
    once = ["dense-a", "dense-a", "dense-b", "dense-b", "broken", "broken", "static-c", "static-c"]
    assert calls == once + once[::-1] + once
    for entry, results in rows:
        assert len(results) == 2  # one per batch size, not per round
    assert _entries("forward", rounds=3)[1] == _entries("reverse", rounds=3)[1]
    best = bench_methods.best_round([{"status": "ok", "median_ms": 3.0, "iters": 1},
                                     {"status": "failed", "median_ms": None, "iters": 0},
                                     {"status": "ok", "median_ms": 2.0, "iters": 2}])
    assert best["median_ms"] == 2.0 and best["iters"] == 2 and best["round_medians_ms"] == [3.0, None, 2.0]
    failed = bench_methods.best_round([{"status": "failed", "median_ms": None, "reason": "x"}])
    assert failed["status"] == "failed" and failed["round_medians_ms"] == [None]
    assert [bench_methods.round_order("forward", r) for r in range(3)] == ["forward", "reverse", "forward"]
