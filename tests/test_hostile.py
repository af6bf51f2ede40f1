"""Hostile and careless input: crafted engine files and checkpoints, bad configs, bad CLI arguments.

Every file here is built by the test itself from the built-in model or a tiny training run.
Outcomes allowed: the documented exception with a message naming what was expected, or a
clean one-line CLI error with exit status 2; never a raw traceback, a huge allocation, code
run from a file, or a training run silently overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch

from conftest import ROOT, SYNTH, run_module, subprocess_env, threads
from manidp.deploy import DynamicResNet, EngineFormatError
from manidp.pretrained import DEFAULT_MODEL_PATH


def _payload():
    return torch.load(DEFAULT_MODEL_PATH, map_location="cpu", weights_only=True)


def _write(payload, path) -> str:
    torch.save(payload, str(path))
    return str(path)


def _with_config(tmp_path, name="e.pt", **changes):
    p = _payload()
    cfg = json.loads(p["config"])
    for key, value in changes.items():
        target = cfg
        *parents, leaf = key.split("__")
        for k in parents:
            target = target[int(k)] if isinstance(target, list) else target[k]
        target[int(leaf) if isinstance(target, list) else leaf] = value
    p["config"] = json.dumps(cfg)
    return _write(p, tmp_path / name)


# ---------------------------------------------------------------- bounded loading

@pytest.mark.parametrize("hidden", [2 ** 22, 2 ** 30])
def test_expanded_gate_tensor_is_refused_before_allocating(tmp_path, hidden):
    p = _payload()
    t = p["tensors"]
    t["blocks.0.gate1.fc1"] = torch.zeros(1, 16).expand(hidden, 16)
    t["blocks.0.gate1.fc2"] = torch.zeros(16, 1).expand(16, hidden)
    path = _write(p, tmp_path / "bomb.pt")
    assert os.path.getsize(path) < 3_000_000
    with pytest.raises(EngineFormatError, match="gate1|hidden|stride|expanded"):
        DynamicResNet.load(path)


def test_oversized_gate_hidden_is_refused(tmp_path):
    p = _payload()
    t = p["tensors"]
    t["blocks.0.gate1.fc1"] = torch.zeros(4096, 16)
    t["blocks.0.gate1.fc2"] = torch.zeros(16, 4096)
    with pytest.raises(EngineFormatError, match="hidden"):
        DynamicResNet.load(_write(p, tmp_path / "big.pt"))


def test_compressed_records_are_refused(tmp_path):
    src = _write(_payload(), tmp_path / "plain.pt")
    dst = tmp_path / "deflated.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    with pytest.raises(EngineFormatError, match="compress"):
        DynamicResNet.load(str(dst))


def test_declared_bytes_larger_than_file_are_refused(tmp_path):
    p = _payload()
    big = torch.zeros(1 << 16)
    p["tensors"]["blocks.0.conv1.bias"] = big[:16]  # a 16-element view of a 256 KiB storage
    with pytest.raises(EngineFormatError):
        DynamicResNet.load(_write(p, tmp_path / "view.pt"))


@pytest.mark.parametrize("config", ["[" * 100_000 + "]" * 100_000, json.dumps({"pad": "x" * (2 << 20)})])
def test_deep_or_huge_config_header_is_refused(tmp_path, config):
    p = _payload()
    p["config"] = config
    with pytest.raises(EngineFormatError, match="header|malformed"):
        DynamicResNet.load(_write(p, tmp_path / "header.pt"))


def test_unexpected_and_non_float32_tensors_are_refused(tmp_path):
    p = _payload()
    p["tensors"]["blocks.0.extra"] = torch.zeros(4)
    with pytest.raises(EngineFormatError, match="does not describe"):
        DynamicResNet.load(_write(p, tmp_path / "extra.pt"))
    p = _payload()
    p["tensors"]["fc.bias"] = p["tensors"]["fc.bias"].double()
    with pytest.raises(EngineFormatError, match="float32"):
        DynamicResNet.load(_write(p, tmp_path / "double.pt"))


def test_a_legacy_non_zip_file_is_not_an_engine(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(_payload(), path, _use_new_zipfile_serialization=False)
    with pytest.raises(EngineFormatError, match="zip"):
        DynamicResNet.load(str(path))


# ---------------------------------------------------------------- integrity

def _flip_bit_in_tensor_record(path: str, out: str) -> None:
    raw = bytearray(open(path, "rb").read())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size >= 64)
    # local header: 30 bytes + name + extra, then the stored bytes
    name_len = int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + 3] ^= 0x40  # an exponent bit of the first float
    open(out, "wb").write(bytes(raw))


def test_engine_file_carries_a_digest_and_a_flipped_bit_is_caught(tmp_path):
    engine = DynamicResNet.load(DEFAULT_MODEL_PATH)
    path = str(tmp_path / "e.pt")
    engine.save(path)
    cfg = json.loads(torch.load(path, weights_only=True)["config"])
    assert len(cfg["sha256"]) == 64
    DynamicResNet.load(path)  # intact: loads
    bad = str(tmp_path / "flipped.pt")
    _flip_bit_in_tensor_record(path, bad)
    with pytest.raises(EngineFormatError, match="digest|sha256|corrupt"):
        DynamicResNet.load(bad)


def test_built_in_model_carries_a_digest():
    cfg = json.loads(_payload()["config"])
    assert len(cfg["sha256"]) == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = DynamicResNet.load(DEFAULT_MODEL_PATH, backend="reference")
    assert "sha256" not in engine.config  # the digest belongs to the file, not to the engine


def test_a_changed_config_value_is_caught_by_the_digest(tmp_path):
    with pytest.raises(EngineFormatError, match="digest"):
        DynamicResNet.load(_with_config(tmp_path, clamp_max=999.0))  # a valid value, not the saved one


@pytest.mark.parametrize("digest", ["x" * 64, "ab", None, 7])
def test_a_malformed_digest_is_refused(tmp_path, digest):
    with pytest.raises(EngineFormatError, match="sha256"):
        DynamicResNet.load(_with_config(tmp_path, sha256=digest))


def test_engine_file_without_digest_loads_with_a_warning(tmp_path):
    p = _payload()
    cfg = json.loads(p["config"])
    cfg.pop("sha256", None)
    p["config"] = json.dumps(cfg)
    path = _write(p, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match="digest"):
        DynamicResNet.load(path)


# ---------------------------------------------------------------- config validation

@pytest.mark.parametrize("key,value,match", [
    ("clamp_max", float("nan"), "clamp_max"),
    ("clamp_max", -1.0, "clamp_max"),
    ("blocks__0__stride", 0, "stride"),
    ("blocks__0__stride", -1, "stride"),
    ("blocks__0__stride", 5, "stride"),
    ("stem__stride", 0, "stride"),
    ("stem__padding", -5, "padding"),
    ("stem__padding", 1000, "padding"),
    ("kind", "transformer", "kind"),
    ("num_classes", 0, "num_classes"),
    ("blocks__0__planes", -16, "planes|channels"),
    ("blocks__1__in_channels", 8, "in_channels"),
    ("blocks__3__shortcut", False, "shortcut"),
    ("blocks__0__stride", True, "stride"),
    ("blocks", [], "blocks"),
    ("stem__maxpool", "yes", "maxpool"),
    ("stem__kernel", 0, "kernel"),
    ("clamp_max", True, "clamp_max"),
    ("clamp_max", 10 ** 400, "clamp_max"),
    ("num_classes", 10.0, "num_classes"),
    ("in_channels", 0, "in_channels"),
    ("input_size", [0, 32], "input_size"),
    ("preprocess__std", [0.0], "std"),
    ("preprocess__scale", True, "scale"),
    ("arch", 5, "arch"),
])
def test_config_values_are_validated_on_load(tmp_path, key, value, match):
    with pytest.raises(EngineFormatError, match=match):
        DynamicResNet.load(_with_config(tmp_path, **{key: value}))


def test_directory_and_unreadable_paths_say_so(tmp_path):
    with pytest.raises(IsADirectoryError, match="directory"):
        DynamicResNet.load(str(tmp_path))
    if os.geteuid() != 0:  # root reads anything
        p = _write(_payload(), tmp_path / "locked.pt")
        os.chmod(p, 0)
        with pytest.raises(PermissionError):
            DynamicResNet.load(p)


# ---------------------------------------------------------------- transactional to()

def test_failed_to_leaves_the_engine_as_it_was():
    engine = DynamicResNet.load(DEFAULT_MODEL_PATH, backend="reference")
    x = engine.preprocess(torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8))
    before = engine(x)
    for bad in [dict(device="meta"), dict(dtype=torch.int32)]:
        with pytest.raises((TypeError, ValueError, RuntimeError)):
            engine.to(**bad)
        assert engine.device.type == "cpu" and engine.compute_dtype == torch.float32
        assert torch.equal(engine(x), before)
    try:
        cpu = DynamicResNet.load(DEFAULT_MODEL_PATH, backend="cpu")
    except Exception:
        pytest.skip("cpu backend not available")
    with pytest.raises((TypeError, ValueError, RuntimeError)):
        cpu.set_backend("cpu").to(torch.float64)
    assert cpu.compute_dtype == torch.float32
    assert torch.allclose(cpu(x), before, atol=1e-4)


def test_a_backend_failing_to_prepare_leaves_the_engine_as_it_was(monkeypatch):
    from manidp.deploy import backends

    class Flaky(backends.Backend):
        name = "flaky"

        def prepare(self, engine):
            for blk in engine.blocks:
                blk.cache["flaky"] = "half-built"
            raise RuntimeError("prepare failed half-way")

    monkeypatch.setitem(backends._REGISTRY, "flaky", Flaky)
    engine = DynamicResNet.load(DEFAULT_MODEL_PATH, backend="reference")
    x = engine.preprocess(torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8))
    before, caches = engine(x), [dict(b.cache) for b in engine.blocks]
    buffers = {k: v.data_ptr() for k, v in engine.state_dict().items()}
    with pytest.raises(RuntimeError, match="half-way"):
        engine.set_backend("flaky")
    assert engine.backend.name == "reference" and engine.compute_dtype == torch.float32
    assert [dict(b.cache) for b in engine.blocks] == caches
    assert {k: v.data_ptr() for k, v in engine.state_dict().items()} == buffers
    assert torch.equal(engine(x), before)
    engine.to(torch.float64)  # a later move still works and keeps the backend
    assert engine.backend.name == "reference" and engine.compute_dtype == torch.float64


# ---------------------------------------------------------------- preprocess

@pytest.mark.parametrize("images", [
    torch.rand(2, 28, 28),
    torch.zeros(2, 28, 28, dtype=torch.bool),
    torch.zeros(2, 28, 28, dtype=torch.complex64),
    torch.zeros(2, 28, 28, dtype=torch.int64),
])
def test_preprocess_takes_uint8_only(images):
    engine = DynamicResNet.load(DEFAULT_MODEL_PATH, backend="reference")
    with pytest.raises(TypeError, match="uint8"):
        engine.preprocess(images)


# ---------------------------------------------------------------- gradients

def test_fast_backends_say_they_are_inference_only():
    engine = DynamicResNet.load(DEFAULT_MODEL_PATH, backend="reference")
    x = engine.preprocess(torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8)).requires_grad_()
    engine(x).sum().backward()
    assert x.grad is not None  # the reference backend is differentiable
    try:
        engine.set_backend("cpu")
    except Exception:
        pytest.skip("cpu backend not available")
    out = engine(x.detach().requires_grad_())
    assert not out.requires_grad


# ---------------------------------------------------------------- training runs and checkpoints

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished one-epoch dense run on the synthetic set: its directory."""
    from manidp.train import train
    out = tmp_path_factory.mktemp("run")
    with warnings.catch_warnings(), threads():
        warnings.simplefilter("ignore")
        train(arch="resnet20", dense=True, epochs=1, lr=0.1, save_path=str(out), manualSeed=1, **SYNTH)
    return str(out)


def _snapshot(directory):
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))
            if os.path.isfile(os.path.join(directory, n))}


def test_fresh_run_into_an_existing_run_is_refused(tiny_run):
    from manidp.train import main
    before = _snapshot(tiny_run)
    flags = ["--dense", "--arch", "resnet20", "--dataset", "synthetic", "--train_subset", "64", "--test_subset", "32",
             "--epochs", "1", "--ngpu", "0", "--quiet", "--save_path", tiny_run]
    assert main(flags) == 2
    assert _snapshot(tiny_run) == before


def test_overwrite_flag_replaces_a_run(tiny_run, tmp_path):
    from manidp.train import main
    run = str(tmp_path / "copy")
    shutil.copytree(tiny_run, run)
    flags = ["--dense", "--arch", "resnet20", "--dataset", "synthetic", "--train_subset", "64", "--test_subset", "32",
             "--epochs", "1", "--ngpu", "0", "--quiet", "--save_path", run, "--overwrite"]
    with threads():
        assert main(flags) == 0
    lines = open(os.path.join(run, "log.jsonl")).read().splitlines()
    assert len([ln for ln in lines if ln.strip()]) >= 1


def test_corrupted_checkpoint_is_caught(tiny_run, tmp_path):
    from manidp.checkpoint import CheckpointError, read_checkpoint
    src = os.path.join(tiny_run, "checkpoint.pth")
    ckpt = read_checkpoint(src)
    assert len(ckpt["sha256"]) == 64
    bad = str(tmp_path / "flipped.pth")
    _flip_bit_in_tensor_record(src, bad)
    with pytest.raises(CheckpointError, match="flipped.pth"):
        read_checkpoint(bad)
    r = run_module("manidp.flops_cli", ["--checkpoint", bad, "--test_subset", "8"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr


def test_checkpoint_without_digest_loads_with_a_warning(tiny_run, tmp_path):
    from manidp.checkpoint import read_checkpoint
    ckpt = torch.load(os.path.join(tiny_run, "checkpoint.pth"), weights_only=True)
    del ckpt["sha256"]
    path = _write(ckpt, tmp_path / "old.pth")
    with pytest.warns(UserWarning, match="digest"):
        assert read_checkpoint(path)["arch"] == "resnet20"


def test_checkpoint_with_an_expanded_tensor_is_refused(tiny_run, tmp_path):
    from manidp.checkpoint import CheckpointError, read_checkpoint
    ckpt = torch.load(os.path.join(tiny_run, "checkpoint.pth"), weights_only=True)
    ckpt["state_dict"]["fc.bias"] = torch.zeros(1).expand(2 ** 30)
    with pytest.raises(CheckpointError, match="expanded"):
        read_checkpoint(_write(ckpt, tmp_path / "bomb.pth"))


def test_checkpoint_stating_a_huge_model_is_refused_before_building_it(tiny_run, tmp_path):
    from manidp.checkpoint import CheckpointError, with_digest
    ckpt = torch.load(os.path.join(tiny_run, "checkpoint.pth"), weights_only=True)
    ckpt["num_classes"] = 2 ** 40  # a Linear of that many rows would need petabytes
    path = _write(with_digest(ckpt), tmp_path / "huge.pth")
    from manidp.flops_cli import load_model
    with pytest.raises(Exception) as info:
        load_model(path)
    assert "num_classes" in str(info.value) and isinstance(info.value, (CheckpointError, ValueError))
    r = run_module("manidp.flops_cli", ["--checkpoint", path, "--test_subset", "8"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr


def test_checkpoints_and_engine_files_share_one_file_mode(tiny_run, tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    engine_file = str(tmp_path / "e.pt")
    DynamicResNet.load(DEFAULT_MODEL_PATH, backend="reference").save(engine_file)
    for path in (engine_file, os.path.join(tiny_run, "checkpoint.pth"), os.path.join(tiny_run, "last.pth")):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask, path


def test_bare_resume_without_a_checkpoint_does_not_replace_a_run(tiny_run, tmp_path, capsys):
    from manidp.train import main
    run = str(tmp_path / "copy")
    shutil.copytree(tiny_run, run)
    os.unlink(os.path.join(run, "checkpoint.pth"))
    before = _snapshot(run)
    rc = main(["--dense", "--arch", "resnet20", "--dataset", "synthetic", "--epochs", "1", "--ngpu", "0",
               "--quiet", "--save_path", run, "--resume"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--overwrite" in err and "--resume" in err, err
    assert _snapshot(run) == before


@pytest.mark.parametrize("content", [b"hello, not a checkpoint\n", b""])
def test_text_file_as_checkpoint_is_a_clear_error(tmp_path, content):
    from manidp.checkpoint import CheckpointError, read_checkpoint
    p = tmp_path / "notes.txt"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match="notes.txt"):
        read_checkpoint(str(p))


def test_flops_cli_names_an_engine_file(tmp_path):
    r = run_module("manidp.flops_cli", ["--checkpoint", DEFAULT_MODEL_PATH])
    assert r.returncode == 2 and "engine" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------- CLI arguments

@pytest.mark.parametrize("extra", [
    ["--batch_size", "0"], ["--batch_size", "-3"], ["--test_subset", "-5"], ["--test_subset", "0"],
    ["--device", "bogus"], ["--device", "meta"],
] + ([["--device", "cuda"]] if not torch.cuda.is_available() else []))
def test_flops_cli_rejects_bad_arguments_in_one_line(tiny_run, extra, capsys):
    from manidp.flops_cli import main
    rc = main(["--checkpoint", os.path.join(tiny_run, "checkpoint.pth"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and err.startswith("manidp-flops: error:"), err


def test_flops_cli_parse_errors_are_one_line(tiny_run, capsys):
    from manidp.flops_cli import main
    with pytest.raises(SystemExit) as info:
        main(["--checkpoint", os.path.join(tiny_run, "checkpoint.pth"), "--batch_size", "many"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.count("\n") == 0 and err.startswith("manidp-flops: error:"), err


@pytest.mark.parametrize("extra,needle", [
    (["--device", "meta"], "--device"), (["--device", "bogus"], "--device"), (["--clamp_max", "nan"], "--clamp_max"),
    (["--lr", "inf"], "--lr"), (["--batch_size", "0"], "--batch_size"), (["--image_size", "0"], "--image_size"),
])
def test_train_rejects_bad_arguments_in_one_line(tmp_path, capsys, extra, needle):
    from manidp.train import main
    rc = main(["--dense", "--arch", "resnet20", "--dataset", "synthetic", "--epochs", "1", "--ngpu", "0", "--quiet",
               "--save_path", str(tmp_path / "run"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and err.count("\n") == 0, err
    assert not os.path.exists(tmp_path / "run")  # refused before any work


def test_train_refuses_an_unwritable_save_path(tmp_path, capsys):
    from manidp.train import main
    if os.geteuid() == 0:
        target = "/proc/manidp-run"  # not writable even for root
    else:
        target = str(tmp_path / "ro")
        os.makedirs(target)
        os.chmod(target, 0o500)
    rc = main(["--dense", "--arch", "resnet20", "--dataset", "synthetic", "--epochs", "1", "--ngpu", "0",
               "--quiet", "--save_path", target])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "save_path" in err and "Traceback" not in err, err


def test_bench_checks_out_directory_before_running(tmp_path, capsys):
    from manidp.bench import main
    target = "/proc/manidp-bench" if os.geteuid() == 0 else str(tmp_path / "ro" / "x")
    if os.geteuid() != 0:
        os.makedirs(tmp_path / "ro")
        os.chmod(tmp_path / "ro", 0o500)
    rc = main(["--out", target, "--batch-sizes", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--out" in err and "Traceback" not in err, err


# ---------------------------------------------------------------- data files

def _idx_images(path, n, h, w, payload=None):
    import gzip
    head = (0x0803).to_bytes(4, "big") + n.to_bytes(4, "big") + h.to_bytes(4, "big") + w.to_bytes(4, "big")
    body = payload if payload is not None else bytes(n * h * w)
    with gzip.open(path, "wb") as f:
        f.write(head + body)


@pytest.mark.parametrize("n,h,w,payload", [(10000, 0, 0, b""), (10, 28, 28, bytes(100)), (0, 28, 28, b"")])
def test_idx_with_impossible_header_is_a_dataset_error(tmp_path, n, h, w, payload):
    from manidp.data import DatasetError, read_idx
    p = str(tmp_path / "t10k-images-idx3-ubyte.gz")
    _idx_images(p, n, h, w, payload)
    with pytest.raises(DatasetError, match="t10k-images"):
        read_idx(p)


def test_idx_declaring_far_more_data_than_it_holds_is_refused_without_reading_it(tmp_path):
    from manidp.data import DatasetError, read_idx
    p = str(tmp_path / "train-images-idx3-ubyte.gz")
    _idx_images(p, 2 ** 31, 2 ** 16, 2 ** 16, payload=bytes(1000))  # claims 2**63 bytes
    with pytest.raises(DatasetError, match="implies"):
        read_idx(p)


def test_idx_labels_must_be_uint8(tmp_path):
    import gzip
    from manidp.data import DatasetError, _fmnist_split
    _idx_images(str(tmp_path / "train-images-idx3-ubyte.gz"), 2, 28, 28)
    labels = (0x0D01).to_bytes(4, "big") + (2).to_bytes(4, "big") + np.array([0.5, 1.5], ">f4").tobytes()
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(labels)
    with pytest.raises(DatasetError, match="labels"):
        _fmnist_split(str(tmp_path), "train")


@pytest.mark.parametrize("labels", [["a", "b"], 3, [0.5, 1.5], [0, 11]])
def test_cifar_batch_with_bad_labels_is_a_dataset_error(tmp_path, labels):
    import pickle
    from manidp.data import DatasetError, _read_cifar_batch
    f = tmp_path / "data_batch_1"
    data = np.zeros((2, 3072), dtype=np.uint8)
    with open(f, "wb") as fh:
        pickle.dump({b"data": data, b"labels": labels}, fh)
    with pytest.raises(DatasetError, match="label"):
        _read_cifar_batch(str(f))


# ---------------------------------------------------------------- fuzz

FUZZ_CHILD = r'''
import io, json, os, random, resource, sys, warnings, zipfile
import torch
from manidp.deploy import DynamicResNet, EngineFormatError
from manidp.pretrained import DEFAULT_MODEL_PATH

warnings.simplefilter("ignore")
seed, count, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = random.Random(seed)
honest = DynamicResNet.load(DEFAULT_MODEL_PATH, backend="reference")
x = honest.preprocess(torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
want = honest(x)
src = os.path.join(workdir, "honest.pt")
honest.save(src)
raw = open(src, "rb").read()
payload = torch.load(src, weights_only=True)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
JUNK = [0, -1, 2 ** 40, -2 ** 40, 1.5, float("nan"), float("inf"), "x", None, [], {}, [1, 2], True]

def flip_bytes(b):
    b = bytearray(b)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)

def truncate(b):
    return b[:rng.randrange(len(b))]

def config_value(_):
    p = dict(payload)
    cfg = json.loads(p["config"])
    path = []
    node = cfg
    while isinstance(node, (dict, list)) and node:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append(key)
        if rng.random() < 0.4 or not isinstance(node[key], (dict, list)):
            node[key] = rng.choice(JUNK)
            break
        node = node[key]
    p["config"] = json.dumps(cfg)
    buf = io.BytesIO(); torch.save(p, buf); return buf.getvalue()

def tensor_swap(_):
    p = dict(payload); t = dict(p["tensors"]); p["tensors"] = t
    name = rng.choice(sorted(t))
    kind = rng.randrange(4)
    if kind == 0:
        t[name] = torch.zeros(rng.choice([0, 1, 7, 4096]), rng.choice([1, 16]))
    elif kind == 1:
        t[name] = torch.zeros(1).expand(*( [rng.choice([2 ** 20, 2 ** 28])] + list(t[name].shape[1:]) ))
    elif kind == 2:
        t[name] = t[name].to(rng.choice([torch.int64, torch.float64, torch.uint8, torch.bool]))
    else:
        del t[name]
    buf = io.BytesIO(); torch.save(p, buf); return buf.getvalue()

def rezip(b):
    src_zip = zipfile.ZipFile(io.BytesIO(b))
    out = io.BytesIO()
    names = src_zip.namelist()
    drop = rng.choice(names) if rng.random() < 0.5 else None
    comp = zipfile.ZIP_DEFLATED if rng.random() < 0.5 else zipfile.ZIP_STORED
    with zipfile.ZipFile(out, "w", compression=comp) as z:
        for n in names:
            if n != drop:
                z.writestr(n, src_zip.read(n))
    return out.getvalue()

def header_bomb(_):
    p = dict(payload)
    n = rng.choice([10 ** 3, 10 ** 5])
    p["config"] = rng.choice(["[" * n + "]" * n, "{\"a\": " * n + "0" + "}" * n, " " * (n * 30)])
    buf = io.BytesIO(); torch.save(p, buf); return buf.getvalue()

mutators = [flip_bytes, truncate, config_value, tensor_swap, rezip, header_bomb]
outcomes = {}
for i in range(count):
    m = rng.choice(mutators)
    path = os.path.join(workdir, f"m{i}.pt")
    with open(path, "wb") as f:
        f.write(m(raw))
    try:
        e = DynamicResNet.load(path, backend="reference")
    except EngineFormatError:
        outcomes["refused"] = outcomes.get("refused", 0) + 1
    except Exception as err:
        print(f"FAIL {m.__name__} #{i}: {type(err).__name__}: {err}"); sys.exit(1)
    else:
        got = e(x)
        if not torch.equal(got, want):
            print(f"FAIL {m.__name__} #{i}: loaded a different engine"); sys.exit(1)
        outcomes["equal"] = outcomes.get("equal", 0) + 1
    os.unlink(path)
grow = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
print(json.dumps({"outcomes": outcomes, "peak_rss_growth_kib": grow}))
'''


@pytest.mark.slow
def test_fuzzed_engine_files_load_equal_or_raise_format_error(tmp_path):
    script = tmp_path / "fuzz.py"
    script.write_text(FUZZ_CHILD)
    honest_kib = os.path.getsize(DEFAULT_MODEL_PATH) // 1024
    r = subprocess.run([sys.executable, str(script), "7", "150", str(tmp_path)], cwd=ROOT,
                       env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["outcomes"].get("refused", 0) > 0
    # Loading one file at a time, peak memory may grow by the honest model's size a few times over
    # (file bytes, tensors, engine copy), never by a mutated file's declared sizes.
    assert result["peak_rss_growth_kib"] < 2 * honest_kib + 64 * 1024, result
