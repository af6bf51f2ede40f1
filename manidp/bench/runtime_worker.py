"""The child process that times one ONNX file under ONNX Runtime or OpenVINO (docs/DESIGN.md 8).

    python manidp/bench/runtime_worker.py SPEC.json

ONNX Runtime's and OpenVINO's thread pools keep spinning after a call, and would
steal cores from whatever is timed next in the same process; a process of its
own per measurement ends them when it exits.  It runs as a script, not as
``python -m manidp.bench...``, because importing the ``manidp`` package loads torch
and the engine, which this process does not need: it loads only numpy, the
runtime and :mod:`manidp.bench.loop` (the measurement loop every method shares).

``SPEC.json`` (written by :mod:`manidp.bench.runtimes`) holds ``runtime``
(``onnxruntime`` or ``openvino``), ``model`` (the ``.onnx`` path), ``inputs`` (a
``.npy`` array ``(num_batches, N, C, H, W)`` of float32 batches), ``output`` (where
to save the logits of the first batch, ``.npy``), ``batch_dim`` (the name of the
model's batch dimension), ``threads``, ``warmup``,
``iters``, ``min_iters`` and ``budget`` (seconds, 0: exactly ``iters``).  The last
line on stdout is one JSON object: ``status`` (``ok``, ``skipped`` when the runtime
cannot be imported, ``failed``), ``reason``, ``times_ms``, ``warmup_ms``,
``version`` and ``settings`` (what the runtime reports it uses).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from typing import Callable, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))


def _loop_module():
    """:mod:`manidp.bench.loop`, without importing the ``manidp`` package when run as a script."""
    if __package__:
        from . import loop
        return loop
    spec = importlib.util.spec_from_file_location("manidp_bench_loop", os.path.join(HERE, "loop.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _version(dist: str, module) -> str:
    try:
        import importlib.metadata
        return importlib.metadata.version(dist)
    except Exception:
        return str(getattr(module, "__version__", "unknown"))


def onnxruntime_runner(model: str, shape, threads: int, batch_dim: str) -> Tuple[Callable, str, dict]:
    """(run, version, settings): an ONNX Runtime CPU session, every graph optimisation, ``threads`` intra-op.

    The exported batch dimension ``batch_dim`` is fixed to this batch size, so the graph
    optimisations see static shapes.
    """
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_free_dimension_override_by_name(batch_dim, int(shape[0]))
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    settings = {"providers": session.get_providers(), "graph_optimization_level": "ORT_ENABLE_ALL",
                "intra_op_num_threads": threads, "inter_op_num_threads": 1, "execution_mode": "ORT_SEQUENTIAL",
                "batch_dimension_fixed": session.get_inputs()[0].shape[0] == int(shape[0])}
    return (lambda x: session.run(None, {name: x})[0]), _version("onnxruntime", ort), settings


def openvino_runner(model: str, shape, threads: int, batch_dim: str) -> Tuple[Callable, str, dict]:
    """(run, version, settings): OpenVINO on the CPU, latency hint, ``threads`` threads, fp32 inference.

    fp32 is asked for explicitly: on CPUs with bf16 units OpenVINO's default precision is bf16.
    The whole input shape is fixed (``batch_dim`` needs no name here).
    """
    import openvino as ov
    core = ov.Core()
    net = core.read_model(model)
    net.reshape([int(v) for v in shape])
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    compiled = core.compile_model(net, "CPU", config)
    request = compiled.create_infer_request()

    def run(x):
        request.infer([x], share_inputs=True)
        return request.get_output_tensor(0).data

    precision = compiled.get_property("INFERENCE_PRECISION_HINT")
    settings = {"device": "CPU", "PERFORMANCE_HINT": str(compiled.get_property("PERFORMANCE_HINT")),
                "INFERENCE_NUM_THREADS": int(compiled.get_property("INFERENCE_NUM_THREADS")),
                "INFERENCE_PRECISION_HINT": precision.get_type_name() if hasattr(precision, "get_type_name")
                else str(precision)}
    return run, _version("openvino", ov), settings


RUNNERS = {"onnxruntime": onnxruntime_runner, "openvino": openvino_runner}


def run_spec(spec: dict) -> dict:
    """Time the spec's model; the result object described in the module docstring."""
    import numpy as np
    loop = _loop_module()
    batches = np.load(spec["inputs"])
    try:
        run, version, settings = RUNNERS[spec["runtime"]](spec["model"], batches.shape[1:], int(spec["threads"]),
                                                          spec["batch_dim"])
    except ImportError as e:
        return {"status": "skipped", "reason": f"{spec['runtime']} cannot be imported here ({_short(e)})"}
    xs = [np.ascontiguousarray(b) for b in batches]
    np.save(spec["output"], np.array(run(xs[0]), dtype=np.float32, copy=True))
    times, warm = loop.measure_with(run, xs, loop.wall_timer, loop.wall_timer, int(spec["warmup"]),
                                    int(spec["iters"]), int(spec["min_iters"]), float(spec["budget"]))
    return {"status": "ok", "reason": None, "times_ms": times, "warmup_ms": warm, "version": version,
            "settings": settings}


def _short(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)
    try:
        result = run_spec(spec)
    except Exception as e:  # reported to the parent as a failed measurement
        result = {"status": "failed", "reason": _short(e)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    if sys.path and os.path.abspath(sys.path[0]) == HERE:
        sys.path.pop(0)  # the bench's own module names must not shadow anything the runtimes import
    sys.exit(main())
