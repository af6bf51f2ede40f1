"""Model shapes for every architecture, and dense checkpoints loading into gated models."""

import pytest
import torch

from manidp.models import build_model, load_dense_state_dict
from manidp.train import dense_arch_name, find_pretrained, init_fresh_gates, load_pretrained, UsageError

CIFAR = [("dyresnet20", 3), ("dyresnet32", 5), ("dyresnet56", 9), ("dyresnet110", 18)]
IMAGENET = [("dyresnet18", [2, 2, 2, 2]), ("dyresnet34", [3, 4, 6, 3])]


@pytest.mark.parametrize("arch,per_stage", CIFAR)
def test_cifar_shapes(arch, per_stage):
    """32x32 input: logits (N, classes) and two gate records per block with the stage widths."""
    torch.manual_seed(0)
    net = build_model(arch, num_classes=10, in_channels=3).eval()
    with torch.no_grad():
        logits, recs = net(torch.randn(2, 3, 32, 32), return_gates=True)
    assert logits.shape == (2, 10)
    assert len(recs) == 2 * 3 * per_stage == len(list(net.gates()))
    widths = [16] * (2 * per_stage) + [32] * (2 * per_stage) + [64] * (2 * per_stage)
    assert [r.g.shape for r in recs] == [(2, w) for w in widths]
    assert all(r.feat.shape == r.g.shape == r.mask.shape and r.lasso.shape == (2,) for r in recs)
    dense = build_model(dense_arch_name(arch), num_classes=10, in_channels=1).eval()
    assert dense(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("arch,blocks", IMAGENET)
def test_imagenet_shapes(arch, blocks):
    """64x64 input (small, for speed): logits and gate records per torchvision stage."""
    torch.manual_seed(0)
    net = build_model(arch, num_classes=7).eval()
    with torch.no_grad():
        logits, recs = net(torch.randn(2, 3, 64, 64), return_gates=True)
    assert logits.shape == (2, 7)
    widths = [w for w, n in zip((64, 128, 256, 512), blocks) for _ in range(2 * n)]
    assert [r.g.shape[1] for r in recs] == widths


def test_dense_checkpoint_into_gated_only_gates_fresh():
    """Every dense entry loads unchanged; exactly the gate parameters/buffers stay fresh."""
    torch.manual_seed(0)
    dense = build_model("resnet20", num_classes=10)
    gated = build_model("dyresnet20", num_classes=10)
    fresh = load_dense_state_dict(gated, dense.state_dict())
    assert fresh and all(".gate1." in k or ".gate2." in k for k in fresh)
    expected = {k for k in gated.state_dict() if ".gate" in k}
    assert set(fresh) == expected
    gsd = gated.state_dict()
    assert all(torch.equal(v, gsd[k]) for k, v in dense.state_dict().items())


def test_identity_gate_init_makes_gated_equal_dense():
    """With fc2 zeroed every gate is 1, so the gated net computes the dense function."""
    torch.manual_seed(0)
    dense = build_model("resnet20", num_classes=10).eval()
    gated = build_model("dyresnet20", num_classes=10).eval()
    fresh = load_dense_state_dict(gated, dense.state_dict())
    init_fresh_gates(gated, fresh, "identity")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(gated(x), dense(x), atol=1e-5)
        _, recs = gated(x, return_gates=True)
    assert all(torch.equal(r.g, torch.ones_like(r.g)) for r in recs)


def test_pretrain_path_directory_and_raw_state_dict(tmp_path):
    """A directory is searched for <dense arch>.pth; raw state dicts and {'state_dict'} load."""
    torch.manual_seed(0)
    dense = build_model("resnet20", num_classes=10)
    torch.save(dense.state_dict(), tmp_path / "resnet20.pth")
    assert find_pretrained(str(tmp_path), "dyresnet20") == str(tmp_path / "resnet20.pth")
    gated = build_model("dyresnet20", num_classes=10)
    file, fresh = load_pretrained(gated, str(tmp_path), "dyresnet20")
    assert torch.equal(gated.conv1.weight, dense.conv1.weight)
    torch.save({"state_dict": {"module." + k: v for k, v in dense.state_dict().items()}}, tmp_path / "x.pth")
    load_pretrained(build_model("dyresnet20", num_classes=10), str(tmp_path / "x.pth"), "dyresnet20")


def test_pretrain_path_errors(tmp_path):
    """Missing path, empty directory, wrong architecture: one clear UsageError each."""
    with pytest.raises(UsageError, match="does not exist"):
        find_pretrained(str(tmp_path / "nope"), "dyresnet56")
    with pytest.raises(UsageError, match="resnet56.pth"):
        find_pretrained(str(tmp_path), "dyresnet56")
    torch.save(build_model("resnet20").state_dict(), tmp_path / "r20.pth")
    with pytest.raises(UsageError, match="does not fit"):
        load_pretrained(build_model("dyresnet32"), str(tmp_path / "r20.pth"), "dyresnet32")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="junk.pth.*not a checkpoint file"):
        load_pretrained(build_model("dyresnet20"), str(tmp_path / "junk.pth"), "dyresnet20")
