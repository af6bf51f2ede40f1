"""DynamicResNet with the reference backend: equivalence with the gated model, stats, files, input checks."""

import os

import pytest
import torch

import manidp
from conftest import calibrated
from manidp.checkpoint import CheckpointError
from manidp.deploy import DynamicResNet, EngineFormatError, compile
from manidp.deploy.backends import BackendUnavailable
from manidp.flops import count_macs, dense_macs
from manidp.models import build_model

# (arch, input size): ImageNet models at small, odd sizes keep the suite fast.
ARCHS = [("dyresnet20", (32, 32)), ("dyresnet32", (32, 32)), ("dyresnet56", (32, 32)),
         ("dyresnet110", (32, 32)), ("dyresnet18", (67, 53)), ("dyresnet34", (48, 48))]


def active_sets(model, x):
    _, records = model(x, return_gates=True)
    return torch.stack([(r.mask > 0).sum(1) for r in records], dim=1)


def assert_close_logits(got, want):
    rel = (got - want).abs().max() / want.abs().max().clamp_min(1e-12)
    assert rel < 1e-4, f"relative error {rel:.3g}"


@pytest.mark.parametrize("arch,size", ARCHS)
@pytest.mark.parametrize("keep", [0.3, 0.7])
def test_reference_matches_gated_model(arch, size, keep):
    model, x = calibrated(arch, size, keep)
    engine = compile(model, backend="reference")
    with torch.no_grad():
        want = model(x)
        logits, stats = engine(x, return_stats=True)
    assert_close_logits(logits, want)
    assert torch.equal(stats["active"].long(), active_sets(model, x))
    assert torch.equal(stats["macs"], count_macs(model, x).per_instance)
    assert engine.dense_macs_for(size) == dense_macs(model, size)


def _gated_and_engine(keep=0.5, n=4):
    model, x = calibrated("dyresnet20", (32, 32), keep, n=n)
    return model, compile(model, backend="reference"), x


def _check(model, engine, x):
    with torch.no_grad():
        assert_close_logits(engine(x), model(x))


def test_gate_with_no_active_channel():
    model, x = calibrated("dyresnet20", (32, 32), 0.5)
    blocks = list(model.blocks())
    blocks[1].gate1.threshold.fill_(float("inf"))   # |A1| = 0: conv_b is its bias alone
    blocks[2].gate2.threshold.fill_(float("inf"))   # |A2| = 0: out = relu(shortcut)
    engine = compile(model, backend="reference")
    _, stats = engine(x, return_stats=True)
    assert (stats["active"][:, 2] == 0).all() and (stats["active"][:, 5] == 0).all()
    _check(model, engine, x)


def test_every_channel_active():
    model, x = calibrated("dyresnet20", (32, 32), 1.0)
    for gate in model.gates():
        gate.fc2.weight.data.zero_()    # g = 1 for every channel of every instance
        gate.fc2.bias.data.fill_(1.0)
        gate.threshold.fill_(-1e4)
    engine = compile(model, backend="reference")
    _, stats = engine(x, return_stats=True)
    planes = torch.tensor([g.out_channels for g in model.gates()])
    assert torch.equal(stats["active"].long(), planes.expand_as(stats["active"]))
    _check(model, engine, x)


def test_every_instance_a_different_count():
    model, x = calibrated("dyresnet20", (32, 32), 0.5, n=8)
    engine = compile(model, backend="reference")
    _, stats = engine(x, return_stats=True)
    assert len(set(stats["macs"].tolist())) == 8
    _check(model, engine, x)


def test_batch_size_one_and_layouts():
    model, engine, x = _gated_and_engine()
    _check(model, engine, x[:1])
    _check(model, engine, x.to(memory_format=torch.channels_last))
    _check(model, engine, x.transpose(2, 3).contiguous().transpose(2, 3))  # non-contiguous


def test_save_load_roundtrip(tmp_path):
    model, engine, x = _gated_and_engine()
    path = tmp_path / "engine.pt"
    engine.save(str(path))
    loaded = DynamicResNet.load(str(path), backend="reference")
    assert torch.equal(loaded(x), engine(x))
    assert loaded.config == engine.config


def test_compile_from_checkpoint(tmp_path):
    model, engine, x = _gated_and_engine()
    path = tmp_path / "ckpt.pth"
    # clamp_max is a gate option, not a weight: a checkpoint records it in args, as manidp-train does
    clamp = next(model.gates()).clamp_max
    torch.save({"arch": "dyresnet20", "state_dict": model.state_dict(), "num_classes": 10,
                "args": {"clamp_max": clamp}}, path)
    assert torch.equal(compile(str(path), backend="reference")(x), engine(x))


def test_bad_files_give_clear_errors(tmp_path):
    _, engine, _ = _gated_and_engine()
    good = tmp_path / "engine.pt"
    engine.save(str(good))
    data = good.read_bytes()
    cases = {
        "truncated.pt": data[: len(data) // 2],
        "corrupt.pt": data[:100] + bytes(b ^ 0xFF for b in data[100:300]) + data[300:],
        "text.pt": b"not a model at all",
        "empty.pt": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(EngineFormatError):
            DynamicResNet.load(str(tmp_path / name))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(EngineFormatError, match="not a DynamicResNet"):
        DynamicResNet.load(str(tmp_path / "foreign.pt"))
    with pytest.raises(FileNotFoundError):
        DynamicResNet.load(str(tmp_path / "missing.pt"))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_engine_file",))


def test_loading_never_executes_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": "manidp.DynamicResNet", "version": 1, "payload": _Exploit()}, "evil.pt")
    with pytest.raises(EngineFormatError):
        DynamicResNet.load("evil.pt")
    assert not (tmp_path / "pwned_by_engine_file").exists()


def test_tampered_tensor_shapes_rejected(tmp_path):
    _, engine, _ = _gated_and_engine()
    payload = {"format": "manidp.DynamicResNet", "version": 1,
               "config": __import__("json").dumps(engine.config),
               "tensors": {k: v for k, v in engine.state_dict().items()}}
    payload["tensors"]["blocks.0.conv1.weight"] = torch.zeros(3, 3)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(EngineFormatError, match="shape"):
        DynamicResNet.load(str(tmp_path / "bad.pt"))
    payload["version"] = 99
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(EngineFormatError, match="version"):
        DynamicResNet.load(str(tmp_path / "future.pt"))


@pytest.mark.parametrize("bad,err,match", [
    (torch.randn(3, 32, 32), ValueError, r"\(N, 3, H, W\)"),
    (torch.randn(2, 1, 32, 32), ValueError, r"\(N, 3, H, W\)"),
    (torch.randn(2, 3, 32, 32, dtype=torch.float64), TypeError, "float32"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), TypeError, "dtype"),
    (torch.randn(0, 3, 32, 32), ValueError, "N >= 1"),
    ([[1.0]], TypeError, "float tensor"),
])
def test_input_checks(bad, err, match):
    _, engine, _ = _gated_and_engine()
    with pytest.raises(err, match=match):
        engine(bad)


def test_dense_model_and_unknown_backend_rejected():
    with pytest.raises(ValueError, match="gated"):
        compile(build_model("resnet20"))
    model, _, _ = _gated_and_engine()
    with pytest.raises(ValueError, match="unknown backend"):
        compile(model, backend="nope")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="CUDA is not available"):
            compile(model, backend="reference", device="cuda")


def test_top_level_exports():
    assert manidp.DynamicResNet is DynamicResNet
    assert manidp.compile is compile


def test_constructor_places_tensors_and_resolves_the_backend_once(tmp_path):
    model, engine, x = _gated_and_engine()
    path = str(tmp_path / "engine.pt")
    engine.save(path)
    loaded = DynamicResNet.load(path, backend="reference", dtype=torch.float64)
    assert loaded.backend.name == "reference" and loaded.compute_dtype == torch.float64
    assert all(t.dtype == torch.float32 for t in loaded.state_dict().values())  # gates stay fp32
    with torch.no_grad():
        assert_close_logits(loaded(x.double()).float(), model(x))
    with pytest.raises(ValueError, match="unknown backend"):
        DynamicResNet.load(path, backend="nope")
    with pytest.raises(TypeError, match="floating"):
        compile(model, backend="reference", dtype=torch.int32)


def test_to_and_set_backend_resolve_again():
    _, engine, x = _gated_and_engine()
    before = engine(x)
    engine.to(dtype=torch.float64)
    assert engine.compute_dtype == torch.float64 and engine.backend.name == "reference"
    engine.float().set_backend("reference")
    assert torch.equal(engine(x), before)


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path):
    _, engine, x = _gated_and_engine()
    path = tmp_path / "engine.pt"
    engine.save(str(path))
    engine.save(str(path))  # replaces the file in place
    assert sorted(os.listdir(tmp_path)) == ["engine.pt"]
    assert torch.equal(DynamicResNet.load(str(path), backend="reference")(x), engine(x))


def test_compile_refuses_dense_and_foreign_checkpoints(tmp_path):
    dense = tmp_path / "dense.pth"
    torch.save({"arch": "resnet20", "state_dict": build_model("resnet20").state_dict()}, dense)
    with pytest.raises(CheckpointError, match="dense model"):
        compile(str(dense), backend="reference")
    foreign = tmp_path / "foreign.pth"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="arch"):
        compile(str(foreign), backend="reference")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compile(str(tmp_path / "missing.pth"))


def _fashion_engine():
    from manidp.preprocess import preprocess_spec
    torch.manual_seed(0)
    model = build_model("dyresnet20", num_classes=10, in_channels=1).eval()
    return compile(model, backend="reference", preprocess=preprocess_spec("fashion-mnist"))


def test_preprocess_pads_raw_pixels_before_normalising():
    engine = _fashion_engine()
    raw = torch.full((2, 28, 28), 255, dtype=torch.uint8)
    x = engine.preprocess(raw)
    assert x.shape == (2, 1, 32, 32) and x.dtype == torch.float32
    border, inside = (0.0 - 0.2860) / 0.3530, (1.0 - 0.2860) / 0.3530
    assert torch.allclose(x[:, :, :2], torch.full_like(x[:, :, :2], border))
    assert torch.allclose(x[:, :, 2:30, 2:30], torch.full_like(x[:, :, 2:30, 2:30], inside))


@pytest.mark.parametrize("images", [torch.rand(2, 28, 28), torch.zeros(2, 28, 28, dtype=torch.bool),
                                    torch.zeros(2, 28, 28, dtype=torch.int64), [[0, 1]]])
def test_preprocess_takes_uint8_images_only(images):
    with pytest.raises(TypeError, match="uint8"):
        _fashion_engine().preprocess(images)
