"""``compile``: a trained gated model or checkpoint file -> :class:`DynamicResNet` (docs/DESIGN.md 3.1)."""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
import torch.nn as nn

from ..checkpoint import read_checkpoint, rebuild_model
from ..preprocess import preprocess_spec
from .engine import DynamicResNet

__all__ = ["compile", "model_from_checkpoint"]


def model_from_checkpoint(path: str) -> nn.Module:
    """Rebuild the gated model stored in a ``manidp-train`` checkpoint file (eval mode).

    The file must hold ``arch`` and a state dict (``state_dict`` or ``model``);
    ``num_classes`` and ``in_channels`` are read from it or inferred from the weights.
    Raises ``FileNotFoundError`` or :class:`manidp.checkpoint.CheckpointError`.
    """
    return rebuild_model(read_checkpoint(path), path, gated=True)


def compile(model: Union[nn.Module, str], backend: str = "auto", device: Union[str, torch.device] = "cpu",
            dtype: Optional[torch.dtype] = None, preprocess: Optional[dict] = None) -> DynamicResNet:
    """Compile a gated model (or a checkpoint file) into a :class:`DynamicResNet`.

    BN is folded into the convs; gate weights and thresholds are kept.
    ``backend="auto"`` picks the fastest backend available on ``device``.
    ``preprocess`` (optional) records how raw images become inputs
    (``{"scale": 255, "mean": [...], "std": [...], "pad": 2}``), used by
    :meth:`DynamicResNet.preprocess`; from a checkpoint file it defaults to the
    spec of the checkpoint's dataset (:func:`manidp.preprocess.preprocess_spec`).
    """
    input_size = None
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        ckpt = read_checkpoint(path)
        dataset = ckpt.get("dataset") if isinstance(ckpt.get("dataset"), dict) else {}
        if preprocess is None:
            preprocess = preprocess_spec(dataset.get("name", ""))
        input_size = dataset.get("input_size")
        model = rebuild_model(ckpt, path, gated=True)
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile() takes a gated model or a checkpoint path; got {type(model).__name__}")
    return DynamicResNet.from_model(model, backend, preprocess, device, dtype, input_size)
