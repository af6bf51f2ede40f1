"""Where a benchmark ran: one capture for ``manidp-bench`` and the scripts in ``benchmarks/``."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import shlex
import subprocess
from typing import List, Optional, Sequence

import numpy as np
import torch

__all__ = ["environment", "cpu_model", "cpu_kernel", "load_average", "package_version", "REPO_ROOT",
           "RUNTIME_PACKAGES"]

# The ONNX exporter's packages and the dense runtimes manidp-bench compares with (None: not installed).
RUNTIME_PACKAGES = ("onnx", "onnxscript", "onnxruntime", "openvino")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_model() -> Optional[str]:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows, else None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def cpu_kernel() -> Optional[str]:
    """The cpu backend's gathered-conv kernel ("avx512", "avx2" or "none"); None without the extension."""
    from ..deploy import ops
    return torch.ops.manidp.gconv_isa() if ops.HAVE_CPU_OPS else None


def load_average() -> Optional[List[float]]:
    """1, 5 and 15-minute load averages, or None where the OS does not report them."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def package_version(dist: str) -> Optional[str]:
    """The installed version of distribution ``dist``, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: List[str], cwd: Optional[str] = None) -> Optional[str]:
    """stdout of ``cmd`` (stripped), or None if it cannot run or fails."""
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _git(*args: str) -> Optional[str]:
    if not os.path.exists(os.path.join(REPO_ROOT, ".git")):
        return None
    return _run(["git", "-C", REPO_ROOT, *args])


def _gpu_driver() -> Optional[str]:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0] if out else None


def environment(argv: Sequence[str], device: torch.device, program: str = "manidp-bench") -> dict:
    """The ``environment`` object of a report (docs/bench_schema.md): versions (the ONNX exporter and
    runtimes included), hardware, git state, load.

    ``program`` is the first word of ``command_line``.
    """
    from .. import __version__
    cuda = device.type == "cuda"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command_line": shlex.join([program] + list(argv)),
        "argv": list(argv),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": package_version("triton"),
        "numpy": np.__version__,
        "manidp": __version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if dirty is None else bool(dirty),
        "gpu_driver": _gpu_driver() if cuda else None,
        "load_average": load_average(),
        "cpu_kernel": cpu_kernel(),
        **{dist: package_version(dist) for dist in RUNTIME_PACKAGES},
    }
