"""The images that drive the gates: synthetic, Fashion-MNIST / IDX, image directories, ``.pt`` files.

Raw uint8 images become model inputs through :func:`manidp.preprocess.raw_to_input`,
the function the data loaders and :meth:`DynamicResNet.preprocess` use, so the
benchmark feeds the model exactly what training and the engine do (padding in
pixel units first, then normalisation; docs/DESIGN.md 5).  The spec is the
engine's recorded one, else the dataset's (Fashion-MNIST), else the images' own
mean and standard deviation.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..data import DEFAULT_FASHION_MNIST_PATH, DatasetError, read_idx
from ..preprocess import preprocess_spec, raw_to_input
from .errors import BenchError

__all__ = ["load_images", "fashion_mnist_available", "idx_images_file", "read_tensor_file", "images_to_input",
           "split_pool", "rotated_batches"]

Size = Tuple[int, int]
IDX_IMAGE_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte", "train-images-idx3-ubyte.gz",
                   "train-images-idx3-ubyte")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SYNTHETIC_BYTES = 64 << 20  # cap on the synthetic pool


def idx_images_file(directory: str) -> Optional[str]:
    """The first IDX image file in ``directory`` (test split preferred), or None."""
    for name in IDX_IMAGE_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def fashion_mnist_available() -> bool:
    return idx_images_file(DEFAULT_FASHION_MNIST_PATH) is not None


# ---------------------------------------------------------------------------- raw images -> inputs
def _match_channels(images: torch.Tensor, in_channels: int) -> torch.Tensor:
    """uint8 (N, H, W) / (N, C, H, W) -> (N, in_channels, H, W): grey repeated, or colour averaged to grey."""
    if images.dim() == 3:
        images = images[:, None]
    c = images.shape[1]
    if c == in_channels:
        return images
    if c == 1:
        return images.expand(-1, in_channels, -1, -1)
    if in_channels == 1:
        return images.float().mean(1, keepdim=True).round().to(torch.uint8)
    raise BenchError(f"the data has {c} channels; the model takes {in_channels}")


def _own_stats_spec(images: torch.Tensor) -> dict:
    """A preprocessing spec normalising with the images' own mean and standard deviation."""
    x = images.float() / 255.0
    return {"scale": 255.0, "mean": [float(x.mean())], "std": [float(x.std()) or 1.0]}


def _raw_size(size: Size, spec: dict) -> Size:
    """The raw image size that ``spec``'s padding turns into ``size``."""
    pad = int(spec.get("pad", 0))
    return size[0] - 2 * pad, size[1] - 2 * pad


def _pad_raw(images: torch.Tensor, size: Size) -> torch.Tensor:
    """Centre-pad raw images smaller than ``size`` with 0 in pixel units, as training pads."""
    h, w = images.shape[-2:]
    H, W = size
    if (h, w) == (H, W) or h > H or w > W:
        return images
    top, left = (H - h) // 2, (W - w) // 2
    return F.pad(images, (left, W - w - left, top, H - h - top))


def _fit_size(x: torch.Tensor, size: Size) -> torch.Tensor:
    """Bilinear resize of float inputs of another size to ``size``."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def images_to_input(images: torch.Tensor, in_channels: int, size: Size, spec: dict) -> torch.Tensor:
    """Raw uint8 images -> float model inputs (N, in_channels, *size) with ``spec`` (manidp.preprocess)."""
    images = _pad_raw(_match_channels(images, in_channels), _raw_size(size, spec))
    try:
        x = raw_to_input(images, spec, in_channels)
    except (TypeError, ValueError) as e:
        raise BenchError(f"cannot preprocess the images: {e}") from None
    return _fit_size(x, size)


def _choose_spec(preprocess: Optional[dict], dataset: Optional[str], images: torch.Tensor,
                 in_channels: int) -> Tuple[dict, str]:
    """(spec, note): the engine's, else the dataset's, else the images' own statistics."""
    if preprocess is not None:
        return preprocess, "engine preprocessing"
    dataset_spec = preprocess_spec(dataset) if dataset else None
    if dataset_spec is not None:
        stats = ", ".join(f"{k} {'/'.join(f'{v:.4f}' for v in dataset_spec[k])}" for k in ("mean", "std"))
        return dataset_spec, (f"{dataset} preprocessing: zero-padded by {dataset_spec.get('pad', 0)} pixels, "
                              f"then normalised ({stats})")
    return _own_stats_spec(_match_channels(images, in_channels)), "normalised with the images' mean and std"


# ---------------------------------------------------------------------------- sources
def _read_idx_images(path: str) -> np.ndarray:
    try:
        images = read_idx(path)
    except DatasetError as e:
        raise BenchError(str(e)) from None
    if images.ndim != 3 or images.dtype != np.uint8:
        raise BenchError(f"{path!r} is not an IDX file of uint8 images (N, H, W)")
    return images


def _read_image_dir(directory: str, in_channels: int, size: Size, limit: int) -> torch.Tensor:
    """uint8 (N, C, H, W) images of ``directory`` (sorted by name), resized to ``size``."""
    from PIL import Image
    names = sorted(n for n in os.listdir(directory) if n.lower().endswith(IMAGE_EXTENSIONS))
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


def read_tensor_file(path: str) -> torch.Tensor:
    """The image tensor (N, H, W) or (N, C, H, W) a ``.pt`` file holds (alone, first of a list, or under
    ``images``/``x``/``data``/``inputs``)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BenchError(f"cannot read data file {path!r} ({type(e).__name__})") from None
    if isinstance(obj, dict):
        obj = next((obj[k] for k in ("images", "x", "data", "inputs") if isinstance(obj.get(k), torch.Tensor)), obj)
    if isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], torch.Tensor):
        obj = obj[0]
    if not isinstance(obj, torch.Tensor) or obj.dim() not in (3, 4) or obj.shape[0] == 0:
        raise BenchError(f"data file {path!r} must hold an image tensor (N, H, W) or (N, C, H, W) "
                         "(or a dict with 'images')")
    return obj


def _info(name: str, source: Optional[str], x: torch.Tensor, note: str) -> dict:
    return {"name": name, "source": source, "num_images": int(x.shape[0]), "channels": int(x.shape[1]),
            "size": list(x.shape[-2:]), "note": note}


def _synthetic(in_channels: int, size: Size, count: int, seed: int) -> Tuple[torch.Tensor, dict]:
    gen = torch.Generator().manual_seed(seed)
    n = max(1, min(count, SYNTHETIC_BYTES // (in_channels * size[0] * size[1] * 4)))
    scale = 0.5 + torch.rand(n, 1, 1, 1, generator=gen)
    shift = 0.5 * torch.randn(n, 1, 1, 1, generator=gen)
    x = torch.randn(n, in_channels, *size, generator=gen) * scale + shift
    return x, _info("synthetic", None, x, "Gaussian noise images with a random per-image mean and scale")


def _idx(spec: str, in_channels: int, size: Size, count: int, preprocess: Optional[dict]):
    directory = DEFAULT_FASHION_MNIST_PATH if spec == "fashion-mnist" else spec
    path = idx_images_file(directory)
    if path is None:
        raise BenchError(f"no Fashion-MNIST IDX files under {directory} "
                         "(apt-get install dataset-fashion-mnist, or use --data synthetic)")
    raw = torch.from_numpy(_read_idx_images(path)[:count].copy())
    fm = spec == "fashion-mnist" or "fashion" in directory.lower()
    pre, note = _choose_spec(preprocess, "fashion-mnist" if fm else None, raw, in_channels)
    x = images_to_input(raw, in_channels, size, pre)
    return x, _info("fashion-mnist" if fm else "idx", path, x, note)


def _image_dir(directory: str, in_channels: int, size: Size, count: int, preprocess: Optional[dict]):
    raw_size = _raw_size(size, preprocess) if preprocess is not None else size
    raw = _read_image_dir(directory, in_channels, raw_size, count)
    pre, note = _choose_spec(preprocess, None, raw, in_channels)
    x = images_to_input(raw, in_channels, size, pre)
    return x, _info("image-directory", os.path.abspath(directory), x, f"resized to the model input, {note}")


def _tensor_file(path: str, in_channels: int, size: Size, count: int, preprocess: Optional[dict]):
    t = read_tensor_file(path)[:count]
    if t.dtype == torch.uint8:
        pre, note = _choose_spec(preprocess, None, t, in_channels)
        x = images_to_input(t, in_channels, size, pre)
        note = f"uint8 images, {note}"
    else:
        x = t.float() if t.dim() == 4 else t.float()[:, None]
        if x.shape[1] != in_channels:
            raise BenchError(f"data file {path!r} has {x.shape[1]} channels; the model takes {in_channels}")
        note = "float inputs used as they are"
    x = x.contiguous()
    return x, _info("tensor-file", os.path.abspath(path), x, note)


def load_images(spec: str, in_channels: int, size: Size, count: int, seed: int = 0,
                preprocess: Optional[dict] = None) -> Tuple[torch.Tensor, dict]:
    """``count`` (or all available, if fewer) float32 model inputs (N, C, H, W) on the CPU, and a description.

    ``spec``: ``synthetic``, ``fashion-mnist``, a directory of images or of IDX files, or a
    ``.pt`` file.  ``preprocess``: the engine's spec for raw images (None: the dataset's or
    the images' own statistics).
    """
    if spec == "synthetic":
        return _synthetic(in_channels, size, count, seed)
    if spec == "fashion-mnist" or (os.path.isdir(spec) and idx_images_file(spec)):
        return _idx(spec, in_channels, size, count, preprocess)
    if os.path.isdir(spec):
        return _image_dir(spec, in_channels, size, count, preprocess)
    if os.path.isfile(spec):
        return _tensor_file(spec, in_channels, size, count, preprocess)
    raise BenchError(f"unknown --data {spec!r}: expected 'synthetic', 'fashion-mnist', a directory or a .pt file")


# ---------------------------------------------------------------------------- batches
def split_pool(pool: torch.Tensor, calib_images: int, max_batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(calibration images, timing images): disjoint when the pool is large enough, else overlapping."""
    if pool.shape[0] > calib_images + max_batch:
        return pool[-calib_images:], pool[:-calib_images]
    return pool[:calib_images], pool


def rotated_batches(pool: torch.Tensor, batch_size: int, num_batches: int) -> List[torch.Tensor]:
    """``num_batches`` consecutive batches of ``pool``, wrapping around it."""
    n = pool.shape[0]
    return [pool[(torch.arange(batch_size) + j * batch_size) % n] for j in range(num_batches)]
