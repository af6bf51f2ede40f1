"""Datasets for ManiDP training: CIFAR-10, Fashion-MNIST, ImageNet (ImageFolder), synthetic.

Nothing here downloads.  Every loader validates what it reads and raises one
:class:`DatasetError` naming the path and the expected layout, so a bad
``--data_path`` fails before any training starts.

CIFAR-10, Fashion-MNIST and the synthetic set live in memory as tensors
(:class:`TensorImageDataset`); their batches are cut and augmented in one
vectorised step instead of going through a per-image ``DataLoader``, whose
per-image Python work would dominate an epoch on a small CPU.  Normalisation is
:mod:`manidp.preprocess`'s, the one the engine and the bench use.  Augmentation
draws (crop offsets, flips) are fixed per ``(seed, epoch, image)``, so a batch is
the same whatever the number of processes and whether or not the run was
resumed.  ImageNet goes through a regular ``DataLoader`` with seeded workers.

Sharding follows :class:`torch.utils.data.DistributedSampler` (``set_epoch``
semantics): with ``W`` processes each holding ``batch_size // W`` images, the
union of the ranks' k-th batches is the single-process k-th batch.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import random
import struct
import zlib
from dataclasses import asdict, dataclass
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .preprocess import channel_vector, dataset_stats, normalize_pixels

__all__ = [
    "DatasetError", "DatasetInfo", "DataBundle", "TensorImageDataset", "DATASETS",
    "build_dataset", "load_cifar10", "load_fashion_mnist", "load_imagenet", "make_synthetic",
    "read_idx", "train_batches", "eval_batches", "steps_per_epoch", "subset_indices",
    "DEFAULT_FASHION_MNIST_PATH",
]

DATASETS = ("cifar10", "fashion-mnist", "imagenet", "synthetic")
DEFAULT_FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"

CIFAR10_MEAN, CIFAR10_STD, _ = dataset_stats("cifar10")
FMNIST_MEAN, FMNIST_STD, FMNIST_PAD = dataset_stats("fashion-mnist")
IMAGENET_MEAN, IMAGENET_STD, _ = dataset_stats("imagenet")

CIFAR10_LAYOUT = ("a directory holding torchvision's CIFAR-10 python format: cifar-10-batches-py/"
                  "{data_batch_1..5, test_batch, batches.meta} (the cifar-10-batches-py directory "
                  "itself or its parent)")
FMNIST_LAYOUT = ("a directory holding the four Fashion-MNIST IDX files train-images-idx3-ubyte.gz, "
                 "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz "
                 "(or uncompressed, without .gz)")
IMAGENET_LAYOUT = ("an ImageFolder tree: <path>/train/<class>/<image> and <path>/val/<class>/<image>, "
                   "with the same class folders in both")


class DatasetError(ValueError):
    """A dataset is missing or malformed; the message names the path and the expected layout."""


def _fail(path: str, problem: str, layout: str) -> DatasetError:
    """Build the one error message format used for every dataset problem."""
    return DatasetError(f"{problem} (path: {path!r}); expected {layout}")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset, and what checkpoints record."""

    name: str
    num_classes: int
    in_channels: int
    input_size: Tuple[int, int]
    num_train: int
    num_test: int

    def as_dict(self) -> dict:
        """Plain-dict form (checkpoint friendly)."""
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d


class DataBundle(NamedTuple):
    """A dataset's splits: ``train`` (augmented), ``train_eval`` (same images, eval transform), ``test``."""

    info: DatasetInfo
    train: Dataset
    train_eval: Dataset
    test: Dataset


class AugParams(NamedTuple):
    """Per-image augmentation draws for one epoch: crop offsets (N, 2) and flips (N,)."""

    offsets: torch.Tensor
    flips: torch.Tensor


class TensorImageDataset(Dataset):
    """Images held in memory as one tensor, normalised and augmented a whole batch at a time.

    Args:
        images: (N, C, H, W) uint8 (0..255) or float (already in model units before mean/std).
        labels: (N,) int64.
        mean, std: per-channel normalisation (applied after scaling uint8 to [0, 1]), as
            :func:`manidp.preprocess.normalize_pixels` does for every other consumer.
        augment: random crop with ``pad`` pixels of zero padding, and horizontal flip.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float], augment: bool = False, pad: int = 4, flip: bool = True):
        """Store the tensors and the normalisation/augmentation settings."""
        if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"images (N,C,H,W) and labels (N,) expected; got {tuple(images.shape)} "
                             f"and {tuple(labels.shape)}")
        self.images, self.labels = images, labels.long()
        self.mean, self.std = channel_vector(mean), channel_vector(std)
        self.augment, self.pad, self.flip = augment, int(pad), flip

    def __len__(self) -> int:
        """Number of images."""
        return self.images.shape[0]

    def __getitem__(self, i: int):
        """One normalised image without augmentation (for generic ``DataLoader`` use)."""
        x, y = self.batch(torch.tensor([int(i)]))
        return x[0], y[0]

    def subset(self, idx: torch.Tensor) -> "TensorImageDataset":
        """A dataset of the images at ``idx`` with the same settings."""
        return TensorImageDataset(self.images[idx], self.labels[idx], self.mean.flatten().tolist(),
                                  self.std.flatten().tolist(), self.augment, self.pad, self.flip)

    def without_augmentation(self) -> "TensorImageDataset":
        """The same images (shared storage), never augmented."""
        ds = TensorImageDataset(self.images, self.labels, [0.0], [1.0])
        ds.mean, ds.std = self.mean, self.std
        return ds

    def to(self, device) -> "TensorImageDataset":
        """Move the stored images (e.g. to the GPU so batches are cut there)."""
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def augmentation(self, seed: int, epoch: int) -> Optional[AugParams]:
        """This epoch's draws for every image; ``None`` when the dataset is not augmented."""
        if not self.augment:
            return None
        g = torch.Generator().manual_seed(_mix_seed(seed, epoch, 0x5EED))
        n = len(self)
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        return AugParams(offsets, flips)

    def batch(self, idx: torch.Tensor, aug: Optional[AugParams] = None):
        """The normalised (and, with ``aug``, augmented) images at ``idx`` and their labels."""
        idx = idx.to(self.images.device)
        x = self.images[idx].float()
        if aug is not None:
            x = self._crop_flip(x, aug.offsets.to(x.device)[idx], aug.flips.to(x.device)[idx])
        scale = 255.0 if self.images.dtype == torch.uint8 else 1.0
        return normalize_pixels(x, self.mean, self.std, scale), self.labels[idx]

    def _crop_flip(self, x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Zero-pad, cut one window per image (gather), flip where drawn."""
        n, c, h, w = x.shape
        xp = F.pad(x, (self.pad,) * 4)  # zero padding in raw pixel units, as torchvision's RandomCrop
        rows = offsets[:, 0:1] + torch.arange(h, device=x.device)
        cols = offsets[:, 1:2] + torch.arange(w, device=x.device)
        out = xp[torch.arange(n, device=x.device)[:, None, None, None],
                 torch.arange(c, device=x.device)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
        return torch.where(flips[:, None, None, None], out.flip(3), out)


def _mix_seed(*parts: int) -> int:
    """Combine integers into one generator seed (deterministic, unlike ``hash`` of strings)."""
    s = 0x9E3779B9
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2 ** 61 - 1)
    return s


def subset_indices(n: int, k: Optional[int]) -> Optional[torch.Tensor]:
    """A fixed (seed-independent) random choice of ``k`` of ``n`` indices, sorted; ``None`` = all."""
    if k is None or k <= 0 or k >= n:
        return None
    g = torch.Generator().manual_seed(0)
    return torch.randperm(n, generator=g)[:k].sort().values


# ----------------------------------------------------------------------------- CIFAR-10

class _SafeUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR files that only builds numpy arrays and plain containers."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        """Resolve only allow-listed globals; numpy 1.x module names map onto numpy 2.x."""
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _cifar_dir(path: str) -> str:
    """The directory that holds ``data_batch_1`` (``path`` itself or ``path/cifar-10-batches-py``)."""
    for cand in (os.path.join(path, "cifar-10-batches-py"), path):
        if os.path.isfile(os.path.join(cand, "data_batch_1")):
            return cand
    if not os.path.exists(path):
        raise _fail(path, "CIFAR-10 data path does not exist", CIFAR10_LAYOUT)
    raise _fail(path, "no cifar-10-batches-py/data_batch_1 found", CIFAR10_LAYOUT)


def _read_cifar_batch(file: str, num_classes: int = 10) -> Tuple[torch.Tensor, torch.Tensor]:
    """Read one CIFAR-10 pickle batch into uint8 (N, 3, 32, 32) images and int64 labels."""
    if not os.path.isfile(file):
        raise _fail(file, "missing CIFAR-10 batch file", CIFAR10_LAYOUT)
    try:
        with open(file, "rb") as f:
            entry = _SafeUnpickler(f, encoding="latin1").load()
    except Exception as e:  # any unpickling failure means a corrupt or foreign file
        raise _fail(file, f"cannot unpickle CIFAR-10 batch ({type(e).__name__}: {e})", CIFAR10_LAYOUT) from None
    if not isinstance(entry, dict):
        raise _fail(file, "CIFAR-10 batch is not a dict", CIFAR10_LAYOUT)
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data, labels = entry.get("data"), entry.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise _fail(file, "CIFAR-10 batch 'data' is not a uint8 array of shape (N, 3072)", CIFAR10_LAYOUT)
    y = _cifar_labels(labels, data.shape[0], num_classes, file)
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), y


def _cifar_labels(labels, n: int, num_classes: int, file: str) -> torch.Tensor:
    """A batch's ``labels``: a list (or 1-D integer array) of ``n`` integers in ``0..num_classes-1``."""
    if not isinstance(labels, (list, tuple, np.ndarray)):
        raise _fail(file, f"CIFAR-10 batch 'labels' must be a list of integers; got {type(labels).__name__}",
                    CIFAR10_LAYOUT)
    try:
        arr = np.asarray(labels)
    except (ValueError, TypeError) as e:  # ragged or otherwise unconvertible lists
        raise _fail(file, f"CIFAR-10 batch 'labels' is not a list of integers ({e})", CIFAR10_LAYOUT) from None
    if arr.ndim != 1 or arr.shape[0] != n:
        raise _fail(file, f"CIFAR-10 batch 'labels' must hold one label per image ({n}); got shape {arr.shape}",
                    CIFAR10_LAYOUT)
    if n and arr.dtype.kind not in "iu":  # floats would truncate, strings and bools mean a foreign file
        raise _fail(file, f"CIFAR-10 batch 'labels' must be integers; got {arr.dtype} values", CIFAR10_LAYOUT)
    y = torch.as_tensor(arr.astype(np.int64))
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise _fail(file, f"CIFAR-10 labels outside 0..{num_classes - 1}", CIFAR10_LAYOUT)
    return y


def load_cifar10(path: str, augment: bool = True) -> Tuple[TensorImageDataset, TensorImageDataset]:
    """CIFAR-10 train/test splits from torchvision's on-disk python format (never downloads)."""
    root = _cifar_dir(path)
    if not os.path.isfile(os.path.join(root, "batches.meta")):
        raise _fail(root, "missing batches.meta", CIFAR10_LAYOUT)
    parts = [_read_cifar_batch(os.path.join(root, f"data_batch_{i}")) for i in range(1, 6)]
    xtr, ytr = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    xte, yte = _read_cifar_batch(os.path.join(root, "test_batch"))
    train = TensorImageDataset(xtr, ytr, CIFAR10_MEAN, CIFAR10_STD, augment=augment)
    return train, TensorImageDataset(xte, yte, CIFAR10_MEAN, CIFAR10_STD)


# ----------------------------------------------------------------------------- Fashion-MNIST

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) into a numpy array, validating its header.

    Every dimension must be >= 1 and the data exactly as long as the header
    implies; a gzip stream is read only as far as the header says, so a small
    file cannot stand for more data than it declares.
    """
    try:
        with open(path, "rb") as f:
            opener = gzip.GzipFile(fileobj=f) if f.read(2) == b"\x1f\x8b" else f
            f.seek(0)
            return _read_idx_stream(opener, path)
    except (OSError, EOFError, zlib.error) as e:
        raise _fail(path, f"cannot read IDX file ({type(e).__name__}: {e})", FMNIST_LAYOUT) from None


def _read_idx_stream(stream, path: str) -> np.ndarray:
    """The array in an open IDX stream: magic, dimensions, then exactly the data they imply."""
    magic = stream.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES or magic[3] == 0:
        raise _fail(path, "not an IDX file (bad magic number)", FMNIST_LAYOUT)
    ndim, dtype = magic[3], np.dtype(_IDX_DTYPES[magic[2]])
    head = stream.read(4 * ndim)
    if len(head) < 4 * ndim:
        raise _fail(path, "IDX header truncated", FMNIST_LAYOUT)
    dims = struct.unpack(f">{ndim}I", head)
    if min(dims) < 1:
        raise _fail(path, f"IDX header declares dimensions {dims}; every dimension must be >= 1", FMNIST_LAYOUT)
    expected = math.prod(dims) * dtype.itemsize  # Python ints: no overflow however large the header claims
    data = _read_up_to(stream, expected + 1)  # one byte more reveals trailing data
    if len(data) != expected:
        got = "more" if len(data) > expected else f"{len(data)}"
        raise _fail(path, f"IDX header {dims} implies {expected} bytes of {dtype} data; the file holds {got}",
                    FMNIST_LAYOUT)
    return np.frombuffer(data, dtype=dtype).reshape(dims)


def _read_up_to(stream, limit: int, chunk: int = 1 << 24) -> bytes:
    """At most ``limit`` bytes, read in chunks so memory follows the data present, not a claimed size."""
    parts, got = [], 0
    while got < limit:
        part = stream.read(min(chunk, limit - got))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _idx_file(root: str, stem: str) -> str:
    """``root/stem.gz`` or ``root/stem``, whichever exists."""
    for name in (stem + ".gz", stem):
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    raise _fail(root, f"missing {stem}.gz", FMNIST_LAYOUT)


def _fmnist_split(root: str, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """One split as uint8 (N, 1, 32, 32) images (28x28 zero-padded by ``FMNIST_PAD``) and int64 labels."""
    xf, yf = _idx_file(root, f"{split}-images-idx3-ubyte"), _idx_file(root, f"{split}-labels-idx1-ubyte")
    x, y = read_idx(xf), read_idx(yf)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise _fail(xf, f"expected uint8 images of shape (N, H, W); got {x.dtype} {x.shape}", FMNIST_LAYOUT)
    if y.ndim != 1 or y.shape[0] != x.shape[0] or y.dtype != np.uint8:
        raise _fail(yf, f"expected {x.shape[0]} labels (uint8, one per image); got {y.dtype} of shape {y.shape}", FMNIST_LAYOUT)
    if y.size and (int(y.min()) < 0 or int(y.max()) > 9):
        raise _fail(yf, "labels outside 0..9", FMNIST_LAYOUT)
    images = F.pad(torch.from_numpy(x.copy()).unsqueeze(1), (FMNIST_PAD,) * 4)  # 28 -> 32: CIFAR archs, FLOPs
    return images, torch.from_numpy(y.astype(np.int64))


def load_fashion_mnist(path: Optional[str] = None, augment: bool = True):
    """Fashion-MNIST train/test from the IDX files (default: the Debian package's directory)."""
    path = path or DEFAULT_FASHION_MNIST_PATH
    roots = [path, os.path.join(path, "FashionMNIST", "raw")]
    root = next((r for r in roots if os.path.isdir(r) and any(
        n.startswith("train-images-idx3-ubyte") for n in os.listdir(r))), None)
    if root is None:
        problem = "Fashion-MNIST data path does not exist" if not os.path.exists(path) else \
            "no train-images-idx3-ubyte(.gz) found"
        raise _fail(path, problem, FMNIST_LAYOUT)
    xtr, ytr = _fmnist_split(root, "train")
    xte, yte = _fmnist_split(root, "t10k")
    train = TensorImageDataset(xtr, ytr, FMNIST_MEAN, FMNIST_STD, augment=augment)
    return train, TensorImageDataset(xte, yte, FMNIST_MEAN, FMNIST_STD)


# ----------------------------------------------------------------------------- synthetic

def make_synthetic(num_train: int = 256, num_test: int = 128, num_classes: int = 10,
                   in_channels: int = 3, size: int = 32, seed: int = 0):
    """Small learnable random data: smooth class prototypes plus noise (fixed by ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(num_classes, in_channels, 4, 4, generator=g)
    protos = F.interpolate(protos, size=(size, size), mode="bilinear", align_corners=False)

    def split(n: int):
        """``n`` labelled images: a prototype per label plus Gaussian noise."""
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = protos[y] + 0.8 * torch.randn(n, in_channels, size, size, generator=g)
        return TensorImageDataset(x, y, [0.0] * in_channels, [1.0] * in_channels)

    return split(num_train), split(num_test)


# ----------------------------------------------------------------------------- ImageNet

def _imagenet_transforms(image_size: int):
    """Standard ImageNet train/eval transforms at ``image_size``."""
    from torchvision import transforms as T
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    resize = int(round(image_size * 256 / 224))
    evalt = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), norm])
    return train, evalt


def _image_folder(root: str, transform):
    """``ImageFolder(root)`` with its errors turned into a :class:`DatasetError`."""
    from torchvision.datasets import ImageFolder
    if not os.path.isdir(root):
        raise _fail(root, "missing ImageFolder split directory", IMAGENET_LAYOUT)
    try:
        ds = ImageFolder(root, transform=transform)
    except (FileNotFoundError, OSError, RuntimeError) as e:
        raise _fail(root, f"unusable ImageFolder split ({e})", IMAGENET_LAYOUT) from None
    _check_first_image(ds, root)
    return ds


def _check_first_image(ds, root: str) -> None:
    """Open one image per split so an unreadable tree fails now, not mid-epoch."""
    from PIL import Image
    path = ds.samples[0][0]
    try:
        with Image.open(path) as im:
            im.convert("RGB").load()
    except Exception as e:  # PIL raises many types for corrupt files
        raise _fail(root, f"cannot read image {path!r} ({type(e).__name__}: {e})", IMAGENET_LAYOUT) from None


def load_imagenet(path: str, image_size: int = 224):
    """ImageNet-style ImageFolder splits: (train augmented, train with eval transform, val)."""
    if not os.path.isdir(path):
        raise _fail(path, "ImageNet data path does not exist", IMAGENET_LAYOUT)
    ttrain, teval = _imagenet_transforms(image_size)
    train = _image_folder(os.path.join(path, "train"), ttrain)
    train_eval = _image_folder(os.path.join(path, "train"), teval)
    val = _image_folder(os.path.join(path, "val"), teval)
    if val.class_to_idx != train.class_to_idx:
        raise _fail(path, f"train has classes {train.classes[:5]}..., val has {val.classes[:5]}...",
                    IMAGENET_LAYOUT)
    return train, train_eval, val


# ----------------------------------------------------------------------------- entry point

def build_dataset(name: str, data_path: Optional[str] = None, train_subset: Optional[int] = None,
                  test_subset: Optional[int] = None, image_size: Optional[int] = None,
                  augment: bool = True) -> DataBundle:
    """Load a dataset by name, optionally keeping a fixed subset of each split.

    For ``synthetic``, ``train_subset``/``test_subset`` set the sizes (defaults 256/128)
    and ``image_size`` the resolution (default 32).
    """
    if name == "synthetic":
        size = image_size or 32
        train, test = make_synthetic(train_subset or 256, test_subset or 128, size=size)
        return _bundle(name, train, train.without_augmentation(), test, 10, 3, size)
    if name in ("cifar10", "fashion-mnist"):
        if name == "cifar10" and not data_path:
            raise DatasetError(f"--data_path is required for cifar10; expected {CIFAR10_LAYOUT}")
        loader = load_cifar10 if name == "cifar10" else load_fashion_mnist
        train, test = loader(data_path, augment=augment)
        train, test = _tensor_subset(train, train_subset), _tensor_subset(test, test_subset)
        return _bundle(name, train, train.without_augmentation(), test, 10,
                       train.images.shape[1], train.images.shape[-1])
    if name == "imagenet":
        if not data_path:
            raise DatasetError(f"--data_path is required for imagenet; expected {IMAGENET_LAYOUT}")
        size = image_size or 224
        train, train_eval, val = load_imagenet(data_path, size)
        tr_idx = subset_indices(len(train), train_subset)
        te_idx = subset_indices(len(val), test_subset)
        return _bundle(name, _subset(train, tr_idx), _subset(train_eval, tr_idx), _subset(val, te_idx),
                       len(train.classes), 3, size)
    raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")


def _tensor_subset(ds: TensorImageDataset, k: Optional[int]) -> TensorImageDataset:
    """``ds`` restricted to :func:`subset_indices` (unchanged when ``k`` is None)."""
    idx = subset_indices(len(ds), k)
    return ds if idx is None else ds.subset(idx)


def _subset(ds: Dataset, idx: Optional[torch.Tensor]) -> Dataset:
    """``Subset(ds, idx)``, or ``ds`` itself for ``idx`` None."""
    return ds if idx is None else Subset(ds, idx.tolist())


def _bundle(name, train, train_eval, test, num_classes, in_channels, size) -> DataBundle:
    """Assemble a :class:`DataBundle` and check neither split is empty."""
    if len(train) == 0 or len(test) == 0:
        raise DatasetError(f"dataset {name!r} has an empty split (train {len(train)}, test {len(test)})")
    info = DatasetInfo(name, int(num_classes), int(in_channels), (int(size), int(size)), len(train), len(test))
    return DataBundle(info, train, train_eval, test)


# ----------------------------------------------------------------------------- batching

def steps_per_epoch(num_train: int, local_batch: int, world_size: int = 1) -> int:
    """Training batches per epoch on each rank (the sampler pads the set to a multiple of W)."""
    per_rank = math.ceil(num_train / world_size)
    return math.ceil(per_rank / local_batch)


def _train_order(n: int, epoch: int, seed: int, rank: int, world: int) -> List[int]:
    """This rank's shuffled indices for ``epoch`` (``DistributedSampler`` semantics)."""
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(iter(sampler))


def train_batches(ds: Dataset, epoch: int, local_batch: int, seed: int, rank: int = 0,
                  world: int = 1, workers: int = 0, pin_memory: bool = False) -> Iterator:
    """Yield this rank's ``(x, y)`` training batches for ``epoch``; reproducible from (seed, epoch)."""
    if isinstance(ds, TensorImageDataset):
        return _tensor_batches(ds, torch.tensor(_train_order(len(ds), epoch, seed, rank, world)),
                               local_batch, ds.augmentation(seed, epoch))
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    gen = torch.Generator().manual_seed(_mix_seed(seed, epoch, rank))
    return iter(DataLoader(ds, local_batch, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                           worker_init_fn=_seed_worker, generator=gen))


def eval_batches(ds: Dataset, batch_size: int, rank: int = 0, world: int = 1, workers: int = 0,
                 pin_memory: bool = False) -> Iterator:
    """Yield this rank's share (every W-th image, no padding) of ``ds`` in order."""
    idx = torch.arange(rank, len(ds), world)
    if isinstance(ds, TensorImageDataset):
        return _tensor_batches(ds, idx, batch_size, None)
    return iter(DataLoader(Subset(ds, idx.tolist()), batch_size, shuffle=False, num_workers=workers,
                           pin_memory=pin_memory, worker_init_fn=_seed_worker))


def _tensor_batches(ds: TensorImageDataset, order: torch.Tensor, batch: int, aug) -> Iterator:
    """Cut ``order`` into batches and materialise each with one vectorised call."""
    for start in range(0, len(order), batch):
        yield ds.batch(order[start:start + batch], aug)


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in a DataLoader worker from its torch seed (set by the loader)."""
    s = torch.initial_seed() % 2 ** 32
    np.random.seed(s)
    random.seed(s)
