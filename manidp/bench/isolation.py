"""Timing each method in a process of its own (docs/DESIGN.md 8).

On a shared machine the same code runs at different speeds in different processes,
and a method can run slower for what ran before it in the same process (thread
pools still spinning, the heap and caches left by another network).  With
``--isolation process`` (the CPU default) the bench writes the networks and the
input batches once, and :class:`MethodProcesses` then times every (method, round)
in a fresh child::

    python -m manidp.bench.isolation STATE.pt SPEC.json

The child loads ``STATE.pt`` (what :func:`manidp.bench.methods.make_methods` was
given, and every batch size's batches), rebuilds the methods, times the one named
in ``SPEC.json`` at every batch size with the measurement loop every method
shares, saves its results and first-batch logits to ``SPEC["output"]`` and exits.
ONNX Runtime and OpenVINO already run in children of their own
(:mod:`manidp.bench.runtimes`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import List, Optional, Tuple

import torch

from .errors import short_error

__all__ = ["MethodProcesses", "ISOLATIONS", "isolation_note", "main"]

ISOLATIONS = ("process", "in-process")
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def isolation_note(isolation: str) -> str:
    """The report's ``environment.runtime_isolation`` sentence for ``--isolation``."""
    runtimes = ("ONNX Runtime and OpenVINO are timed each in a child process of their own, one per "
                "(method, batch size), which exits after timing, so their spinning thread pools never run "
                "beside another method")
    if isolation == "process":
        return (f"{runtimes}; every other method (PyTorch and the engine) is timed in a child process of its "
                "own per round, at every batch size, so no method runs in a process another one ran in")
    return f"{runtimes}; PyTorch methods and the engine are timed in the bench process"


class MethodProcesses:
    """Times methods in child processes from the state written once into ``directory``."""

    def __init__(self, directory: str, make_args: dict, batches: dict, threads: int, timeout: Optional[float]):
        self.directory, self.threads, self.timeout = directory, int(threads), timeout
        self.state_path = os.path.join(directory, "methods_state.pt")
        torch.save({"make_args": make_args, "batches": batches}, self.state_path)
        self._count = 0

    def measure(self, m, batch_sizes: List[int], plan, remaining: int) -> List[Tuple[dict, Optional[torch.Tensor]]]:
        """``(result, first-batch logits)`` of method ``m`` at every batch size, timed in a child."""
        from .methods import _empty_result
        if m.compiled and plan.cbudget is not None and plan.cbudget.exceeded:
            return [_skipped(_empty_result(bs), plan.cbudget.exceeded) for bs in batch_sizes]
        budget, warmup, min_iters = plan.share.limits(remaining)
        self._count += 1
        spec = {"method": m.name, "batch_sizes": batch_sizes, "threads": self.threads, "iters": plan.iters,
                "budget": budget, "warmup": warmup, "min_iters": min_iters,
                "output": os.path.join(self.directory, f"method_{self._count}.pt")}
        spec_path = os.path.join(self.directory, f"method_{self._count}.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        failure = self._run(spec_path, budget, len(batch_sizes))
        if failure is not None:
            return [({**_empty_result(bs), "status": "failed", "reason": failure}, None) for bs in batch_sizes]
        saved = torch.load(spec["output"], weights_only=False)
        os.remove(spec["output"])
        for res in saved["results"]:
            if plan.cbudget is not None and res.get("compile_s"):
                plan.cbudget.spent(res["compile_s"])
        return list(zip(saved["results"], saved["outputs"]))

    def _run(self, spec_path: str, budget: float, count: int) -> Optional[str]:
        """None when the child ran; else why it failed."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        timeout = None if self.timeout is None else self.timeout + 4.0 * budget * count
        try:
            p = subprocess.run([sys.executable, "-m", "manidp.bench.isolation", self.state_path, spec_path],
                               capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "the timing process did not finish within its time limit"
        if p.returncode != 0:
            tail = [line for line in p.stderr.strip().splitlines() if line.strip()]
            return f"the timing process exited with status {p.returncode}" + (f": {tail[-1][:300]}" if tail else "")
        return None


def _skipped(res: dict, reason: str):
    res.update(status="skipped", reason=reason)
    return res, None


def run_spec(state: dict, spec: dict) -> dict:
    """The child's work: ``{"results": [...], "outputs": [...]}`` of the spec's method at its batch sizes."""
    from .methods import TimingPlan, device_inputs, make_methods, measure_at_batch_sizes
    from .timing import TimeShare
    a = state["make_args"]
    m = next(m for m in make_methods(**a) if m.name == spec["method"])
    plan = TimingPlan(a["device"], a["dtype"], int(spec["iters"]),
                      TimeShare(0, float(spec["budget"]), int(spec["warmup"]), int(spec["min_iters"])))
    sizes = spec["batch_sizes"]
    with torch.inference_mode():
        got = measure_at_batch_sizes(m, device_inputs({bs: state["batches"][bs] for bs in sizes}, plan), plan,
                                     len(sizes))
    return {"results": [res for res, _ in got], "outputs": [out for _, out in got]}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[1]) as f:
        spec = json.load(f)
    torch.set_num_threads(int(spec["threads"]))
    try:
        state = torch.load(argv[0], weights_only=False)  # written by this run's parent, in its own directory
        saved = run_spec(state, spec)
    except Exception as e:  # reported to the parent through the exit status
        print(f"manidp-bench timing process: {short_error(e)}", file=sys.stderr)
        return 1
    torch.save(saved, spec["output"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
