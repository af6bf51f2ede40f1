"""``compile``: a trained gated model or checkpoint file -> :class:`DynamicResNet`."""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
import torch.nn as nn

from ..models import build_model, load_dense_state_dict
from .engine import DynamicResNet, EngineFormatError

__all__ = ["compile", "model_from_checkpoint", "preprocess_spec"]


def preprocess_spec(dataset: str) -> Optional[dict]:
    """How raw uint8 images of ``dataset`` become model inputs (as manidp.data prepares them)."""
    from .. import data as D
    if dataset == "fashion-mnist":
        return {"dataset": dataset, "scale": 255.0, "mean": list(D.FMNIST_MEAN), "std": list(D.FMNIST_STD), "pad": 2}
    if dataset == "cifar10":
        return {"dataset": dataset, "scale": 255.0, "mean": list(D.CIFAR10_MEAN), "std": list(D.CIFAR10_STD)}
    return None


def _read_checkpoint(path: str) -> dict:
    """A checkpoint dictionary, read without executing code from the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EngineFormatError(f"{path!r} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict):
        raise EngineFormatError(f"{path!r} does not hold a checkpoint dictionary")
    return ckpt


def model_from_checkpoint(path: str) -> nn.Module:
    """Rebuild the gated model stored in a ``manidp-train`` checkpoint file.

    The file must hold ``arch`` and a state dict (``state_dict`` or ``model``);
    ``num_classes`` and ``in_channels`` are read from it or inferred from the weights.
    """
    return _model_from_ckpt(_read_checkpoint(path), path)


def _model_from_ckpt(ckpt: dict, path: str) -> nn.Module:
    state = ckpt.get("state_dict", ckpt.get("model"))
    arch = ckpt.get("arch")
    if not isinstance(state, dict) or not isinstance(arch, str):
        raise EngineFormatError(f"{path!r} is not a manidp-train checkpoint (needs 'arch' and 'state_dict')")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if not arch.startswith("dy"):
        arch = "dy" + arch
    num_classes = int(ckpt.get("num_classes", state["fc.weight"].shape[0]))
    in_channels = int(ckpt.get("in_channels", state["conv1.weight"].shape[1]))
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    gate_kw = {k: args[k] for k in ("squeeze_rate", "clamp_max") if args.get(k) is not None}
    model = build_model(arch, num_classes=num_classes, in_channels=in_channels, **gate_kw)
    missing = load_dense_state_dict(model, state)
    if any(".gate" in k for k in missing):
        raise EngineFormatError(f"{path!r} holds a dense model; train it with ManiDP before compiling")
    return model.eval()


def compile(model: Union[nn.Module, str], backend: str = "auto", device: Union[str, torch.device] = "cpu",
            dtype: Optional[torch.dtype] = None, preprocess: Optional[dict] = None) -> DynamicResNet:
    """Compile a gated model (or a checkpoint file) into a :class:`DynamicResNet`.

    BN is folded into the convs; gate weights and thresholds are kept.
    ``backend="auto"`` picks the fastest backend available on ``device``.
    ``preprocess`` (optional) records how raw images become inputs
    (``{"scale": 255, "mean": [...], "std": [...], "pad": 2}``), used by
    :meth:`DynamicResNet.preprocess`.
    """
    input_size = None
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        ckpt = _read_checkpoint(path)
        dataset = ckpt.get("dataset") if isinstance(ckpt.get("dataset"), dict) else {}
        if preprocess is None:
            preprocess = preprocess_spec(dataset.get("name", ""))
        input_size = dataset.get("input_size")
        model = _model_from_ckpt(ckpt, path)
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile() takes a gated model or a checkpoint path; got {type(model).__name__}")
    engine = DynamicResNet.from_model(model, backend="reference", preprocess=preprocess)
    if input_size:
        engine.config["input_size"] = [int(v) for v in input_size]
    engine._backend_name = backend
    return engine.to(device=device, dtype=dtype)
