"""``manidp-bench``: latency and throughput of dense versus gated ResNets (docs/DESIGN.md 2, 3.4, 8).

Usage::

    manidp-bench                                   # built-in model, CPU (or GPU), default sizes
    manidp-bench --model dyresnet56 --target-macs 0.45 --batch-sizes 1,8,64
    manidp-bench --model run/engine.pt --device cuda --dtype float16 --backends triton,cuda
    python -m manidp.bench --help

Per batch size it times, on the same rotated input batches, the dense network
under every runtime a user could deploy it with (PyTorch eager and its faster
variants, ONNX Runtime and OpenVINO each in a child process of its own, the
engine with every gate open), the original masked forward, the compiled engine
on every gated backend and a static narrow network of the same MACs
(:mod:`manidp.bench.methods`); every speedup is relative to the fastest dense
method of that run, and the ideal speedup is dense MACs over the mean dynamic
MACs of the timed images (gates counted).  It writes ``report.json`` (format:
``manidp/bench/schema.json``, rendered in ``docs/bench_schema.md``), ``report.md``
and ``report.png``.  Exit status: 0 on success (methods that fail at run time are
reported as ``failed``, those that cannot run here as ``skipped``), 2 on a usage
error, with one message on stderr.

Modules: :mod:`~manidp.bench.cli` (arguments and the run), :mod:`~manidp.bench.inputs`
(images), :mod:`~manidp.bench.subject` (the model under test),
:mod:`~manidp.bench.methods` (what is timed), :mod:`~manidp.bench.runtimes` (ONNX
export, ONNX Runtime and OpenVINO in child processes, :mod:`~manidp.bench.runtime_worker`),
:mod:`~manidp.bench.timing` and :mod:`~manidp.bench.loop` (the measurement loop,
shared with ``benchmarks/``), :mod:`~manidp.bench.environment`,
:mod:`~manidp.bench.report`, :mod:`~manidp.bench.schema` and :mod:`~manidp.bench.frontier`
(accuracy against measured latency, used by ``benchmarks/accuracy_latency.py``).
"""

from .cli import main
from .environment import environment
from .errors import BenchError
from .inputs import fashion_mnist_available, load_images
from .methods import dense_model_from_gated, engine_with_gates_open, folded_dense
from .report import format_table
from .runtimes import RUNTIMES, Workspace, export_onnx, time_in_child
from .schema import REPORT_SCHEMA, SCHEMA_VERSION, validate_report
from .subject import gated_model_from_engine
from .timing import graph_runner, measure, measure_interleaved, summarize_times

__all__ = ["main", "BenchError", "SCHEMA_VERSION", "REPORT_SCHEMA", "validate_report", "format_table",
           "gated_model_from_engine", "dense_model_from_gated", "folded_dense", "engine_with_gates_open",
           "export_onnx", "time_in_child", "Workspace", "RUNTIMES", "load_images",
           "fashion_mnist_available", "environment", "measure", "measure_interleaved", "summarize_times",
           "graph_runner"]
