"""Preprocessing: raw uint8 images to model inputs (docs/DESIGN.md section 5).

The one definition used by the data loaders (training and evaluation), the
engine (:meth:`manidp.deploy.DynamicResNet.preprocess`) and ``manidp-bench``.

A raw image is zero-padded in pixel units first (value 0, as Fashion-MNIST's
28x28 -> 32x32 and the random-crop augmentation do), then scaled to [0, 1] and
normalised per channel.  The padded border therefore reaches the model as
``-mean / std``, never as 0.0.

A *spec* is the plain dict an engine file records under ``config["preprocess"]``:
``{"dataset": name, "scale": 255.0, "mean": [...], "std": [...], "pad": int}``.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["DATASET_STATS", "dataset_stats", "preprocess_spec", "channel_vector", "normalize_pixels",
           "raw_to_input", "check_spec"]

# Per-channel mean and std of pixel values scaled to [0, 1], and the zero padding (pixels per side)
# that turns the stored images into the model's input size.
DATASET_STATS: Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...], int]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 0),
    "fashion-mnist": ((0.2860,), (0.3530,), 2),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0),
}


def dataset_stats(dataset: str) -> Tuple[Tuple[float, ...], Tuple[float, ...], int]:
    """``(mean, std, pad)`` of a known dataset; ValueError naming the known ones otherwise."""
    if dataset not in DATASET_STATS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASET_STATS)}")
    return DATASET_STATS[dataset]


def preprocess_spec(dataset: str) -> Optional[dict]:
    """The spec recorded in engines compiled from a ``dataset`` checkpoint (``None`` if unknown)."""
    if dataset not in DATASET_STATS or dataset == "imagenet":  # ImageNet inputs are resized, not padded
        return None
    mean, std, pad = DATASET_STATS[dataset]
    spec = {"dataset": dataset, "scale": 255.0, "mean": list(mean), "std": list(std)}
    if pad:
        spec["pad"] = pad
    return spec


def _is_number(v) -> bool:
    """A finite int or float (``True``/``False`` are not numbers here)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return abs(float(v)) < float("inf")
    except OverflowError:  # an int beyond any float
        return False


def check_spec(spec: dict, in_channels: int) -> None:
    """ValueError unless ``spec`` is a usable preprocessing spec for ``in_channels`` channels.

    ``scale`` a finite number > 0, ``pad`` an integer in [0, 64], ``mean`` 1 or C
    finite numbers, ``std`` 1 or C finite numbers > 0 (engine configs are checked
    with it on load, docs/DESIGN.md 6.1).
    """
    if not isinstance(spec, dict):
        raise ValueError(f"preprocessing spec must be a dict; got {type(spec).__name__}")
    scale, pad = spec.get("scale", 255.0), spec.get("pad", 0)
    if not _is_number(scale) or not float(scale) > 0:
        raise ValueError(f"preprocessing 'scale' must be a finite number > 0; got {scale!r:.60}")
    if not isinstance(pad, int) or isinstance(pad, bool) or not 0 <= pad <= 64:
        raise ValueError(f"preprocessing 'pad' must be an integer in [0, 64]; got {pad!r:.60}")
    for key, positive in (("mean", False), ("std", True)):
        vals = spec.get(key, [1.0] if positive else [0.0])
        if (not isinstance(vals, (list, tuple)) or len(vals) not in (1, in_channels)
                or not all(_is_number(v) for v in vals)
                or (positive and not all(float(v) > 0 for v in vals))):
            raise ValueError(f"preprocessing {key!r} must be 1 or {in_channels} finite numbers"
                             f"{' > 0' if positive else ''}; got {vals!r:.80}")


def channel_vector(values: Union[Sequence[float], torch.Tensor], device=None) -> torch.Tensor:
    """Per-channel values as an fp32 (1, C, 1, 1) tensor that broadcasts over (N, C, H, W) images."""
    if isinstance(values, torch.Tensor):
        return values.to(device=device, dtype=torch.float32).reshape(1, -1, 1, 1)
    return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device).view(1, -1, 1, 1)


def normalize_pixels(x: torch.Tensor, mean: Union[Sequence[float], torch.Tensor],
                     std: Union[Sequence[float], torch.Tensor], scale: float = 255.0) -> torch.Tensor:
    """``(x / scale - mean) / std`` per channel for float images ``x`` (N, C, H, W) in pixel units."""
    return (x / float(scale) - channel_vector(mean, x.device)) / channel_vector(std, x.device)


def _as_image_tensor(images) -> torch.Tensor:
    """An array-like (e.g. a NumPy uint8 array) as a tensor; TypeError for anything else."""
    if not hasattr(images, "__array__"):
        raise TypeError(f"expected a uint8 image tensor or array; got {type(images).__name__}")
    return torch.as_tensor(images)


def raw_to_input(images: torch.Tensor, spec: dict, in_channels: int, device=None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Raw uint8 images ``(N, H, W)`` or ``(N, C, H, W)`` -> normalised model input (N, C, H', W').

    Only uint8 images are accepted (0..255 pixel values; a tensor or a NumPy
    array): a float tensor in [0, 1] would be scaled a second time, so it is
    refused with TypeError, as are bool, complex and wider integer images.
    """
    if not isinstance(images, torch.Tensor):
        images = _as_image_tensor(images)
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images (pixel values 0..255); got dtype {images.dtype}. "
                        "Already normalised float inputs go to the model directly.")
    if images.dim() == 3:
        images = images[:, None]
    if images.dim() != 4 or images.shape[1] != in_channels or images.shape[0] == 0 or min(images.shape[2:]) == 0:
        raise ValueError(f"expected uint8 images of shape (N, H, W) or (N, {in_channels}, H, W) with N, H, W >= 1; "
                         f"got {tuple(images.shape)}")
    check_spec(spec, in_channels)
    pad = int(spec.get("pad", 0))
    x = images.to(device).float() if device is not None else images.float()
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))  # zero in pixel units, before normalisation (as in training)
    x = normalize_pixels(x, spec.get("mean", [0.0]), spec.get("std", [1.0]), spec.get("scale", 255.0))
    return x.to(dtype)
