"""The built-in default model shipped inside the package.

``manidp.default_model()`` returns a compiled :class:`~manidp.deploy.DynamicResNet`
trained with ManiDP on Fashion-MNIST (see ``manidp/assets/default_model.json``
for its test accuracy, FLOPs reduction and the command that reproduces it).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from .deploy import DynamicResNet

__all__ = ["DEFAULT_MODEL_PATH", "default_model", "default_model_info"]

_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEFAULT_MODEL_PATH = os.path.join(_ASSETS, "default_model.pt")
DEFAULT_MODEL_INFO = os.path.join(_ASSETS, "default_model.json")


def default_model(device="cpu", backend: str = "auto", dtype: Optional[torch.dtype] = None) -> DynamicResNet:
    """Load the shipped Fashion-MNIST ManiDP engine on ``device``.

    ``engine.preprocess(images)`` turns raw uint8 Fashion-MNIST images
    ((N, 28, 28) or (N, 1, 28, 28)) into its input.
    """
    if not os.path.isfile(DEFAULT_MODEL_PATH):
        raise FileNotFoundError(f"the built-in model is missing from this installation ({DEFAULT_MODEL_PATH})")
    return DynamicResNet.load(DEFAULT_MODEL_PATH, device=device, backend=backend, dtype=dtype)


def default_model_info() -> dict:
    """Accuracy, FLOPs reduction and provenance of the built-in model."""
    with open(DEFAULT_MODEL_INFO) as f:
        return json.load(f)
