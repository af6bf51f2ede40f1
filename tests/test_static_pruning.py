"""Static channel pruning (manidp.static_pruning)."""

import pytest
import torch

from manidp.calibrate import calibrate_bn
from manidp.deploy import compile as compile_engine
from manidp.flops import dense_macs
from manidp.models import build_model, load_dense_state_dict
from manidp.static_pruning import (StaticPrunedResNet, keep_for_target_macs, l1_top_channels, static_macs,
                                   static_pruned_like)


def _gated(arch="dyresnet20", size=32, n=8, **kw):
    torch.manual_seed(0)
    model = build_model(arch, **kw).eval()
    x = torch.randn(n, model.conv1.in_channels, size, size)
    calibrate_bn(model, x)
    return model, x


def _dense_of(gated):
    dense = build_model(f"resnet{gated.depth}", num_classes=gated.fc.out_features,
                        in_channels=gated.conv1.in_channels)
    load_dense_state_dict(dense, {k: v for k, v in gated.state_dict().items() if ".gate" not in k})
    return dense.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the 2-core test machines are shared, and spinning thread pools stall."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_and_x(one_thread):
    return _gated()


@pytest.mark.parametrize("fold", [False, True])
def test_keep_one_is_the_dense_network(model_and_x, fold):
    model, x = model_and_x
    net = static_pruned_like(model, 1.0, fold_bn=fold).eval()
    assert isinstance(net, StaticPrunedResNet) and net.folded == fold
    assert all(k == b.planes for k, b in zip(net.widths, net.blocks()))
    with torch.no_grad():
        torch.testing.assert_close(net(x), _dense_of(model)(x), rtol=1e-4, atol=1e-4)
    assert net.macs() == dense_macs(model, (32, 32))


def test_engine_source_is_folded(model_and_x):
    model, x = model_and_x
    engine = compile_engine(model)
    net = static_pruned_like(engine, 1.0).eval()
    assert net.folded
    with torch.no_grad():
        torch.testing.assert_close(net(x), _dense_of(model)(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="folded"):
        static_pruned_like(engine, 0.5, fold_bn=False)


def test_pruned_equals_dense_with_channels_zeroed(model_and_x):
    """Narrow block = dense block whose dropped conv1 output channels are zero (conv2 then reads zeros)."""
    model, x = model_and_x
    net = static_pruned_like(model, 0.4).eval()
    dense = _dense_of(model)
    hooks = []
    for blk, sblk in zip(dense.blocks(), net.blocks()):
        keep = torch.zeros(blk.bn1.num_features)
        keep[sblk.kept_index] = 1.0
        hooks.append(blk.bn1.register_forward_hook(lambda m, i, o, k=keep: o * k[None, :, None, None]))
    with torch.no_grad():
        ref = dense(x)
        out = net(x)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    folded = static_pruned_like(model, 0.4, fold_bn=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), out, rtol=1e-4, atol=1e-4)


def test_narrow_blocks_keep_the_residual_width(model_and_x):
    """conv1 outputs = conv2 inputs = width; conv2 writes every plane; no scatter into the residual."""
    model, _ = model_and_x
    net = static_pruned_like(model, 0.5, fold_bn=True)
    for blk, sblk in zip(model.blocks(), net.blocks()):
        planes = blk.conv1.out_channels
        assert sblk.width == round(0.5 * planes) == sblk.kept_index.numel()
        assert sblk.conv1.out_channels == sblk.conv2.in_channels == sblk.width
        assert sblk.conv2.out_channels == planes and sblk.conv1.in_channels == blk.conv1.in_channels
    assert not any(hasattr(b, "out_index") for b in net.blocks())


def test_macs_follow_the_formula(model_and_x):
    """MACs = flops.block_macs_from_dims with active1 = width and active2 = planes, block by block."""
    from manidp.flops import block_macs_from_dims, stem_macs_from_dims
    model, _ = model_and_x
    net = static_pruned_like(model, 0.3)
    total, h, w = stem_macs_from_dims(model.conv1.in_channels, 16, 3, 1, 1, False, 32, 32)
    for blk, width in zip(model.blocks(), net.widths):
        cin, planes = blk.conv1.in_channels, blk.conv1.out_channels
        ho = (h - 1) // blk.stride + 1
        conv = cin * width * 9 * ho * ho + width * planes * 9 * ho * ho
        shortcut = cin * planes * ho * ho if blk.downsample is not None else 0
        m, h, w = block_macs_from_dims(cin, planes, blk.stride, blk.downsample is not None, h, w, width, planes)
        assert m == conv + shortcut
        total += m
    assert net.macs() == total + 64 * 10 == static_macs(model, 0.3)


def test_channels_are_the_largest_l1_filters(model_and_x):
    model, _ = model_and_x
    net = static_pruned_like(model, 0.5)
    blk, sblk = next(model.blocks()), next(net.blocks())
    norms = blk.conv1.weight.detach().abs().sum((1, 2, 3))
    assert set(sblk.kept_index.tolist()) == set(norms.topk(sblk.width).indices.tolist())
    assert sblk.kept_index.tolist() == sorted(sblk.kept_index.tolist())
    torch.testing.assert_close(sblk.conv2.weight, blk.conv2.weight.detach()[:, sblk.kept_index])
    assert l1_top_channels(torch.ones(4, 2, 3, 3), 2).tolist() == [0, 1]  # ties: lowest index


def test_uniform_ratio_and_widths(model_and_x):
    model, _ = model_and_x
    net = static_pruned_like(model, 0.5)
    assert net.widths == [round(0.5 * b.conv1.out_channels) for b in model.blocks()]
    widths = [1 + i % 3 for i, _ in enumerate(model.blocks())]
    net2 = static_pruned_like(model, widths=widths)
    assert net2.widths == widths
    assert static_pruned_like(model, widths).widths == widths  # a list passed as keep
    assert net2.macs() == static_macs(model, widths=widths)
    tiny = static_pruned_like(model, 0.01)
    assert all(k >= 1 for k in tiny.widths)
    for bad in (0.0, 1.5, -1):
        with pytest.raises(ValueError):
            static_pruned_like(model, bad)
    with pytest.raises(ValueError):
        static_pruned_like(model, widths=[1])
    with pytest.raises(ValueError, match="one integer"):
        static_pruned_like(model, widths=[(1, 16)] * len(widths))
    with pytest.raises(ValueError, match="out of range"):
        static_pruned_like(model, widths=[17] * len(widths))
    with pytest.raises(ValueError):
        static_pruned_like(model)


@pytest.mark.parametrize("target", [0.3, 0.45, 0.7])
def test_keep_for_target_macs(model_and_x, target):
    model, _ = model_and_x
    keep = keep_for_target_macs(model, target)
    net = static_pruned_like(model, keep)
    frac = net.macs() / dense_macs(model, (32, 32))
    assert abs(frac - target) < 0.03
    assert net.macs() == static_macs(model, keep)


def test_trainable_and_channels_last(model_and_x):
    model, x = model_and_x
    net = static_pruned_like(model, 0.5)
    assert net.training and any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    loss = torch.nn.functional.cross_entropy(net(x), torch.zeros(x.shape[0], dtype=torch.long))
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    opt.step()
    net.eval()
    cl = static_pruned_like(model, 0.5, fold_bn=True).eval()
    ref = cl(x)
    cl = cl.to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(cl(x.contiguous(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-4)


def test_imagenet_layout():
    model, x = _gated("dyresnet18", size=64, n=2, num_classes=7)
    net = static_pruned_like(model, 1.0).eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), _dense_of(model)(x), rtol=1e-4, atol=1e-4)
    half = static_pruned_like(model, 0.5, fold_bn=True).eval()
    assert half(x).shape == (2, 7)
    assert half.macs((64, 64)) < dense_macs(model, (64, 64))
    assert any(len(b.downsample) == 2 for b in net.blocks() if b.downsample is not None)  # shortcut BN kept


# ----------------------------------------------------------------------------- static checkpoints
def _static_checkpoint(keep=0.5):
    """A checkpoint dictionary as ``manidp-train --static_keep`` writes it (the parts rebuild_model reads)."""
    torch.manual_seed(0)
    dense = build_model("resnet20").eval()
    net = static_pruned_like(dense, keep)
    return {"arch": "resnet20", "state_dict": net.state_dict(), "widths": net.widths,
            "dataset": {"num_classes": 10, "in_channels": 3}}, net.eval()


def test_rebuild_static_checkpoint():
    """rebuild_model gives the StaticPrunedResNet of the recorded widths, with the stored weights."""
    from manidp.checkpoint import rebuild_model
    ckpt, net = _static_checkpoint()
    rebuilt = rebuild_model(ckpt, "ck.pth")
    assert isinstance(rebuilt, StaticPrunedResNet) and rebuilt.widths == net.widths and not rebuilt.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), net(x), rtol=0, atol=0)
    assert rebuilt.macs() == net.macs() and rebuilt.dense_macs() == dense_macs(build_model("resnet20"), (32, 32))
    assert list(rebuilt.gates()) == []


@pytest.mark.parametrize("change,needle", [
    (lambda c: c.update(widths=c["widths"][:-1]), "one width per block (9 blocks); got 8"),
    (lambda c: c.update(widths=[17] + c["widths"][1:]), "block 0 width 17 is not an integer in [1, 16]"),
    (lambda c: c.update(widths=[True] + c["widths"][1:]), "block 0 width True is not an integer"),
    (lambda c: c.update(widths="8"), "one width per block (9 blocks); got str"),
    (lambda c: c.update(widths=[9] + c["widths"][1:]), "block 0 width 9 does not match layers.0.conv1.weight"),
    (lambda c: c.update(arch="dyresnet20"), "cut from a dense architecture"),
    (lambda c: c["state_dict"].pop("layers.8.bn2.weight"), "layers.8.bn2.weight"),
])
def test_rebuild_static_checkpoint_refuses_bad_widths(change, needle):
    """Widths are checked against the architecture and the stored weights; errors name the file."""
    from manidp.checkpoint import CheckpointError, rebuild_model
    ckpt, _ = _static_checkpoint()
    ckpt["state_dict"] = dict(ckpt["state_dict"])
    change(ckpt)
    with pytest.raises(CheckpointError, match="'ck.pth'") as info:
        rebuild_model(ckpt, "ck.pth")
    assert needle in str(info.value)


def test_static_checkpoint_has_no_gated_form():
    """compile() rebuilds with gated=True: a static checkpoint is refused with a clear message."""
    from manidp.checkpoint import CheckpointError, rebuild_model
    ckpt, _ = _static_checkpoint()
    with pytest.raises(CheckpointError, match="static-pruned resnet20 \\(no gates\\)"):
        rebuild_model(ckpt, "ck.pth", gated=True)


def test_dense_macs_is_the_source_network(model_and_x):
    """dense_macs counts every block at full width: the network it was cut from, for any keep ratio."""
    model, _ = model_and_x
    for keep in (0.25, 1.0):
        net = static_pruned_like(model, keep)
        assert net.dense_macs() == dense_macs(model, (32, 32))
        assert net.dense_macs((64, 64)) == dense_macs(model, (64, 64))
    assert static_pruned_like(model, 0.25).macs() < dense_macs(model, (32, 32))
