"""``manidp-bench``: latency and throughput of dense versus gated ResNets (DESIGN 2, 3.4).

Usage::

    manidp-bench                                   # built-in model, CPU (or GPU), default sizes
    manidp-bench --model dyresnet56 --target-macs 0.45 --batch-sizes 1,8,64
    manidp-bench --model run/engine.pt --device cuda --dtype float16 --backends triton,cuda
    python -m manidp.bench --help

What is timed, per batch size (every method on the same rotated input batches):

``dense-eager``        :mod:`manidp.models` ``resnetXX`` with the same weights (BN unfolded, NCHW);
                       from an engine file the weights are the folded ones (conv + BN set to
                       the exact identity, eps 0), since that is all the file holds.
``dense-folded``       the same network with BN folded into conv + bias, NCHW.
``dense-folded-cl``    folded, channels-last.
``dense-compile``      folded, channels-last, ``torch.compile`` (opt-in on CPU: ``--compile on``).
``dense-cl-graph``     folded, channels-last, captured in a CUDA graph and replayed (GPU only).
``masked``             the original ManiDP forward: dense convs, then multiply by the mask
                       (the gated training model in eval mode).
``gated-<backend>``    the compiled :class:`~manidp.deploy.DynamicResNet` on every available
                       backend (``--backends``), plus ``gated-<backend>-graph`` on GPU where the
                       backend can be captured in a CUDA graph.
``static-*``           a statically channel-pruned network (:mod:`manidp.static_pruning`) whose
                       MACs equal the mean dynamic MACs measured on the benchmark images, in the
                       same variants as the dense one (folded, channels-last, compile, graph).

"Best dense" at a batch size is the fastest ``dense-*`` method there; every speedup is
relative to it.  The ideal speedup is ``dense MACs / mean dynamic MACs`` of the instances
in that batch size's input batches (gates counted, DESIGN 1.5).

Timing: warm-up iterations are excluded; the input batches (``--num-batches``, default 4)
are rotated; on the CPU each call is timed with ``time.perf_counter``, on the GPU with
CUDA events and a synchronisation after each call.  Iterations stop at ``--iters`` or when
``--time-budget`` seconds are spent on one (method, batch size) after ``--min-iters``.
CUDA-graph methods include copying the input into the graph's static input buffer.

Exit status: 0 on success (methods that fail at run time are reported as ``failed``),
2 on a usage error (unknown backend or architecture, a file that is not a manidp model,
CUDA without a GPU, ...), with one message on stderr.

Output (``--out DIR``): ``report.json`` (schema below and in ``docs/bench_schema.md``),
``report.md`` and ``report.png``; the same table is printed on the terminal.

JSON schema (``"schema": "manidp-bench/1"``), all times in milliseconds::

    schema        "manidp-bench/1"
    environment   {date, command_line, argv, python, platform, device, device_name,
                   cpu_model, cpu_count, cpu_threads, torch, torch_cuda, cudnn, triton,
                   numpy, manidp, git_commit, git_dirty, gpu_driver, load_average, cpu_kernel}
    config        {model, model_source, arch, num_classes, in_channels, input_size, device,
                   dtype, batch_sizes, backends, backends_available, data, warmup, iters,
                   min_iters, time_budget_s, max_time_s, num_batches, compile, compile_budget_s,
                   target_macs, seed, static_sizing, tf32}
    model         {arch, dense_macs, num_gates, calibration: {target_macs, achieved,
                   calibration_images} | null, preprocess}
    data          {name, source, num_images, channels, size, note}
    macs          {dense, overall_mean_fraction,
                   per_batch_size: [{batch_size, mean_dynamic, fraction, ideal_speedup,
                                     per_instance: [..]}]}
    static        {keep, widths: [[k1, k2], ...], macs, fraction, sized_from}
    methods       [{name, kind: dense|masked|gated|static, description, backend, layout,
                    cuda_graph, compiled, status: ok|failed|skipped, reason,
                    results: [{batch_size, status, reason, times_ms: [..], warmup_ms: [..],
                               median_ms, p90_ms, mean_ms, min_ms, std_ms, iters, budget_s,
                               throughput_ips, speedup_vs_best_dense, max_abs_diff,
                               argmax_agreement, mean_macs}]}]
    summary       [{batch_size, best_dense, best_dense_median_ms, ideal_speedup, ideal_ms,
                    best_gated, best_gated_median_ms, best_gated_speedup, realized_over_ideal,
                    static_speedup}]

``max_abs_diff``/``argmax_agreement`` compare a method's logits on the first batch with
those of its baseline (``dense-eager`` for dense methods, ``masked`` for gated ones;
``null`` for the baselines and the static network).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gzip
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["main", "BenchError", "SCHEMA_VERSION", "REPORT_SCHEMA", "validate_report", "format_table",
           "gated_model_from_engine", "dense_model_from_gated", "load_images", "read_idx_images",
           "FASHION_MNIST_DIR"]

SCHEMA_VERSION = "manidp-bench/1"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROG = "manidp-bench"


class BenchError(Exception):
    """A usage error: reported as one line on stderr, exit status 2."""


class _Skip(Exception):
    """A method cannot run here; the reason goes into the report."""


# ============================================================================ arguments
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump, exit status 2 via BenchError
        raise BenchError(f"{message} (see --help)")


def _int_list(text: str) -> List[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive batch sizes, got {text!r}")
    return sorted(set(vals))


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Latency and throughput of dense versus gated (ManiDP) ResNets: "
                "dense eager/best, the original masked forward, every gated backend and a static "
                "channel-pruned network of the same MACs; writes report.json, report.md and report.png.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="a DynamicResNet file, a manidp-train checkpoint (compiled here), or a gated architecture "
                        "name (dyresnet20/32/56/110/18/34: random weights, BN calibrated on sample data). "
                        "Default: the shipped model (manidp/assets/default_model.pt) if present, else a random "
                        "dyresnet56 at --target-macs 0.45")
    p.add_argument("--target-macs", type=_fraction, default=None,
                   help="calibrate gate thresholds on sample data so mean dynamic MACs are this fraction of dense "
                        "(default 0.45 for architecture names; model files keep their thresholds unless given)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--batch-sizes", type=_int_list, default=None, help="default 1,8,64 on CPU, 1,8,64,256 on GPU")
    p.add_argument("--backends", default=None,
                   help="comma-separated gated backends (default: all available for device/dtype)")
    p.add_argument("--data", default=None,
                   help="'synthetic', 'fashion-mnist', a directory of images (or of IDX .gz files), or a .pt file "
                        "holding an image tensor. Default: the built-in model's test images, else synthetic")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations per measurement (default 2 CPU, 5 GPU)")
    p.add_argument("--iters", type=int, default=None, help="maximum timed iterations per measurement "
                   "(default 50 CPU, 200 GPU)")
    p.add_argument("--min-iters", type=int, default=3, help="timed iterations done even past --time-budget")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds per (method, batch size) after which timing stops (0: exactly --iters; "
                        "default 1.5 CPU, 1.0 GPU)")
    p.add_argument("--num-batches", type=int, default=4, help="distinct input batches rotated during timing")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the dense and static networks (auto: on for cuda, off for cpu, where "
                        "compiling on few cores takes minutes)")
    p.add_argument("--max-time", type=float, default=None,
                   help="seconds for all timing together (default 120 CPU, 600 GPU; 0: no limit): each "
                        "measurement gets at most its share of what is left, and once it is spent every "
                        "remaining measurement runs one warm-up and one timed iteration")
    p.add_argument("--compile-budget", type=float, default=180.0,
                   help="seconds: once one compilation takes longer, compiled methods are skipped from then on")
    p.add_argument("--tf32", choices=["on", "off"], default="on",
                   help="GPU fp32 only: allow TF32 in cuDNN convs and matmuls (and so in the Triton kernels) "
                        "for every method alike (on is cuDNN's default for convs)")
    p.add_argument("--static-sizing", choices=["macs", "widths"], default="macs",
                   help="static network: uniform keep ratio matching the mean dynamic MACs (macs), or per-block "
                        "widths equal to the mean active channel counts (widths)")
    p.add_argument("--calib-images", type=int, default=64, help="sample images for BN/threshold calibration")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default ./manidp-bench-<date>-<time>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--list-backends", action="store_true", help="print the backends available for "
                   "--device/--dtype and exit")
    return p


# ============================================================================ data
def read_idx_images(path: str) -> np.ndarray:
    """uint8 (N, H, W) images from an IDX3 file (``.gz`` or plain)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BenchError(f"cannot read IDX file {path!r}: {e}") from None
    if len(data) < 16 or int.from_bytes(data[:4], "big") != 2051:
        raise BenchError(f"{path!r} is not an IDX3 image file")
    n, h, w = (int.from_bytes(data[i:i + 4], "big") for i in (4, 8, 12))
    if len(data) < 16 + n * h * w:
        raise BenchError(f"IDX file {path!r} is truncated")
    return np.frombuffer(data, dtype=np.uint8, count=n * h * w, offset=16).reshape(n, h, w)


def _idx_file(directory: str) -> Optional[str]:
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte", "train-images-idx3-ubyte.gz",
                 "train-images-idx3-ubyte"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def fashion_mnist_available() -> bool:
    return _idx_file(FASHION_MNIST_DIR) is not None


def _fit_size(x: torch.Tensor, size: Tuple[int, int], pad_value: float = 0.0) -> torch.Tensor:
    """Centre-pad (if smaller) or resize (otherwise) float images to ``size``."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    H, W = size
    if h <= H and w <= W:
        top, left = (H - h) // 2, (W - w) // 2
        return F.pad(x, (left, W - w - left, top, H - h - top), value=pad_value)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _uint8_to_input(images: torch.Tensor, in_channels: int, size: Tuple[int, int], preprocess: Optional[dict],
                    mean: Optional[float] = None, std: Optional[float] = None) -> torch.Tensor:
    """uint8 (N, H, W) / (N, C, H, W) -> normalised float (N, in_channels, H', W')."""
    if images.dim() == 3:
        images = images[:, None]
    if images.shape[1] != in_channels:
        if images.shape[1] == 1:
            images = images.expand(-1, in_channels, -1, -1)
        elif in_channels == 1:
            images = images.float().mean(1, keepdim=True).round().to(torch.uint8)
        else:
            raise BenchError(f"the data has {images.shape[1]} channels; the model takes {in_channels}")
    if preprocess is not None:
        x = images.float() / float(preprocess.get("scale", 255.0))
        m = torch.tensor(preprocess.get("mean", [0.0]), dtype=torch.float32)[None, :, None, None]
        s = torch.tensor(preprocess.get("std", [1.0]), dtype=torch.float32)[None, :, None, None]
        x = (x - m) / s
        pad = int(preprocess.get("pad", 0))
        if pad:
            x = F.pad(x, (pad, pad, pad, pad), value=float(preprocess.get("pad_value", 0.0)))
        return _fit_size(x, size)
    x = images.float() / 255.0
    if mean is None:
        mean, std = float(x.mean()), float(x.std()) or 1.0
    return _fit_size((x - mean) / std, size)


def _read_image_dir(directory: str, in_channels: int, size: Tuple[int, int], limit: int) -> torch.Tensor:
    from PIL import Image
    exts = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
    names = sorted(n for n in os.listdir(directory) if n.lower().endswith(exts))
    if not names:
        raise BenchError(f"data directory {directory!r} holds no images (png/jpg/...) and no IDX files")
    arrays = []
    for name in names[:limit]:
        try:
            with Image.open(os.path.join(directory, name)) as im:
                im = im.convert("L" if in_channels == 1 else "RGB").resize((size[1], size[0]))
                a = np.asarray(im, dtype=np.uint8)
        except OSError as e:
            raise BenchError(f"cannot read image {name!r} in {directory!r}: {e}") from None
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays))


def _read_pt(path: str) -> torch.Tensor:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BenchError(f"cannot read data file {path!r} ({type(e).__name__})") from None
    if isinstance(obj, dict):
        for key in ("images", "x", "data", "inputs"):
            if isinstance(obj.get(key), torch.Tensor):
                obj = obj[key]
                break
    if isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], torch.Tensor):
        obj = obj[0]
    if not isinstance(obj, torch.Tensor) or obj.dim() not in (3, 4) or obj.shape[0] == 0:
        raise BenchError(f"data file {path!r} must hold an image tensor (N, H, W) or (N, C, H, W) "
                         "(or a dict with 'images')")
    return obj


def load_images(spec: str, in_channels: int, size: Tuple[int, int], count: int, seed: int = 0,
                preprocess: Optional[dict] = None) -> Tuple[torch.Tensor, dict]:
    """``count`` (or all available, if fewer) float32 model inputs (N, C, H, W) on the CPU, and a description."""
    gen = torch.Generator().manual_seed(seed)
    if spec == "synthetic":
        per_image = in_channels * size[0] * size[1] * 4
        n = max(1, min(count, (64 << 20) // per_image))
        scale = 0.5 + torch.rand(n, 1, 1, 1, generator=gen)
        shift = 0.5 * torch.randn(n, 1, 1, 1, generator=gen)
        x = torch.randn(n, in_channels, *size, generator=gen) * scale + shift
        return x, {"name": "synthetic", "source": None, "num_images": n, "channels": in_channels,
                   "size": list(size), "note": "Gaussian noise images with a random per-image mean and scale"}
    if spec == "fashion-mnist" or (os.path.isdir(spec) and _idx_file(spec)):
        directory = FASHION_MNIST_DIR if spec == "fashion-mnist" else spec
        path = _idx_file(directory)
        if path is None:
            raise BenchError(f"no Fashion-MNIST IDX files under {directory} "
                             "(apt-get install dataset-fashion-mnist, or use --data synthetic)")
        raw = torch.from_numpy(read_idx_images(path)[:count].copy())
        fm = spec == "fashion-mnist" or "fashion" in directory.lower()
        x = _uint8_to_input(raw, in_channels, size, preprocess,
                            FASHION_MNIST_MEAN if fm else None, FASHION_MNIST_STD if fm else None)
        return x, {"name": "fashion-mnist" if fm else "idx", "source": path, "num_images": int(x.shape[0]),
                   "channels": in_channels, "size": list(size),
                   "note": "engine preprocessing" if preprocess else
                   ("normalised (mean 0.2860, std 0.3530), padded 28->32" if fm else "normalised, fitted to size")}
    if os.path.isdir(spec):
        raw = _read_image_dir(spec, in_channels, size, count)
        x = _uint8_to_input(raw, in_channels, size, preprocess)
        return x, {"name": "image-directory", "source": os.path.abspath(spec), "num_images": int(x.shape[0]),
                   "channels": in_channels, "size": list(size), "note": "resized to the model input, normalised"}
    if os.path.isfile(spec):
        t = _read_pt(spec)[:count]
        if t.dtype == torch.uint8:
            x = _uint8_to_input(t, in_channels, size, preprocess)
            note = "uint8 images, normalised"
        else:
            x = t.float()
            if x.dim() == 3:
                x = x[:, None]
            if x.shape[1] != in_channels:
                raise BenchError(f"data file {spec!r} has {x.shape[1]} channels; the model takes {in_channels}")
            note = "float inputs used as they are"
        return x.contiguous(), {"name": "tensor-file", "source": os.path.abspath(spec), "num_images": int(x.shape[0]),
                                "channels": in_channels, "size": list(x.shape[-2:]), "note": note}
    raise BenchError(f"unknown --data {spec!r}: expected 'synthetic', 'fashion-mnist', a directory or a .pt file")


# ============================================================================ models
def _gated_arch_names() -> List[str]:
    from .models import ARCHITECTURES
    return sorted(a for a in ARCHITECTURES if a.startswith("dy"))


@torch.no_grad()
def gated_model_from_engine(engine) -> nn.Module:
    """A :mod:`manidp.models` gated ResNet computing exactly what ``engine``'s folded tensors do.

    Each conv gets the folded weight and a BN set to the exact identity plus the folded
    bias (running mean 0, variance 1, eps 0), so ``model.eval()(x)`` is the original masked
    forward and compiling the model again reproduces the engine's tensors bit for bit.
    """
    from .models import build_model
    cfg = engine.config
    model = build_model(cfg["arch"], num_classes=cfg["num_classes"], in_channels=cfg["in_channels"],
                        clamp_max=cfg["clamp_max"])
    blocks = list(model.blocks())
    if len(blocks) != len(engine.blocks) or any(
            b.conv1.in_channels != e.in_channels or b.conv1.out_channels != e.planes or b.stride != e.stride
            for b, e in zip(blocks, engine.blocks)):
        raise BenchError(f"the engine's block layout does not match a standard {cfg['arch']}")

    def put(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], w: torch.Tensor, b: torch.Tensor) -> None:
        conv.weight.copy_(w.float())
        if bn is None:
            if bool((b != 0).any()):
                raise BenchError("the engine has a shortcut bias a CIFAR ResNet cannot hold")
            return
        bn.eps = 0.0
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        bn.weight.fill_(1.0)
        bn.bias.copy_(b.float())

    put(model.conv1, model.bn1, engine.stem.weight, engine.stem.bias)
    for blk, eb in zip(blocks, engine.blocks):
        put(blk.conv1, blk.bn1, eb.conv1.weight, eb.conv1.bias)
        put(blk.conv2, blk.bn2, eb.conv2.weight, eb.conv2.bias)
        if eb.has_shortcut:
            ds = blk.downsample
            put(ds[0], ds[1] if len(ds) > 1 else None, eb.shortcut.weight, eb.shortcut.bias)
        for gate, eg in ((blk.gate1, eb.gate1), (blk.gate2, eb.gate2)):
            gate.fc1.weight.copy_(eg.fc1.float())
            gate.fc2.weight.copy_(eg.fc2.float())
            gate.fc2.bias.copy_(eg.fc2_bias.float())
            gate.threshold.copy_(eg.threshold.float())
    model.fc.weight.copy_(engine.fc.weight.float())
    model.fc.bias.copy_(engine.fc.bias.float())
    model._manidp_from_engine = True  # its weights are BN-folded ones
    return model.eval()


def dense_model_from_gated(model: nn.Module) -> nn.Module:
    """``manidp.models.resnetXX`` holding the gated model's backbone weights (gates dropped)."""
    from .models import build_model, load_dense_state_dict
    arch = f"resnet{model.depth}"
    dense = build_model(arch, num_classes=model.fc.out_features, in_channels=model.conv1.in_channels)
    sd = {k: v for k, v in model.state_dict().items() if ".gate1." not in k and ".gate2." not in k}
    load_dense_state_dict(dense, sd)
    src = dict(model.named_modules())
    for name, m in dense.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = src[name].eps  # engine reconstructions use eps 0
    return dense.eval()


class Subject:
    """The model under test: a gated nn model (fp32, CPU) and its compiled engine."""

    def __init__(self, gated: nn.Module, engine, name: str, source: str, preprocess: Optional[dict],
                 folded_only: bool):
        self.gated, self.engine, self.name, self.source = gated.eval(), engine, name, source
        self.preprocess, self.folded_only = preprocess, folded_only
        self.arch = engine.config["arch"]
        self.in_channels = int(engine.config["in_channels"])
        self.num_classes = int(engine.config["num_classes"])
        self.input_size = tuple(engine.input_size)
        self.calibration: Optional[dict] = None


def _load_model_file(path: str):
    """(gated nn model, engine or None, source, preprocess) from an engine file or a checkpoint."""
    from .deploy import DynamicResNet, EngineFormatError
    from .deploy.compile import compile as compile_engine, model_from_checkpoint
    try:
        engine = DynamicResNet.load(path, device="cpu", backend="reference")
        return gated_model_from_engine(engine), engine, "engine-file", engine.config.get("preprocess")
    except EngineFormatError as e_engine:
        first = str(e_engine)
    except FileNotFoundError:
        raise BenchError(f"no model file at {path!r}") from None
    try:
        model = model_from_checkpoint(path)
        engine = compile_engine(path, backend="reference")  # records the dataset's preprocessing and input size
    except (EngineFormatError, ValueError, KeyError, RuntimeError) as e:
        if "DynamicResNet file (expected format" in first or "not a readable" in first:
            raise BenchError(f"{path!r} is neither a DynamicResNet file nor a manidp-train checkpoint ({e})") from None
        raise BenchError(first) from None
    return model, engine, "checkpoint", engine.config.get("preprocess")


def _default_asset() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "assets", "default_model.pt")
    return path if os.path.isfile(path) else None


def _subject_from_object(obj, name: str, source: str):
    """(gated, engine, preprocess) from what ``manidp.default_model`` returned."""
    from .deploy import DynamicResNet
    if isinstance(obj, DynamicResNet):
        eng = copy.deepcopy(obj).to(device="cpu", dtype=torch.float32)
        return gated_model_from_engine(eng), eng, eng.config.get("preprocess")
    if isinstance(obj, nn.Module) and hasattr(obj, "gates"):
        return obj.float().cpu().eval(), None, getattr(obj, "preprocess", None)
    raise BenchError(f"the default model is a {type(obj).__name__}, not a DynamicResNet or gated model")


# ============================================================================ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run: Callable, batches: Sequence[torch.Tensor], device: torch.device, warmup: int, iters: int,
            min_iters: int, budget: float) -> Tuple[List[float], List[float]]:
    """Per-iteration times (ms) of ``run`` over rotated ``batches``: (timed, warm-up)."""
    warm: List[float] = []
    start = time.perf_counter()
    for i in range(warmup):
        t0 = time.perf_counter()
        run(batches[i % len(batches)])
        _sync(device)
        warm.append((time.perf_counter() - t0) * 1e3)
        if budget > 0 and time.perf_counter() - start > budget / 2:
            break
    times: List[float] = []
    floor = min(min_iters, iters)
    start = time.perf_counter()
    i = len(warm)
    while len(times) < iters:
        x = batches[i % len(batches)]
        i += 1
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            run(x)
            e1.record()
            e1.synchronize()
            times.append(float(e0.elapsed_time(e1)))
        else:
            t0 = time.perf_counter()
            run(x)
            times.append((time.perf_counter() - t0) * 1e3)
        if budget > 0 and time.perf_counter() - start >= budget and len(times) >= floor:
            break
    return times, warm


def _stats(times: List[float], batch_size: int) -> dict:
    a = np.asarray(times, dtype=np.float64)
    med = float(np.median(a))
    return {"median_ms": med, "p90_ms": float(np.percentile(a, 90)), "mean_ms": float(a.mean()),
            "min_ms": float(a.min()), "std_ms": float(a.std()), "iters": int(a.size),
            "throughput_ips": batch_size / (med / 1e3) if med > 0 else None}


def _cuda_graph(fn: Callable, example: torch.Tensor) -> Callable:
    """Capture ``fn(static_x)`` in a CUDA graph; the runner copies its input in, then replays."""
    static_x = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_x)

    def run(x: torch.Tensor) -> torch.Tensor:
        static_x.copy_(x)
        graph.replay()
        return static_out
    run.graph = graph  # keep alive
    return run


def _engine_graph(engine, example: torch.Tensor) -> Callable:
    """A CUDA-graph runner for ``engine`` (:func:`manidp.deploy.cuda_graph.capture`): ``f(x)`` copies
    ``x`` into the graph's static input, replays, and returns the static output."""
    if engine.backend.name == "reference":
        raise _Skip("the reference backend reads active channel lists back to the host: it cannot be captured")
    try:
        from .deploy.cuda_graph import capture
    except ImportError:
        capture = None
    if capture is None:  # older tree: capture by hand, for the backends built for it
        if engine.backend.name not in ("triton", "cuda"):
            raise _Skip(f"backend {engine.backend.name!r} is not known to be capturable")
        return _cuda_graph(engine, example)
    try:
        fwd = capture(engine, batch_size=int(example.shape[0]), input_size=tuple(example.shape[-2:]))
    except ValueError as e:  # the backend synchronises with the host
        raise _Skip(f"cuda_graph.capture: {e}") from None
    return fwd


# ============================================================================ methods
class Method:
    """One timed variant: ``build(batch_size, example)`` returns a runner ``f(x) -> logits``."""

    def __init__(self, name: str, kind: str, description: str, build: Callable, *, backend: Optional[str] = None,
                 layout: str = "nchw", cuda_graph: bool = False, compiled: bool = False, baseline: Optional[str] = None,
                 skip: Optional[str] = None):
        self.name, self.kind, self.description, self.build = name, kind, description, build
        self.backend, self.layout, self.cuda_graph, self.compiled = backend, layout, cuda_graph, compiled
        self.baseline, self.skip = baseline, skip
        self.results: List[dict] = []

    @property
    def channels_last(self) -> bool:
        return self.layout == "channels_last"

    def entry(self) -> dict:
        oks = [r for r in self.results if r["status"] == "ok"]
        if self.skip is not None and not oks:
            status, reason = "skipped", self.skip
        elif oks:
            status, reason = "ok", None
        else:
            fails = [r for r in self.results if r["status"] == "failed"]
            skips = [r for r in self.results if r["status"] == "skipped"]
            status = "failed" if fails else "skipped"
            reason = (fails or skips)[0]["reason"] if (fails or skips) else self.skip
        return {"name": self.name, "kind": self.kind, "description": self.description, "backend": self.backend,
                "layout": self.layout, "cuda_graph": self.cuda_graph, "compiled": self.compiled,
                "status": status, "reason": reason, "results": self.results}


def _short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


class _CompileBudget:
    def __init__(self, budget: float):
        self.budget, self.exceeded = budget, None


def _make_methods(subject: Subject, dense_fold: nn.Module, static_net: nn.Module, static_label: str,
                  backends: List[str], device: torch.device, dtype: torch.dtype, compile_on: bool,
                  compile_reason: Optional[str], cbudget: _CompileBudget) -> List[Method]:
    gpu = device.type == "cuda"

    def prepared(module: nn.Module, channels_last: bool) -> nn.Module:
        m = copy.deepcopy(module).eval().to(device=device, dtype=dtype)
        return m.to(memory_format=torch.channels_last) if channels_last else m

    cache: Dict[str, Any] = {}

    def plain(key: str, module_fn: Callable[[], nn.Module], channels_last: bool) -> Callable:
        def build(bs, example):
            if key not in cache:
                cache[key] = prepared(module_fn(), channels_last)
            return cache[key]
        return build

    def compiled(key: str, module_fn: Callable[[], nn.Module]) -> Callable:
        def build(bs, example):
            if cbudget.exceeded:
                raise _Skip(cbudget.exceeded)
            if key not in cache:
                cache[key] = torch.compile(prepared(module_fn(), True), dynamic=False)
            fn = cache[key]
            t0 = time.perf_counter()
            fn(example)  # compiles for this shape
            _sync(device)
            took = time.perf_counter() - t0
            build.last_compile_s = took
            if took > cbudget.budget:
                cbudget.exceeded = (f"a torch.compile took {took:.0f} s > --compile-budget {cbudget.budget:.0f} s; "
                                    "later compiled measurements skipped")
            return fn
        return build

    def graphed(key: str, module_fn: Callable[[], nn.Module]) -> Callable:
        def build(bs, example):
            if key not in cache:
                cache[key] = prepared(module_fn(), True)
            return _cuda_graph(cache[key], example)
        return build

    dense_src = "folded weights (the engine file holds no BN)" if subject.folded_only else "BN unfolded"
    methods = [Method("dense-eager", "dense", f"manidp.models.resnet{subject.gated.depth}, same weights, {dense_src}, "
                      "NCHW, eager", plain("dense_eager", lambda: dense_model_from_gated(subject.gated), False)),
               Method("dense-folded", "dense", "dense, BN folded into conv + bias, NCHW, eager",
                      plain("dense_fold", lambda: dense_fold, False), baseline="dense-eager"),
               Method("dense-folded-cl", "dense", "dense, BN folded, channels-last, eager",
                      plain("dense_fold_cl", lambda: dense_fold, True), layout="channels_last",
                      baseline="dense-eager")]
    methods.append(Method("dense-compile", "dense", "dense, BN folded, channels-last, torch.compile",
                          compiled("dense_compile", lambda: dense_fold), layout="channels_last", compiled=True,
                          baseline="dense-eager", skip=None if compile_on else compile_reason))
    if gpu:
        methods.append(Method("dense-cl-graph", "dense", "dense, BN folded, channels-last, CUDA graph replay",
                              graphed("dense_graph", lambda: dense_fold), layout="channels_last", cuda_graph=True,
                              baseline="dense-eager"))
    methods.append(Method("masked", "masked", "original ManiDP forward: dense convs times the gate mask "
                          "(gated model, eval mode)", plain("masked", lambda: subject.gated, False)))

    def engine_build(name: str, graph: bool) -> Callable:
        def build(bs, example):
            key = f"engine_{name}"
            if key not in cache:
                eng = copy.deepcopy(subject.engine).to(device=device, dtype=dtype)
                cache[key] = eng.set_backend(name).eval()
            eng = cache[key]
            return _engine_graph(eng, example) if graph else eng
        return build

    for name in backends:
        methods.append(Method(f"gated-{name}", "gated", f"DynamicResNet, backend {name!r}",
                              engine_build(name, False), backend=name, baseline="masked"))
        if gpu:
            methods.append(Method(f"gated-{name}-graph", "gated", f"DynamicResNet, backend {name!r}, CUDA graph replay",
                                  engine_build(name, True), backend=name, cuda_graph=True, baseline="masked"))
    methods += [Method("static-folded", "static", f"static channel-pruned ({static_label}), BN folded, NCHW",
                       plain("static_fold", lambda: static_net, False)),
                Method("static-folded-cl", "static", f"static channel-pruned ({static_label}), BN folded, channels-last",
                       plain("static_fold_cl", lambda: static_net, True), layout="channels_last"),
                Method("static-compile", "static", "static channel-pruned, BN folded, channels-last, torch.compile",
                       compiled("static_compile", lambda: static_net), layout="channels_last", compiled=True,
                       skip=None if compile_on else compile_reason)]
    if gpu:
        methods.append(Method("static-cl-graph", "static", "static channel-pruned, BN folded, channels-last, "
                              "CUDA graph replay", graphed("static_graph", lambda: static_net),
                              layout="channels_last", cuda_graph=True))
    return methods


# ============================================================================ environment
def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _cpu_kernel() -> Optional[str]:
    """The cpu backend's gathered-conv kernel ("avx512", "avx2" or "none"); None without the extension."""
    from .deploy import ops
    return torch.ops.manidp.gconv_isa() if ops.HAVE_CPU_OPS else None


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        r = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def environment(argv: List[str], device: torch.device) -> dict:
    from . import __version__
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command_line": shlex.join([PROG] + list(argv)),
        "argv": list(argv),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"),
        "numpy": np.__version__,
        "manidp": __version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if dirty is None else bool(dirty),
        "gpu_driver": None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_kernel": _cpu_kernel(),
    }
    if device.type == "cuda":
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=10)
            env["gpu_driver"] = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            pass
    return env


# ============================================================================ schema
_NUM = ["number", "integer"]
_RESULT = {"type": "object", "required": {
    "batch_size": "integer", "status": "string", "reason": ["string", "null"], "times_ms": "array",
    "warmup_ms": "array", "median_ms": _NUM + ["null"], "p90_ms": _NUM + ["null"], "mean_ms": _NUM + ["null"],
    "min_ms": _NUM + ["null"], "std_ms": _NUM + ["null"], "iters": "integer",
    "throughput_ips": _NUM + ["null"], "speedup_vs_best_dense": _NUM + ["null"],
    "max_abs_diff": _NUM + ["null"], "argmax_agreement": _NUM + ["null"], "mean_macs": _NUM + ["null"],
    "budget_s": _NUM + ["null"]},
    "enum": {"status": ["ok", "failed", "skipped"]}}
_METHOD = {"type": "object", "required": {
    "name": "string", "kind": "string", "description": "string", "backend": ["string", "null"],
    "layout": "string", "cuda_graph": "boolean", "compiled": "boolean", "status": "string",
    "reason": ["string", "null"], "results": "array"},
    "enum": {"kind": ["dense", "masked", "gated", "static"], "status": ["ok", "failed", "skipped"],
             "layout": ["nchw", "channels_last"]},
    "items": {"results": _RESULT}}
_SUMMARY = {"type": "object", "required": {
    "batch_size": "integer", "best_dense": ["string", "null"], "best_dense_median_ms": _NUM + ["null"],
    "ideal_speedup": _NUM, "ideal_ms": _NUM + ["null"], "best_gated": ["string", "null"],
    "best_gated_median_ms": _NUM + ["null"], "best_gated_speedup": _NUM + ["null"],
    "realized_over_ideal": _NUM + ["null"], "static_speedup": _NUM + ["null"]}}
_MACS_BS = {"type": "object", "required": {"batch_size": "integer", "mean_dynamic": _NUM, "fraction": _NUM,
                                           "ideal_speedup": _NUM, "per_instance": "array"}}
REPORT_SCHEMA = {"type": "object", "required": {
    "schema": "string", "environment": "object", "config": "object", "model": "object", "data": "object",
    "macs": "object", "static": "object", "methods": "array", "summary": "array"},
    "enum": {"schema": [SCHEMA_VERSION]},
    "objects": {
        "environment": {"type": "object", "required": {
            "date": "string", "command_line": "string", "argv": "array", "python": "string", "platform": "string",
            "device": "string", "device_name": ["string", "null"], "cpu_model": ["string", "null"],
            "cpu_count": ["integer", "null"], "cpu_threads": "integer", "torch": "string",
            "torch_cuda": ["string", "null"], "cudnn": ["integer", "null"], "triton": ["string", "null"],
            "numpy": "string", "manidp": "string", "git_commit": ["string", "null"],
            "git_dirty": ["boolean", "null"], "gpu_driver": ["string", "null"],
            "load_average": ["array", "null"], "cpu_kernel": ["string", "null"]}},
        "config": {"type": "object", "required": {
            "model": "string", "model_source": "string", "arch": "string", "num_classes": "integer",
            "in_channels": "integer", "input_size": "array", "device": "string", "dtype": "string",
            "batch_sizes": "array", "backends": "array", "backends_available": "array", "data": "string",
            "warmup": "integer", "iters": "integer", "min_iters": "integer", "time_budget_s": _NUM,
            "max_time_s": _NUM,
            "num_batches": "integer", "compile": "boolean", "compile_budget_s": _NUM,
            "target_macs": _NUM + ["null"], "seed": "integer", "static_sizing": "string",
            "tf32": ["boolean", "null"]},
            "enum": {"model_source": ["default-asset", "default-random", "architecture", "engine-file",
                                      "checkpoint"]}},
        "model": {"type": "object", "required": {"arch": "string", "dense_macs": "integer", "num_gates": "integer",
                                                 "calibration": ["object", "null"], "preprocess": ["object", "null"]}},
        "data": {"type": "object", "required": {"name": "string", "source": ["string", "null"],
                                                "num_images": "integer", "channels": "integer", "size": "array",
                                                "note": "string"}},
        "macs": {"type": "object", "required": {"dense": "integer", "overall_mean_fraction": _NUM,
                                                "per_batch_size": "array"},
                 "items": {"per_batch_size": _MACS_BS}},
        "static": {"type": "object", "required": {"keep": _NUM + ["null"], "widths": "array", "macs": "integer",
                                                  "fraction": _NUM, "sized_from": "string"}},
    },
    "items": {"methods": _METHOD, "summary": _SUMMARY},
}

_PY_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
             "object": dict, "null": type(None)}


def _check_type(value, types, where: str, errors: List[str]) -> bool:
    types = [types] if isinstance(types, str) else list(types)
    for t in types:
        py = _PY_TYPES[t]
        if isinstance(value, bool) and t in ("integer", "number"):
            continue
        if isinstance(value, py):
            return True
    errors.append(f"{where}: expected {'/'.join(types)}, got {type(value).__name__}")
    return False


def _validate(obj, schema: dict, where: str, errors: List[str]) -> None:
    if not _check_type(obj, schema.get("type", "object"), where, errors):
        return
    for key, types in schema.get("required", {}).items():
        if key not in obj:
            errors.append(f"{where}: missing key {key!r}")
            continue
        _check_type(obj[key], types, f"{where}.{key}", errors)
    for key, allowed in schema.get("enum", {}).items():
        if key in obj and obj[key] not in allowed:
            errors.append(f"{where}.{key}: {obj[key]!r} not in {allowed}")
    for key, sub in schema.get("objects", {}).items():
        if isinstance(obj.get(key), dict):
            _validate(obj[key], sub, f"{where}.{key}", errors)
    for key, sub in schema.get("items", {}).items():
        if isinstance(obj.get(key), list):
            for i, item in enumerate(obj[key]):
                _validate(item, sub, f"{where}.{key}[{i}]", errors)


def validate_report(report: dict) -> List[str]:
    """Problems of ``report`` against :data:`REPORT_SCHEMA` (empty list: valid)."""
    errors: List[str] = []
    _validate(report, REPORT_SCHEMA, "report", errors)
    for m in report.get("methods", []) if isinstance(report.get("methods"), list) else []:
        for r in m.get("results", []) if isinstance(m, dict) else []:
            if isinstance(r, dict) and r.get("status") == "ok":
                if not r.get("times_ms") or r.get("median_ms") is None or len(r["times_ms"]) != r.get("iters"):
                    errors.append(f"method {m.get('name')!r} batch {r.get('batch_size')}: ok without timings")
    return errors


# ============================================================================ reports
COLUMNS = ("method", "batch", "median ms", "p90 ms", "img/s", "vs best dense")


def _fmt(v, spec: str, suffix: str = "") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec) + suffix


def table_rows(report: dict) -> List[List[str]]:
    """The rows of the terminal / markdown table (strings), batch size by batch size."""
    rows = []
    summary = {s["batch_size"]: s for s in report["summary"]}
    for bs in report["config"]["batch_sizes"]:
        for m in report["methods"]:
            for r in m["results"]:
                if r["batch_size"] != bs:
                    continue
                if r["status"] != "ok":
                    rows.append([m["name"], str(bs), r["status"], "", "", ""])
                    continue
                rows.append([m["name"], str(bs), _fmt(r["median_ms"], ".3f"), _fmt(r["p90_ms"], ".3f"),
                             _fmt(r["throughput_ips"], ".1f"), _fmt(r["speedup_vs_best_dense"], ".2f", "x")])
        s = summary.get(bs)
        if s is not None and s["ideal_ms"] is not None:
            rows.append(["ideal", str(bs), _fmt(s["ideal_ms"], ".3f"), "", _fmt(bs / (s["ideal_ms"] / 1e3), ".1f"),
                         _fmt(s["ideal_speedup"], ".2f", "x")])
    return rows


def format_table(report: dict) -> str:
    rows = table_rows(report)
    widths = [max(len(COLUMNS[i]), *(len(r[i]) for r in rows)) if rows else len(COLUMNS[i])
              for i in range(len(COLUMNS))]
    def line(cells):
        return "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells))
    out = [line(COLUMNS), line(["-" * w for w in widths])]
    last = None
    for r in rows:
        if last is not None and r[1] != last:
            out.append("")
        out.append(line(r))
        last = r[1]
    return "\n".join(out)


def _summary_lines(report: dict) -> List[str]:
    lines = []
    dense = report["macs"]["dense"]
    for s, mb in zip(report["summary"], report["macs"]["per_batch_size"]):
        txt = (f"batch {s['batch_size']}: dense {dense / 1e6:.2f} MMAC, dynamic {mb['mean_dynamic'] / 1e6:.2f} MMAC "
               f"({mb['fraction']:.3f}), ideal {s['ideal_speedup']:.2f}x")
        if s["best_gated"] is not None:
            txt += (f"; best gated {s['best_gated']} {s['best_gated_speedup']:.2f}x vs {s['best_dense']} "
                    f"({s['realized_over_ideal']:.2f} of ideal)")
        if s["static_speedup"] is not None:
            txt += f"; static {s['static_speedup']:.2f}x"
        lines.append(txt)
    return lines


def _fmt_load(load) -> str:
    return "unknown" if not load else " / ".join(f"{v:.2f}" for v in load) + " (1 / 5 / 15 min)"


def write_markdown(report: dict, path: str) -> None:
    env, cfg = report["environment"], report["config"]
    st = report["static"]
    lines = [f"# manidp-bench report", "",
             f"- command: `{env['command_line']}`",
             f"- date: {env['date']}; git commit: {env['git_commit'] or 'unknown'}"
             f"{' (dirty)' if env['git_dirty'] else ''}",
             f"- device: {env['device']} ({env['device_name'] or 'unknown'}); CPU: {env['cpu_model'] or 'unknown'}, "
             f"{env['cpu_threads']} threads of {env['cpu_count']} cores",
             f"- load average at start: {_fmt_load(env['load_average'])}",
             f"- torch {env['torch']}, CUDA {env['torch_cuda'] or '-'}, Triton {env['triton'] or '-'}, "
             f"Python {env['python']}",
             f"- model: {cfg['model']} ({cfg['model_source']}, {cfg['arch']}, input {cfg['input_size'][0]}x"
             f"{cfg['input_size'][1]}x{cfg['in_channels']}), dtype {cfg['dtype']}",
             f"- data: {report['data']['name']} ({report['data']['note']})",
             f"- dense MACs {report['macs']['dense'] / 1e6:.2f} M; mean dynamic fraction "
             f"{report['macs']['overall_mean_fraction']:.3f}; static network: keep "
             f"{_fmt(st['keep'], '.3f')}, {st['fraction']:.3f} of dense MACs ({st['sized_from']})",
             f"- timing: {cfg['warmup']} warm-up, up to {cfg['iters']} iterations or {cfg['time_budget_s']} s per "
             f"measurement, {cfg['num_batches']} rotated input batches",
             "", "| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    lines += ["", "## Summary", ""] + [f"- {s}" for s in _summary_lines(report)]
    notes = [m for m in report["methods"] if m["status"] != "ok" or any(r["status"] != "ok" for r in m["results"])]
    if notes:
        lines += ["", "## Skipped or failed", ""]
        for m in notes:
            reasons = sorted({r["reason"] for r in m["results"] if r["reason"]} | ({m["reason"]} if m["reason"] else set()))
            lines.append(f"- {m['name']} ({m['status']}): {'; '.join(reasons)}")
    lines += ["", "## Methods", ""] + [f"- `{m['name']}`: {m['description']}" for m in report["methods"]]
    lines += ["", "![throughput and speedup](report.png)", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    bss = report["config"]["batch_sizes"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    styles = {"dense": "-", "masked": ":", "gated": "-", "static": "--"}
    for m in report["methods"]:
        pts = [(r["batch_size"], r["throughput_ips"]) for r in m["results"] if r["status"] == "ok"]
        if pts:
            ax1.plot(*zip(*pts), styles.get(m["kind"], "-"), marker="o", label=m["name"],
                     linewidth=2.2 if m["kind"] == "gated" else 1.2)
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xticks(bss)
    ax1.set_xticklabels([str(b) for b in bss])
    ax1.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax1.set_xlabel("batch size")
    ax1.set_ylabel("throughput (images/s)")
    ax1.set_title(f"{report['config']['arch']} on {report['environment']['device']}, {report['config']['dtype']}")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    series = [m for m in report["methods"] if m["kind"] in ("gated", "masked", "static")
              and any(r["status"] == "ok" for r in m["results"])]
    width = 0.8 / (len(series) + 1)
    xs = np.arange(len(bss))
    for i, m in enumerate(series):
        by_bs = {r["batch_size"]: r for r in m["results"]}
        vals = [by_bs[b]["speedup_vs_best_dense"] if b in by_bs and by_bs[b]["status"] == "ok"
                and by_bs[b]["speedup_vs_best_dense"] is not None else 0.0 for b in bss]
        ax2.bar(xs + i * width, vals, width, label=m["name"])
    ideal = [s["ideal_speedup"] for s in report["summary"]]
    ax2.bar(xs + len(series) * width, ideal, width, label="ideal (MACs)", color="none", edgecolor="black", hatch="//")
    ax2.axhline(1.0, color="gray", linewidth=1)
    ax2.set_xticks(xs + width * len(series) / 2)
    ax2.set_xticklabels([str(b) for b in bss])
    ax2.set_xlabel("batch size")
    ax2.set_ylabel("speedup over best dense")
    ax2.set_title("realized vs ideal speedup")
    ax2.legend(fontsize=7)
    ax2.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================ main
def _err(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr)


def _resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda asked for, but no CUDA GPU is available here (torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use --device cpu")
    return torch.device(name)


def _resolve_backends(spec: Optional[str], device: torch.device, dtype: torch.dtype) -> Tuple[List[str], List[str]]:
    from .deploy.backends import BackendUnavailable, available_backends, get_backend
    avail = available_backends(device, dtype)
    if spec is None:
        # Triton on CPU tensors is its interpreter (TRITON_INTERPRET=1): a test tool, far too slow to time
        # by default; naming it in --backends still times it.
        return [n for n in avail if not (n == "triton" and device.type == "cpu")], avail
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise BenchError("--backends is empty")
    for n in names:
        try:
            get_backend(n, device, dtype)
        except ValueError:
            raise BenchError(f"unknown backend {n!r}; available for {device.type}/{str(dtype)[6:]}: "
                             f"{', '.join(avail) or 'none'}") from None
        except BackendUnavailable as e:
            raise BenchError(f"backend {n!r} cannot run here: {e}") from None
    if "auto" in names:
        raise BenchError("--backends takes backend names, not 'auto'")
    return list(dict.fromkeys(names)), avail


def _prepare_subject(args):
    """Resolve --model into (Subject, data spec, target) without loading data yet for architectures."""
    from .models import ARCHITECTURES
    spec = args.model
    if spec is None:
        asset = _default_asset()
        if asset is not None:
            import manidp
            fn = getattr(manidp, "default_model", None)
            if callable(fn):
                try:
                    obj = fn("cpu")
                except Exception as e:
                    raise BenchError(f"manidp.default_model() failed: {_short_error(e)}") from None
                gated, engine, pre = _subject_from_object(obj, asset, "default-asset")
            else:
                gated, engine, _, pre = _load_model_file(asset)
            return ("file", gated, engine, "default-asset", pre, asset)
        arch = "dyresnet56"
        return ("arch", arch, None, "default-random", None, f"{arch} (random weights)")
    if os.path.isfile(spec):
        gated, engine, source, pre = _load_model_file(spec)
        return ("file", gated, engine, source, pre, spec)
    if spec in ARCHITECTURES:
        if not spec.startswith("dy"):
            raise BenchError(f"{spec!r} is a dense architecture; the benchmark needs a gated one (dy{spec})")
        return ("arch", spec, None, "architecture", None, spec)
    if os.sep in spec or spec.endswith((".pt", ".pth", ".ckpt")):
        raise BenchError(f"no model file at {spec!r}")
    raise BenchError(f"unknown architecture {spec!r}; expected a model file or one of {', '.join(_gated_arch_names())}")


def run(args, argv: List[str]) -> dict:
    """Run the benchmark described by parsed ``args``; returns the report dict (files written)."""
    from .calibrate import calibrate_bn, calibrate_target_macs
    from .deploy import compile as compile_engine
    from .flops import count_macs
    from .models import build_model
    from .static_pruning import keep_for_target_macs, static_pruned_like

    if args.threads is not None:
        if args.threads < 1:
            raise BenchError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    device = _resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    gpu = device.type == "cuda"
    backends, avail = _resolve_backends(args.backends, device, dtype)
    if args.list_backends:
        print("\n".join(avail))
        return {}
    for flag in ("warmup", "iters", "num_batches", "calib_images", "min_iters"):
        v = getattr(args, flag)
        if v is not None and v < (0 if flag == "warmup" else 1):
            raise BenchError(f"--{flag.replace('_', '-')} must be {'>= 0' if flag == 'warmup' else '>= 1'}")
    batch_sizes = args.batch_sizes or ([1, 8, 64, 256] if gpu else [1, 8, 64])
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    iters = args.iters if args.iters is not None else (200 if gpu else 50)
    budget = args.time_budget if args.time_budget is not None else (1.0 if gpu else 1.5)
    if budget < 0:
        raise BenchError("--time-budget must be >= 0")
    max_time = args.max_time if args.max_time is not None else (600.0 if gpu else 120.0)
    if max_time < 0:
        raise BenchError("--max-time must be >= 0")
    compile_on = args.compile == "on" or (args.compile == "auto" and gpu)
    tf32 = args.tf32 == "on"
    compile_reason = None if compile_on else (
        "torch.compile is off (--compile off)" if args.compile == "off" else
        "torch.compile is opt-in on the CPU (compiling takes minutes on few cores): pass --compile on")
    torch.manual_seed(args.seed)
    out_dir = args.out or f"manidp-bench-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise BenchError(f"cannot create output directory {out_dir!r}: {e.strerror}") from None

    kind, a, b, source, pre, label = _prepare_subject(args)
    fm = fashion_mnist_available()
    # ---- data and model
    if kind == "arch":
        arch = a
        data_spec = args.data or ("fashion-mnist" if source == "default-random" and fm else "synthetic")
        imagenet = arch in ("dyresnet18", "dyresnet34")
        size = (224, 224) if imagenet else (32, 32)
        in_ch = 1 if data_spec in ("fashion-mnist",) or (os.path.isdir(data_spec) and _idx_file(data_spec)) else 3
        if os.path.isfile(data_spec):
            t = _read_pt(data_spec)
            in_ch = 1 if t.dim() == 3 else int(t.shape[1])
        gated = build_model(arch, num_classes=1000 if imagenet else 10, in_channels=in_ch).eval()
        engine = None
    else:
        gated, engine = a, b
        in_ch = gated.conv1.in_channels
        size = tuple(engine.input_size) if engine is not None else ((32, 32) if gated.kind == "cifar" else (224, 224))
        default_data = "fashion-mnist" if fm and in_ch == 1 and gated.kind == "cifar" else "synthetic"
        data_spec = args.data or default_data
    max_bs = max(batch_sizes)
    calib_n = args.calib_images
    need = max_bs * args.num_batches + calib_n
    pool, data_info = load_images(data_spec, in_ch, size, need, args.seed, pre)
    if pool.shape[0] > calib_n + max_bs:
        calib, timing_pool = pool[-calib_n:], pool[:-calib_n]
    else:
        calib, timing_pool = pool[:calib_n], pool
    load, ncpu = (os.getloadavg() if hasattr(os, "getloadavg") else None), os.cpu_count() or 1
    if load and load[0] > 1.5 * ncpu and not gpu:
        msg = f"{PROG}: warning: the machine is busy (load average {load[0]:.1f} on {ncpu} CPUs): CPU timings will be noisy"
        if args.threads is None and torch.get_num_threads() > 1:
            # Spinning thread pools on oversubscribed cores stall for whole time slices: one thread
            # gives slower but meaningful numbers.  --threads N overrides.
            torch.set_num_threads(1)
            msg += "; timing with 1 thread (pass --threads N to choose)"
        print(msg, file=sys.stderr)
    target = args.target_macs if args.target_macs is not None else (0.45 if kind == "arch" else None)
    calibration = None
    if kind == "arch":
        calibrate_bn(gated, calib)
    if target is not None:
        achieved = calibrate_target_macs(gated, calib, target)
        calibration = {"target_macs": target, "achieved": achieved, "calibration_images": int(calib.shape[0])}
        engine = None  # thresholds changed: compile again
    if engine is None:
        engine = compile_engine(gated, backend="reference", device="cpu", preprocess=pre)
        if tuple(size) != tuple(engine.input_size) or (b is not None and b.config.get("input_size")):
            engine.config["input_size"] = list(size)
    subject = Subject(gated, engine, label, source, pre, folded_only=getattr(gated, "_manidp_from_engine", False))
    subject.calibration = calibration

    # ---- input batches and MACs
    def batches_for(bs: int) -> List[torch.Tensor]:
        n = timing_pool.shape[0]
        out = []
        for j in range(args.num_batches):
            idx = (torch.arange(bs) + j * bs) % n
            out.append(timing_pool[idx])
        return out

    cpu_batches = {bs: batches_for(bs) for bs in batch_sizes}
    with torch.no_grad():
        probe = gated(cpu_batches[batch_sizes[-1]][0][:16])
    if not bool(torch.isfinite(probe).all()) or float(probe.abs().max()) > 1e6:
        print(f"{PROG}: warning: the model's logits on the benchmark images are huge or not finite "
              f"(max |logit| {float(probe.abs().max()):.3g}); a random model calibrated on too few images "
              "(--calib-images) is ill-conditioned: timings stay valid, output checks do not", file=sys.stderr)
    dense_macs = int(engine.dense_macs_for(size))
    macs_rows, all_per = [], []
    for bs in batch_sizes:
        per = torch.cat([count_macs(gated, x).per_instance for x in cpu_batches[bs]])
        all_per.append(per)
        mean = float(per.mean())
        macs_rows.append({"batch_size": bs, "mean_dynamic": mean, "fraction": mean / dense_macs,
                          "ideal_speedup": dense_macs / mean, "per_instance": [float(v) for v in per]})
    overall = float(torch.cat(all_per).mean()) / dense_macs

    # ---- dense and static networks (folded)
    dense_fold = static_pruned_like(gated, 1.0, fold_bn=True).eval()
    if args.static_sizing == "macs":
        keep = keep_for_target_macs(gated, overall, size)
        static_net = static_pruned_like(gated, keep, fold_bn=True).eval()
        sized_from = f"uniform keep ratio matching the mean dynamic MAC fraction {overall:.3f}"
    else:
        counts = []
        with torch.no_grad():
            for x in [x for bs in batch_sizes for x in cpu_batches[bs]]:
                _, recs = gated(x, return_gates=True)
                counts.append(torch.stack([(r.mask > 0).sum(1).float() for r in recs], 1))
        mean_counts = torch.cat(counts).mean(0)
        widths = [(max(1, int(round(float(mean_counts[2 * i])))), max(1, int(round(float(mean_counts[2 * i + 1])))))
                  for i in range(mean_counts.numel() // 2)]
        keep = None
        static_net = static_pruned_like(gated, widths=widths, fold_bn=True).eval()
        sized_from = "per-block widths equal to the mean active channel counts"
    static_macs_v = static_net.macs(size)
    static_label = f"{static_macs_v / dense_macs:.3f} of dense MACs"

    cbudget = _CompileBudget(args.compile_budget)
    methods = _make_methods(subject, dense_fold, static_net, static_label, backends, device, dtype, compile_on,
                            compile_reason, cbudget)
    env = environment(argv, device)

    # ---- timing
    from tqdm import tqdm
    total = len(batch_sizes) * len(methods)
    bar = tqdm(total=total, desc="benchmark", unit="run", file=sys.stderr, disable=args.quiet, leave=False,
               dynamic_ncols=True)
    deadline = time.perf_counter() + max_time if max_time > 0 else None
    saved_gpu_flags = None
    if gpu:
        saved_gpu_flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
                           torch.get_float32_matmul_precision())
        torch.backends.cudnn.allow_tf32 = tf32
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        with torch.inference_mode():
            for bs in batch_sizes:
                dev_batches = [x.to(device=device, dtype=dtype) for x in cpu_batches[bs]]
                cl_batches = [x.contiguous(memory_format=torch.channels_last) for x in dev_batches]
                ref_out: Dict[str, torch.Tensor] = {}
                for m in methods:
                    bar.set_description(f"bs {bs} {m.name}")
                    if gpu:  # autotune cuDNN for the fixed-shape dense convs, not per-instance gathered shapes
                        torch.backends.cudnn.benchmark = m.kind != "gated"
                    res = {"batch_size": bs, "status": "ok", "reason": None, "times_ms": [], "warmup_ms": [],
                           "median_ms": None, "p90_ms": None, "mean_ms": None, "min_ms": None, "std_ms": None,
                           "iters": 0, "throughput_ips": None, "speedup_vs_best_dense": None,
                           "max_abs_diff": None, "argmax_agreement": None, "mean_macs": None,
                           "budget_s": None}
                    batches = cl_batches if m.channels_last else dev_batches
                    try:
                        if m.skip is not None:
                            raise _Skip(m.skip)
                        runner = m.build(bs, batches[0])
                        if m.kind == "gated" and not m.cuda_graph:
                            out0, stats = runner(batches[0], return_stats=True)
                            res["mean_macs"] = float(stats["macs"].double().mean())
                        else:
                            out0 = runner(batches[0])
                        if isinstance(out0, (tuple, list)):
                            out0 = out0[0]
                        out0 = out0.detach().float().clone()
                        if m.name in ("dense-eager", "masked"):
                            ref_out[m.name] = out0
                        elif m.baseline in ref_out:
                            ref = ref_out[m.baseline]
                            res["max_abs_diff"] = float((out0 - ref).abs().max())
                            res["argmax_agreement"] = float((out0.argmax(1) == ref.argmax(1)).float().mean())
                        m_budget, m_warm, m_min = budget, warmup, args.min_iters
                        if deadline is not None:
                            left = deadline - time.perf_counter()
                            share = left / max(total - bar.n, 1)
                            if left <= 0:
                                m_budget, m_warm, m_min = 1e-3, min(warmup, 1), 1
                            elif budget == 0 or share < budget:
                                m_budget = max(share, 1e-3)
                        res["budget_s"] = m_budget if m_budget > 0 else None
                        if m.compiled:
                            res["compile_s"] = getattr(m.build, "last_compile_s", None)
                        times, warm = measure(runner, batches, device, m_warm, iters, m_min, m_budget)
                        res.update(_stats(times, bs))
                        res["times_ms"], res["warmup_ms"] = times, warm
                    except _Skip as e:
                        res["status"], res["reason"] = "skipped", str(e)
                    except KeyboardInterrupt:
                        raise
                    except Exception as e:  # a method failing at run time is a result, not a crash
                        res["status"], res["reason"] = "failed", _short_error(e)
                        if gpu:
                            try:
                                torch.cuda.synchronize()
                            except Exception:
                                pass
                    m.results.append(res)
                    bar.update(1)
                del dev_batches, cl_batches
    finally:
        bar.close()
        if saved_gpu_flags is not None:
            torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved_gpu_flags[:2]
            torch.set_float32_matmul_precision(saved_gpu_flags[2])

    # ---- speedups and summary
    summary = []
    for bs, mrow in zip(batch_sizes, macs_rows):
        def ok(kind_):
            return [(m.name, r) for m in methods if m.kind == kind_ for r in m.results
                    if r["batch_size"] == bs and r["status"] == "ok"]
        dense = ok("dense")
        best_dense = min(dense, key=lambda t: t[1]["median_ms"]) if dense else None
        bd_ms = best_dense[1]["median_ms"] if best_dense else None
        for m in methods:
            for r in m.results:
                if r["batch_size"] == bs and r["status"] == "ok" and bd_ms:
                    r["speedup_vs_best_dense"] = bd_ms / r["median_ms"]
        gated_ok = ok("gated")
        best_gated = min(gated_ok, key=lambda t: t[1]["median_ms"]) if gated_ok else None
        static_ok = ok("static")
        best_static = min(static_ok, key=lambda t: t[1]["median_ms"]) if static_ok else None
        ideal = mrow["ideal_speedup"]
        summary.append({
            "batch_size": bs, "best_dense": best_dense[0] if best_dense else None, "best_dense_median_ms": bd_ms,
            "ideal_speedup": ideal, "ideal_ms": bd_ms / ideal if bd_ms else None,
            "best_gated": best_gated[0] if best_gated else None,
            "best_gated_median_ms": best_gated[1]["median_ms"] if best_gated else None,
            "best_gated_speedup": best_gated[1]["speedup_vs_best_dense"] if best_gated else None,
            "realized_over_ideal": (best_gated[1]["speedup_vs_best_dense"] / ideal
                                    if best_gated and best_gated[1]["speedup_vs_best_dense"] else None),
            "static_speedup": best_static[1]["speedup_vs_best_dense"] if best_static else None})

    report = {
        "schema": SCHEMA_VERSION,
        "environment": env,
        "config": {"model": subject.name, "model_source": subject.source, "arch": subject.arch,
                   "num_classes": subject.num_classes, "in_channels": subject.in_channels,
                   "input_size": list(size), "device": str(device), "dtype": args.dtype,
                   "batch_sizes": batch_sizes, "backends": backends, "backends_available": avail,
                   "data": data_spec, "warmup": warmup, "iters": iters, "min_iters": args.min_iters,
                   "time_budget_s": budget, "max_time_s": max_time, "num_batches": args.num_batches, "compile": compile_on,
                   "compile_budget_s": args.compile_budget, "target_macs": target, "seed": args.seed,
                   "static_sizing": args.static_sizing, "tf32": tf32 if gpu else None},
        "model": {"arch": subject.arch, "dense_macs": dense_macs, "num_gates": engine.num_gates,
                  "calibration": calibration, "preprocess": pre},
        "data": data_info,
        "macs": {"dense": dense_macs, "overall_mean_fraction": overall, "per_batch_size": macs_rows},
        "static": {"keep": keep, "widths": [list(w) for w in static_net.widths], "macs": static_macs_v,
                   "fraction": static_macs_v / dense_macs, "sized_from": sized_from},
        "methods": [m.entry() for m in methods],
        "summary": summary,
    }
    problems = validate_report(report)
    if problems:  # a bug in this module, not a usage error
        raise RuntimeError(f"report does not match its schema: {problems[:5]}")
    paths = {k: os.path.join(out_dir, f"report.{k}") for k in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=1)
    write_markdown(report, paths["md"])
    write_plot(report, paths["png"])
    print(format_table(report))
    print()
    for line in _summary_lines(report):
        print(line)
    for m in report["methods"]:
        if m["status"] != "ok":
            print(f"{m['name']}: {m['status']} ({m['reason']})")
    print(f"\nreports: {paths['json']}, {paths['md']}, {paths['png']}")
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point; returns the exit status (0 ok, 2 usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    threads = torch.get_num_threads()
    try:
        args = build_parser().parse_args(argv)
        run(args, argv)
        return 0
    except BenchError as e:
        _err(str(e))
        return 2
    except SystemExit as e:  # --help
        return int(e.code) if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
