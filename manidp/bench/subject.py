"""The model under test: what ``--model`` names, as a gated ``nn`` model and its compiled engine.

An engine file holds BN-folded tensors only; :func:`gated_model_from_engine` turns
them back into a :mod:`manidp.models` gated ResNet computing exactly the same
function, so the dense and masked baselines can be timed from an engine file too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .. import pretrained
from ..calibrate import calibrate_bn, calibrate_target_macs
from ..deploy import DynamicResNet, EngineFormatError, compile as compile_engine, model_from_checkpoint
from ..deploy.engine import FORMAT_NAME
from ..flops import count_macs
from ..models import ARCHITECTURES, build_model
from .errors import BenchError, warn
from .inputs import fashion_mnist_available, idx_images_file, read_tensor_file

__all__ = ["ModelChoice", "Subject", "resolve_model", "gated_model_from_engine", "load_model_file", "build_random",
           "default_data", "make_subject", "macs_section", "warn_if_ill_conditioned"]

DEFAULT_ARCH = "dyresnet56"
DEFAULT_TARGET_MACS = 0.45
IMAGENET_ARCHS = ("dyresnet18", "dyresnet34")


@dataclass
class ModelChoice:
    """What ``--model`` resolved to: a file's model and engine, or an architecture to build."""
    label: str
    source: str
    arch: Optional[str] = None
    gated: Optional[nn.Module] = None
    engine: Optional[DynamicResNet] = None
    preprocess: Optional[dict] = None

    @property
    def random(self) -> bool:
        """True for an architecture name: random weights, BN and thresholds calibrated here."""
        return self.gated is None


class Subject:
    """The model under test: a gated nn model (fp32, CPU) and its compiled engine."""

    def __init__(self, choice: ModelChoice, gated: nn.Module, engine: DynamicResNet,
                 calibration: Optional[dict]):
        self.gated, self.engine, self.name, self.source = gated.eval(), engine, choice.label, choice.source
        self.preprocess = choice.preprocess
        self.folded_only = getattr(gated, "_manidp_from_engine", False)  # the weights are BN-folded ones
        self.calibration = calibration
        self.arch = engine.config["arch"]
        self.in_channels = int(engine.config["in_channels"])
        self.num_classes = int(engine.config["num_classes"])
        self.input_size = tuple(engine.input_size)


# ---------------------------------------------------------------------------- engine -> model
def _put_conv(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], w: torch.Tensor, b: torch.Tensor) -> None:
    """``conv`` holds ``w``; ``bn`` becomes the exact identity plus bias ``b`` (mean 0, var 1, eps 0)."""
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


def _put_gate(gate: nn.Module, engine_gate) -> None:
    gate.fc1.weight.copy_(engine_gate.fc1.float())
    gate.fc2.weight.copy_(engine_gate.fc2.float())
    gate.fc2.bias.copy_(engine_gate.fc2_bias.float())
    gate.threshold.copy_(engine_gate.threshold.float())


@torch.no_grad()
def gated_model_from_engine(engine: DynamicResNet) -> nn.Module:
    """A :mod:`manidp.models` gated ResNet computing exactly what ``engine``'s folded tensors do.

    Each conv gets the folded weight and a BN set to the exact identity plus the folded
    bias (running mean 0, variance 1, eps 0), so ``model.eval()(x)`` is the original masked
    forward and compiling the model again reproduces the engine's tensors bit for bit.
    """
    cfg = engine.config
    model = build_model(cfg["arch"], num_classes=cfg["num_classes"], in_channels=cfg["in_channels"],
                        clamp_max=cfg["clamp_max"])
    blocks = list(model.blocks())
    if len(blocks) != len(engine.blocks) or any(
            b.conv1.in_channels != e.in_channels or b.conv1.out_channels != e.planes or b.stride != e.stride
            for b, e in zip(blocks, engine.blocks)):
        raise BenchError(f"the engine's block layout does not match a standard {cfg['arch']}")
    _put_conv(model.conv1, model.bn1, engine.stem.weight, engine.stem.bias)
    for blk, eb in zip(blocks, engine.blocks):
        _put_conv(blk.conv1, blk.bn1, eb.conv1.weight, eb.conv1.bias)
        _put_conv(blk.conv2, blk.bn2, eb.conv2.weight, eb.conv2.bias)
        if eb.has_shortcut:
            ds = blk.downsample
            _put_conv(ds[0], ds[1] if len(ds) > 1 else None, eb.shortcut.weight, eb.shortcut.bias)
        _put_gate(blk.gate1, eb.gate1)
        _put_gate(blk.gate2, eb.gate2)
    model.fc.weight.copy_(engine.fc.weight.float())
    model.fc.bias.copy_(engine.fc.bias.float())
    model._manidp_from_engine = True
    return model.eval()


# ---------------------------------------------------------------------------- --model
def _claims_engine_format(path: str) -> bool:
    """Whether ``path`` holds a payload marked as a DynamicResNet file (intact or not)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(payload, dict) and payload.get("format") == FORMAT_NAME


def _load_checkpoint(path: str, engine_error: EngineFormatError) -> Tuple[nn.Module, DynamicResNet]:
    try:
        model = model_from_checkpoint(path)
        engine = compile_engine(path, backend="reference")  # records the dataset's preprocessing and input size
    except (EngineFormatError, ValueError, KeyError, RuntimeError) as e:
        if _claims_engine_format(path):
            raise BenchError(str(engine_error)) from None
        raise BenchError(f"{path!r} is neither a DynamicResNet file nor a manidp-train checkpoint ({e})") from None
    return model, engine


def load_model_file(path: str, source: Optional[str] = None) -> ModelChoice:
    """An engine file or a ``manidp-train`` checkpoint (compiled here) as a :class:`ModelChoice`."""
    try:
        engine = DynamicResNet.load(path, device="cpu", backend="reference")
        gated, source = gated_model_from_engine(engine), source or "engine-file"
    except FileNotFoundError:
        raise BenchError(f"no model file at {path!r}") from None
    except EngineFormatError as e:
        gated, engine = _load_checkpoint(path, e)
        source = source or "checkpoint"
    return ModelChoice(path, source, gated=gated, engine=engine, preprocess=engine.config.get("preprocess"))


def _gated_arch_names() -> List[str]:
    return sorted(a for a in ARCHITECTURES if a.startswith("dy"))


def resolve_model(spec: Optional[str]) -> ModelChoice:
    """``--model``: the shipped model by default (a random dyresnet56 without it), a file, or an architecture."""
    if spec is None:
        if os.path.isfile(pretrained.DEFAULT_MODEL_PATH):
            return load_model_file(pretrained.DEFAULT_MODEL_PATH, "default-asset")
        return ModelChoice(f"{DEFAULT_ARCH} (random weights)", "default-random", arch=DEFAULT_ARCH)
    if os.path.isfile(spec):
        return load_model_file(spec)
    if spec in ARCHITECTURES:
        if not spec.startswith("dy"):
            raise BenchError(f"{spec!r} is a dense architecture; the benchmark needs a gated one (dy{spec})")
        return ModelChoice(spec, "architecture", arch=spec)
    if os.sep in spec or spec.endswith((".pt", ".pth", ".ckpt")):
        raise BenchError(f"no model file at {spec!r}")
    raise BenchError(f"unknown architecture {spec!r}; expected a model file or one of {', '.join(_gated_arch_names())}")


# ---------------------------------------------------------------------------- data the model takes
def default_data(choice: ModelChoice, data: Optional[str]) -> Tuple[str, int, Tuple[int, int]]:
    """(data spec, input channels, input size): ``--data`` or the default for the model.

    Fashion-MNIST drives the gates where it is installed and fits the model (the built-in
    model, a one-channel CIFAR-layout model, the default random model); synthetic images
    otherwise.  A random model takes the channels of its data.
    """
    fm = fashion_mnist_available()
    if not choice.random:
        in_ch = choice.gated.conv1.in_channels
        fits = fm and in_ch == 1 and choice.gated.kind == "cifar"
        return data or ("fashion-mnist" if fits else "synthetic"), in_ch, tuple(choice.engine.input_size)
    spec = data or ("fashion-mnist" if choice.source == "default-random" and fm else "synthetic")
    size = (224, 224) if choice.arch in IMAGENET_ARCHS else (32, 32)
    in_ch = 1 if spec == "fashion-mnist" or (os.path.isdir(spec) and idx_images_file(spec)) else 3
    if os.path.isfile(spec):
        t = read_tensor_file(spec)
        in_ch = 1 if t.dim() == 3 else int(t.shape[1])
    return spec, in_ch, size


def build_random(choice: ModelChoice, in_channels: int) -> nn.Module:
    """The random-weight gated model of an architecture choice."""
    classes = 1000 if choice.arch in IMAGENET_ARCHS else 10
    return build_model(choice.arch, num_classes=classes, in_channels=in_channels).eval()


def make_subject(choice: ModelChoice, gated: nn.Module, calib: torch.Tensor, target: Optional[float],
                 size: Tuple[int, int]) -> Subject:
    """Calibrate (BN for random models; thresholds to ``target`` MACs if given) and compile the engine."""
    engine, calibration = choice.engine, None
    if choice.random:
        calibrate_bn(gated, calib)
    if target is not None:
        achieved = calibrate_target_macs(gated, calib, target)
        calibration = {"target_macs": target, "achieved": achieved, "calibration_images": int(calib.shape[0])}
        engine = None  # thresholds changed: compile again
    if engine is None:
        engine = compile_engine(gated, backend="reference", device="cpu", preprocess=choice.preprocess)
        if tuple(size) != tuple(engine.input_size) or (choice.engine is not None
                                                       and choice.engine.config.get("input_size")):
            engine.config["input_size"] = list(size)
    return Subject(choice, gated, engine, calibration)


# ---------------------------------------------------------------------------- checks and MACs
def warn_if_ill_conditioned(gated: nn.Module, x: torch.Tensor) -> None:
    """Warn when the model's logits on ``x`` are huge or not finite (output checks then mean little)."""
    with torch.no_grad():
        probe = gated(x)
    biggest = float(probe.abs().max())
    if not bool(torch.isfinite(probe).all()) or biggest > 1e6:
        warn(f"the model's logits on the benchmark images are huge or not finite (max |logit| {biggest:.3g}); "
             "a random model calibrated on too few images (--calib-images) is ill-conditioned: timings stay valid, "
             "output checks do not")


def macs_section(gated: nn.Module, dense_macs: int, batches: Dict[int, List[torch.Tensor]]) -> dict:
    """The report's ``macs`` object: per-instance dynamic MACs of every timed image, gates counted."""
    rows, every = [], []
    for bs, xs in batches.items():
        per = torch.cat([count_macs(gated, x).per_instance for x in xs])
        every.append(per)
        mean = float(per.mean())
        rows.append({"batch_size": bs, "mean_dynamic": mean, "fraction": mean / dense_macs,
                     "ideal_speedup": dense_macs / mean, "per_instance": [float(v) for v in per]})
    overall = float(torch.cat(every).mean()) / dense_macs
    return {"dense": dense_macs, "overall_mean_fraction": overall, "per_batch_size": rows}
