"""Dataset loaders on tiny files written in the real on-disk formats, and their error messages."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from manidp.data import (DatasetError, TensorImageDataset, build_dataset, eval_batches, load_cifar10,
                         load_fashion_mnist, read_idx, steps_per_epoch, train_batches,
                         DEFAULT_FASHION_MNIST_PATH)


# ----------------------------------------------------------------------------- writers

def write_cifar(root, per_batch=4, test=6, protocol=2, bytes_keys=False, seed=0):
    """Write torchvision's cifar-10-batches-py layout with tiny batches; returns the images."""
    rng = np.random.RandomState(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    images = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        data = rng.randint(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.randint(0, 10, size=n)]
        with open(d / name, "wb") as f:
            pickle.dump({key("data"): data, key("labels"): labels, key("batch_label"): name}, f, protocol=protocol)
        images[name] = (data, labels)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({key("label_names"): [f"c{i}" for i in range(10)]}, f, protocol=protocol)
    return images


def idx_bytes(arr: np.ndarray) -> bytes:
    """Serialise a uint8 array in IDX format."""
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_fmnist(root, n_train=20, n_test=10, compress=True):
    """Write the four Fashion-MNIST IDX files with random content."""
    rng = np.random.RandomState(1)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        for kind, arr in (("images-idx3", rng.randint(0, 256, (n, 28, 28)).astype(np.uint8)),
                          ("labels-idx1", rng.randint(0, 10, n).astype(np.uint8))):
            raw = idx_bytes(arr)
            name = f"{split}-{kind}-ubyte" + (".gz" if compress else "")
            (root / name).write_bytes(gzip.compress(raw) if compress else raw)


def write_image_folder(root, classes=("cat", "dog"), per_class=3, size=12):
    """Write a tiny train/val ImageFolder tree of PNGs."""
    from PIL import Image
    rng = np.random.RandomState(2)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                arr = rng.randint(0, 256, (size, size, 3)).astype(np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")


# ----------------------------------------------------------------------------- CIFAR-10

@pytest.mark.parametrize("protocol,bytes_keys", [(2, True), (4, False)])
def test_cifar10_loads_pickles(tmp_path, protocol, bytes_keys):
    """Both python2-style (bytes keys) and python3 pickles; images come back in CHW order."""
    imgs = write_cifar(tmp_path, protocol=protocol, bytes_keys=bytes_keys)
    train, test = load_cifar10(str(tmp_path))
    assert len(train) == 20 and len(test) == 6
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
    data, labels = imgs["data_batch_2"]
    assert torch.equal(train.images[4], torch.from_numpy(data[0].reshape(3, 32, 32)))
    assert train.labels[4].item() == labels[0]
    # the cifar-10-batches-py directory itself is accepted too
    assert len(load_cifar10(str(tmp_path / "cifar-10-batches-py"))[1]) == 6


def test_cifar10_bundle_normalised_and_augmented(tmp_path):
    """Test batches are normalised; train batches are cropped/flipped, reproducibly per (seed, epoch)."""
    write_cifar(tmp_path)
    b = build_dataset("cifar10", str(tmp_path))
    assert b.info.as_dict() == {"name": "cifar10", "num_classes": 10, "in_channels": 3, "input_size": [32, 32],
                                "num_train": 20, "num_test": 6}
    x, y = next(eval_batches(b.test, 6))
    raw = b.test.images.float() / 255
    assert torch.allclose(x, (raw - b.test.mean) / b.test.std, atol=1e-6)
    e0 = next(train_batches(b.train, 0, 20, seed=1))[0]
    assert torch.equal(e0, next(train_batches(b.train, 0, 20, seed=1))[0])
    assert not torch.equal(e0, next(train_batches(b.train, 1, 20, seed=1))[0])


def test_cifar10_subset_is_deterministic(tmp_path):
    """The same --train_subset/--test_subset picks the same images every time."""
    write_cifar(tmp_path)
    a = build_dataset("cifar10", str(tmp_path), train_subset=7, test_subset=3)
    b = build_dataset("cifar10", str(tmp_path), train_subset=7, test_subset=3)
    assert a.info.num_train == 7 and a.info.num_test == 3
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)


def _expect_error(fn, *needles):
    """``fn()`` raises one DatasetError mentioning every needle (path, expected layout)."""
    with pytest.raises(DatasetError) as info:
        fn()
    msg = str(info.value)
    for n in needles:
        assert n in msg, msg
    return msg


def test_cifar10_errors(tmp_path):
    """Missing dir, missing batch, corrupt pickle, wrong shape, unsafe pickle: clear errors."""
    _expect_error(lambda: load_cifar10(str(tmp_path / "none")), str(tmp_path / "none"), "expected")
    write_cifar(tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    os.unlink(d / "test_batch")
    _expect_error(lambda: load_cifar10(str(tmp_path)), "test_batch", "cifar-10-batches-py")
    (d / "test_batch").write_bytes(b"\x80\x02garbage")
    _expect_error(lambda: load_cifar10(str(tmp_path)), "test_batch", "unpickle")
    with open(d / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, f)
    _expect_error(lambda: load_cifar10(str(tmp_path)), "(N, 3072)")
    with open(d / "test_batch", "wb") as f:
        pickle.dump({"data": os.system}, f)  # a pickle that would import os.system
    _expect_error(lambda: load_cifar10(str(tmp_path)), "refusing")


def test_missing_data_path_errors_before_training(tmp_path):
    """train() fails with the dataset error before building anything; the CLI exits 2 without a traceback."""
    from manidp.train import main, train
    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        train(dataset="cifar10", data_path=str(tmp_path), ngpu=0, save_path=str(tmp_path / "run"), quiet=True)
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pth")
    assert main(["--dataset", "cifar10", "--data_path", str(tmp_path / "x"), "--ngpu", "0", "--quiet",
                 "--save_path", str(tmp_path / "run")]) == 2


# ----------------------------------------------------------------------------- Fashion-MNIST

@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx(tmp_path, compress):
    """IDX files (gz or not) load as one-channel 32x32 (zero padding of 2)."""
    write_fmnist(tmp_path, compress=compress)
    train, test = load_fashion_mnist(str(tmp_path))
    assert train.images.shape == (20, 1, 32, 32) and test.images.shape == (10, 1, 32, 32)
    raw = read_idx(str(tmp_path / ("train-images-idx3-ubyte" + (".gz" if compress else ""))))
    assert torch.equal(train.images[:, 0, 2:30, 2:30], torch.from_numpy(raw.copy()))
    assert train.images[:, :, :2].sum() == 0 and train.images[:, :, :, 30:].sum() == 0


def test_fashion_mnist_batches_equal_the_shared_preprocessing(tmp_path):
    """Training/evaluation inputs are exactly what manidp.preprocess makes of the raw 28x28 images."""
    from manidp.preprocess import preprocess_spec, raw_to_input
    write_fmnist(tmp_path)
    b = build_dataset("fashion-mnist", str(tmp_path), augment=False)
    x, _ = next(eval_batches(b.test, 10))
    raw = torch.from_numpy(read_idx(str(tmp_path / "t10k-images-idx3-ubyte.gz")).copy())
    assert torch.equal(x, raw_to_input(raw, preprocess_spec("fashion-mnist"), in_channels=1))
    assert torch.allclose(x[:, :, 0], torch.full_like(x[:, :, 0], -0.2860 / 0.3530))  # padded border


def test_fashion_mnist_errors(tmp_path):
    """Bad magic, truncated data, label count mismatch, missing files."""
    _expect_error(lambda: load_fashion_mnist(str(tmp_path / "none")), "does not exist", "t10k-images")
    write_fmnist(tmp_path, compress=False)
    f = tmp_path / "train-images-idx3-ubyte"
    good = f.read_bytes()
    f.write_bytes(b"\x01\x02" + good[2:])
    _expect_error(lambda: load_fashion_mnist(str(tmp_path)), "bad magic", str(f))
    f.write_bytes(good[:-5])
    _expect_error(lambda: load_fashion_mnist(str(tmp_path)), "header")
    f.write_bytes(good)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    _expect_error(lambda: load_fashion_mnist(str(tmp_path)), "expected 20 labels")
    os.unlink(tmp_path / "t10k-labels-idx1-ubyte")
    _expect_error(lambda: load_fashion_mnist(str(tmp_path)), "t10k-labels-idx1-ubyte")
    g = tmp_path / "gz"
    write_fmnist(g)
    (g / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00broken")
    _expect_error(lambda: load_fashion_mnist(str(g)), "cannot read IDX")


@pytest.mark.skipif(not os.path.isdir(DEFAULT_FASHION_MNIST_PATH), reason="Debian Fashion-MNIST not installed")
def test_fashion_mnist_real_default_path():
    """The installed package loads by default, whole, as tensors."""
    b = build_dataset("fashion-mnist", train_subset=100, test_subset=50)
    assert b.info.num_train == 100 and b.info.in_channels == 1 and b.info.input_size == (32, 32)
    x, y = next(eval_batches(b.test, 50))
    assert x.shape == (50, 1, 32, 32) and int(y.max()) <= 9


# ----------------------------------------------------------------------------- ImageFolder

def test_imagenet_image_folder(tmp_path):
    """train/ and val/ ImageFolder trees at a small --image_size."""
    write_image_folder(tmp_path)
    b = build_dataset("imagenet", str(tmp_path), image_size=16)
    assert b.info.num_classes == 2 and b.info.num_train == 6 and b.info.input_size == (16, 16)
    x, y = next(train_batches(b.train, 0, 4, seed=0))
    assert x.shape == (4, 3, 16, 16)
    xs = torch.cat([bx for bx, _ in eval_batches(b.test, 4)])
    assert xs.shape == (6, 3, 16, 16)
    sub = build_dataset("imagenet", str(tmp_path), train_subset=3, image_size=16)
    assert len(sub.train) == len(sub.train_eval) == 3


def test_imagenet_errors(tmp_path):
    """Missing split, mismatched classes, unreadable image."""
    write_image_folder(tmp_path, per_class=1)
    import shutil
    shutil.rmtree(tmp_path / "val")
    _expect_error(lambda: build_dataset("imagenet", str(tmp_path)), str(tmp_path / "val"), "ImageFolder")
    (tmp_path / "val" / "bird").mkdir(parents=True)
    shutil.copy(tmp_path / "train" / "cat" / "0.png", tmp_path / "val" / "bird" / "0.png")
    _expect_error(lambda: build_dataset("imagenet", str(tmp_path)), "classes")
    shutil.rmtree(tmp_path / "val")
    shutil.copytree(tmp_path / "train", tmp_path / "val")
    (tmp_path / "val" / "cat" / "0.png").write_bytes(b"not a png")
    _expect_error(lambda: build_dataset("imagenet", str(tmp_path)), "cannot read image")


# ----------------------------------------------------------------------------- batching

def test_sharded_batches_union_equals_single_process():
    """W ranks with batch B/W see, batch by batch, exactly the single-process batch of B (augmented too)."""
    g = torch.Generator().manual_seed(0)
    ds = TensorImageDataset(torch.randint(0, 256, (40, 1, 8, 8), generator=g, dtype=torch.uint8),
                            torch.arange(40), [0.5], [0.25], augment=True, pad=2)
    single = list(train_batches(ds, 3, 8, seed=5))
    ranks = [list(train_batches(ds, 3, 4, seed=5, rank=r, world=2)) for r in range(2)]
    assert len(single) == len(ranks[0]) == steps_per_epoch(40, 4, 2) == 5
    for k, (x, y) in enumerate(single):
        order = torch.cat([ranks[0][k][1], ranks[1][k][1]]).argsort()
        xs = torch.cat([ranks[0][k][0], ranks[1][k][0]])[order]
        ys = torch.cat([ranks[0][k][1], ranks[1][k][1]])[order]
        assert torch.equal(ys, y.sort().values)
        assert torch.equal(xs, x[y.argsort()])


def test_eval_shards_cover_everything_once():
    """Evaluation shards over 3 ranks see each test image exactly once."""
    ds = TensorImageDataset(torch.zeros(11, 1, 4, 4), torch.arange(11), [0.0], [1.0])
    seen = torch.cat([y for r in range(3) for _, y in eval_batches(ds, 2, rank=r, world=3)])
    assert sorted(seen.tolist()) == list(range(11))


def test_unknown_dataset():
    """An unknown dataset name is a DatasetError."""
    with pytest.raises(DatasetError, match="unknown dataset"):
        build_dataset("mnist")
