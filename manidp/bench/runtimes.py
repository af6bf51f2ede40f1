"""Dense and static networks under ONNX Runtime and OpenVINO, each timed in a child process (docs/DESIGN.md 8).

A network is exported once to ONNX (``torch.onnx.export``, the dynamo exporter,
BN already folded, batch dimension left dynamic); each measurement then runs
:mod:`manidp.bench.runtime_worker` in a process of its own on that file and the
batches of one batch size, saved to ``.npy``.  The child fixes the batch
dimension, builds the session, times with the shared loop and exits, so the
runtime's spinning thread pool ends before the next method is timed.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .errors import SkipMethod, short_error

__all__ = ["Runtime", "RUNTIMES", "ISOLATION", "missing_reason", "export_onnx", "Workspace",
           "time_in_child", "WORKER_PATH"]

WORKER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtime_worker.py")
ISOLATION = ("ONNX Runtime and OpenVINO are timed each in a child process of their own, one per "
             "(method, batch size), which exits after timing, so their spinning thread pools never run "
             "beside another method; PyTorch methods and the engine are timed in the bench process")
EXPORT_PACKAGES = ("onnx", "onnxscript")
BATCH_DIM = "batch"  # the name of the exported dynamic batch dimension


@dataclass(frozen=True)
class Runtime:
    """A runtime timed in a child process: its name in method names, its package and module."""
    tag: str          # method-name suffix: dense-<tag>
    dist: str         # the pip distribution
    module: str       # the import name
    label: str        # for descriptions


RUNTIMES = (Runtime("ort", "onnxruntime", "onnxruntime", "ONNX Runtime"),
            Runtime("openvino", "openvino", "openvino", "OpenVINO"))


def missing_reason(rt: Runtime) -> Optional[str]:
    """Why ``rt`` cannot be timed here (its package or the exporter's are not installed), or None."""
    for module, what in [(rt.module, rt.label)] + [(p, "the ONNX export") for p in EXPORT_PACKAGES]:
        if importlib.util.find_spec(module) is None:
            return (f"{module} is not installed, so {what} cannot run "
                    "(pip install -r requirements.txt installs it)")
    return None


# ---------------------------------------------------------------------------- files
def export_onnx(net: nn.Module, path: str, example_shape: Sequence[int]) -> str:
    """Write ``net`` (fp32, CPU, eval) to ``path`` as ONNX with a dynamic batch dimension; returns ``path``.

    The example batch has two images: an example of one would fix the batch dimension.
    """
    shape = (2,) + tuple(int(v) for v in example_shape[1:])
    with torch.inference_mode(False), torch.no_grad():
        model = copy.deepcopy(net).float().cpu().eval()
        example = torch.zeros(shape)
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter reports its progress on stdout
            torch.onnx.export(model, (example,), path, dynamo=True, input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim(BATCH_DIM)},), external_data=False,
                              verbose=False)
    return path


class Workspace:
    """A temporary directory holding each network's ONNX file and each batch size's inputs, made once."""

    def __init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="manidp-bench-")
        self._onnx: Dict[str, str] = {}
        self._failed: Dict[str, str] = {}
        self._inputs: Dict[tuple, str] = {}

    @property
    def path(self) -> str:
        return self._dir.name

    def onnx(self, key: str, net: nn.Module, example_shape: Sequence[int]) -> str:
        """The ONNX file of network ``key`` (exported on first use); SkipMethod if the export failed before."""
        if key in self._failed:
            raise SkipMethod(self._failed[key])
        if key not in self._onnx:
            try:
                self._onnx[key] = export_onnx(net, os.path.join(self.path, f"{key}.onnx"), example_shape)
            except Exception as e:
                self._failed[key] = f"the ONNX export of this network failed earlier ({short_error(e)})"
                raise
        return self._onnx[key]

    def inputs(self, batches: Sequence[torch.Tensor]) -> str:
        """A ``.npy`` file holding ``batches`` (fp32, NCHW) stacked, written once per list of tensors."""
        key = tuple((x.data_ptr(), tuple(x.shape)) for x in batches)
        if key not in self._inputs:
            path = os.path.join(self.path, f"inputs_{len(self._inputs)}_b{int(batches[0].shape[0])}.npy")
            np.save(path, torch.stack([x.detach().float().contiguous().cpu() for x in batches]).numpy())
            self._inputs[key] = path
        return self._inputs[key]

    def close(self) -> None:
        self._dir.cleanup()


# ---------------------------------------------------------------------------- the child
def _child_timeout(budget: float) -> Optional[float]:
    """Seconds the child may take: session set-up plus four times its time budget; None when unbudgeted."""
    return None if budget <= 0 else 120.0 + 4.0 * budget


def _parse(stdout: str, stderr: str, returncode: int) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip().startswith("{")]
    if lines:
        try:
            return json.loads(lines[-1])
        except ValueError:
            pass
    tail = [line for line in stderr.strip().splitlines() if line.strip()]
    return {"status": "failed", "reason": f"the timing process exited with status {returncode}"
            + (f": {tail[-1][:300]}" if tail else "")}


def time_in_child(rt: Runtime, model_path: str, inputs_path: str, threads: int, warmup: int, iters: int,
                  min_iters: int, budget: float) -> dict:
    """Run the worker on one ONNX file and batch size; its result object, ``output`` (first-batch logits) added."""
    out_path = inputs_path[:-len(".npy")] + f"_{rt.tag}_out.npy"
    spec = {"runtime": rt.dist, "model": model_path, "inputs": inputs_path, "output": out_path,
            "batch_dim": BATCH_DIM, "threads": int(threads), "warmup": int(warmup), "iters": int(iters),
            "min_iters": int(min_iters), "budget": float(budget)}
    spec_path = inputs_path[:-len(".npy")] + f"_{rt.tag}_spec.json"
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    try:
        p = subprocess.run([sys.executable, WORKER_PATH, spec_path], capture_output=True, text=True,
                           timeout=_child_timeout(budget))
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": "the timing process did not finish within its time limit"}
    result = _parse(p.stdout, p.stderr, p.returncode)
    if result.get("status") == "ok":
        result["output"] = torch.from_numpy(np.load(out_path))
        os.remove(out_path)
    return result

