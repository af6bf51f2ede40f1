"""Shared fixtures: calibrated random models, tiny synthetic training runs and subprocess helpers."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One intra-op thread for the training-side tests: on a shared 2-core machine
# OpenMP's spinning threads made a 2-thread run up to 20x slower than a 1-thread
# one.  Subprocesses get the same count, which the bit-exact resume tests need
# anyway (the thread count changes summation order).
THREADS = 1
# test_cpu_backend/test_ops: OpenMP's spinning threads make 2-thread runs many times slower on a
# shared 2-core machine; their test_two_threads cases cover the parallel paths.
ONE_THREAD_MODULES = {"test_models", "test_losses", "test_data", "test_train", "test_distributed",
                      "test_cpu_backend", "test_ops"}


@contextlib.contextmanager
def threads(n: int = THREADS):
    """Run the block with ``n`` torch intra-op threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(request):
    """Apply :data:`THREADS` to :data:`ONE_THREAD_MODULES` only (others keep their setting)."""
    if request.module.__name__.rsplit(".", 1)[-1] not in ONE_THREAD_MODULES:
        yield
        return
    with threads():
        yield


def pytest_configure(config):
    """Register the ``slow`` marker (slow tests still run by default; ``-m 'not slow'`` skips them)."""
    config.addinivalue_line("markers", "slow: longer end-to-end training runs (still part of the default suite)")


def load_script(name: str):
    """``benchmarks/<name>.py`` imported as a module (the scripts are not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses defined in the script look their module up
    spec.loader.exec_module(module)
    return module


def subprocess_env(**extra) -> dict:
    """Environment for a child ``python -m manidp...`` that imports this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(THREADS)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_module(module: str, args, timeout: float = 240, **env) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` to completion, capturing its output."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=timeout)


# Small enough to train in a few seconds on 2 CPU cores, big enough for gates to differ.
SYNTH = dict(dataset="synthetic", train_subset=192, test_subset=64, batch_size=32, ngpu=0, quiet=True)


@pytest.fixture(scope="session")
def dense_synthetic(tmp_path_factory) -> str:
    """Directory holding a dense resnet20 trained briefly on the synthetic set (the pretrain)."""
    from manidp.train import train
    out = tmp_path_factory.mktemp("dense_synth")
    with warnings.catch_warnings(), threads():
        warnings.simplefilter("ignore")
        train(arch="resnet20", dense=True, epochs=3, lr=0.1, save_path=str(out), manualSeed=3, **SYNTH)
    return str(out)


def gated_args(save_path, pretrain: str, **kw) -> dict:
    """Keyword arguments of a short deterministic ManiDP run on the synthetic set."""
    args = dict(SYNTH, arch="dyresnet20", epochs=3, lr=0.02, target_remain_rate=0.5, pretrain_path=pretrain,
                save_path=str(save_path), manualSeed=7, deterministic=True)
    args.update(kw)
    return args


def cli_flags(kwargs: dict) -> list:
    """The ``manidp-train`` command line equivalent to ``train(**kwargs)``."""
    flags = []
    for k, v in kwargs.items():
        if v is True:
            flags.append(f"--{k}")
        elif v is not False and v is not None:
            flags += [f"--{k}", str(v)]
    return flags


def state_dicts_equal(a: dict, b: dict) -> bool:
    """Bit-for-bit equality of two state dicts."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def threshold_margin(model, x) -> float:
    """Smallest distance between a gate value and its gate's threshold on ``x`` (eval mode)."""
    _, records = model(x, return_gates=True)
    margins = [(r.g - gate.threshold).abs().min() for gate, r in zip(model.gates(), records)]
    return float(torch.stack(margins).min())


def calibrated(arch, size, keep=0.5, n=4, seed=0, in_channels=3, num_classes=10, margin=1e-4, target_macs=None):
    """A random-weight gated model (eval mode) with realistic BN statistics and thresholds, and its input.

    Thresholds keep about ``keep`` of each gate's channels (or, with ``target_macs``, reach that
    fraction of dense MACs).  Calibration runs with batch statistics; eval mode then moves the gate
    values slightly, and once in a while one lands within rounding of its threshold, where any two
    correct implementations may disagree.  Such a draw tests rounding, not the code under test, so
    the next seed is taken until every gate value is at least ``margin`` from its threshold.
    Returns ``(model, x)`` with ``x`` of shape (n, in_channels, *size).
    """
    from manidp.calibrate import calibrate_bn, calibrate_keep_ratio, calibrate_target_macs
    from manidp.models import build_model
    for attempt in range(8):
        torch.manual_seed(seed + 1000 * attempt)
        model = build_model(arch, num_classes=num_classes, in_channels=in_channels)
        # at least 8 images: BN statistics of 2 images on 1x1 maps are degenerate, and the model
        # then amplifies its input by many orders of magnitude
        x = torch.randn(max(n, 8), in_channels, *size)
        calibrate_bn(model, x)
        if target_macs is not None:
            calibrate_target_macs(model, x, target_macs)
        else:
            calibrate_keep_ratio(model, x, keep)
        x = x[:n]
        if threshold_margin(model.eval(), x) > margin:
            break
    return model.eval(), x
