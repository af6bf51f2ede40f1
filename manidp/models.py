"""Gated (ManiDP) and dense ResNets.

The gated models follow docs/DESIGN.md 1.1-1.2: every basic block has two gates, one
for the output channels of each 3x3 conv.  Dense and gated models share
parameter names (torchvision's: ``conv1``, ``bn1``, ``layerK.i.conv1`` ...,
``downsample.0/1``, ``fc``), so a dense checkpoint loads into a gated model
with only the gate parameters left fresh, and a torchvision ``resnet18`` /
``resnet34`` state dict loads into ``dyresnet18`` / ``dyresnet34``.

``model(x)`` returns logits; ``model(x, return_gates=True)`` returns
``(logits, gates)`` with one :class:`GateRecord` per gate in forward order.
"""

from __future__ import annotations

from typing import Iterator, List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Gate", "GateRecord", "BasicBlock", "CifarResNet", "ImageNetResNet",
    "dyresnet20", "dyresnet32", "dyresnet56", "dyresnet110", "dyresnet18", "dyresnet34",
    "resnet20", "resnet32", "resnet56", "resnet110", "resnet18", "resnet34",
    "ARCHITECTURES", "build_model", "load_dense_state_dict", "load_torchvision_state_dict",
    "squeeze_ratio",
]


class GateRecord(NamedTuple):
    """What one gate saw in a forward pass (all tensors are (N, C) except lasso (N,))."""

    g: torch.Tensor      # pre-threshold gate values
    mask: torch.Tensor   # g * active: the continuous mask applied to the features
    feat: torch.Tensor   # pooled feature matching this gate (before masking)
    lasso: torch.Tensor  # per-instance sparsity term, mean_c g


def squeeze_ratio(channels: int, squeeze_rate: int) -> int:
    """Reduction ``r`` of a gate's hidden layer (docs/DESIGN.md 1.1)."""
    r = squeeze_rate // 2 if channels < 80 else squeeze_rate
    return max(int(r), 1)


class Gate(nn.Module):
    """Per-instance channel gate: pool -> fc1 -> relu -> fc2 -> relu -> clamp.

    Buffers:
      ``threshold``: scalar; channels with ``g >= threshold`` (and ``g > 0``) are active.
      ``mask_sum``:  (C,) sum over the epoch's training instances of ``g`` (pre-threshold),
                     used by the trainer to calibrate ``threshold``.
    """

    def __init__(self, in_channels: int, out_channels: int, squeeze_rate: int = 2,
                 clamp_max: float = 1000.0, thre_init: float = -10000.0):
        super().__init__()
        hidden = max(out_channels // squeeze_ratio(out_channels, squeeze_rate), 1)
        self.in_channels, self.out_channels, self.clamp_max = in_channels, out_channels, float(clamp_max)
        self.fc1 = nn.Linear(in_channels, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, out_channels, bias=True)
        nn.init.kaiming_normal_(self.fc1.weight)
        nn.init.kaiming_normal_(self.fc2.weight)
        nn.init.constant_(self.fc2.bias, 1.0)
        self.register_buffer("threshold", torch.tensor(float(thre_init)))
        self.register_buffer("mask_sum", torch.zeros(out_channels))

    def gate_values(self, pooled: torch.Tensor) -> torch.Tensor:
        """``g`` from the pooled input (N, Cin)."""
        h = F.relu(self.fc1(pooled))
        return torch.clamp(F.relu(self.fc2(h)), max=self.clamp_max)

    def active(self, g: torch.Tensor) -> torch.Tensor:
        """Boolean active set.  ``g > 0`` too: a zero gate contributes nothing either way."""
        return (g >= self.threshold) & (g > 0)

    def forward(self, x: torch.Tensor):
        """Return ``(g, mask)`` for the feature map ``x`` (N, Cin, H, W)."""
        g = self.gate_values(x.mean(dim=(2, 3)))
        mask = g * self.active(g).to(g.dtype)
        if self.training:
            self.mask_sum += g.detach().sum(0).to(self.mask_sum.dtype)
        return g, mask

    def extra_repr(self) -> str:
        return f"in={self.in_channels}, out={self.out_channels}, threshold={float(self.threshold):.4g}"


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """ResNet basic block, gated (docs/DESIGN.md 1.2) or dense.

    ``shortcut_bn`` selects the ImageNet shortcut (1x1 conv + BN, as torchvision)
    against the CIFAR one (strided 1x1 conv, no BN, as the original code).
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, gated: bool = True,
                 shortcut_bn: bool = False, squeeze_rate: int = 2, clamp_max: float = 1000.0,
                 thre_init: float = -10000.0):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or inplanes != planes:
            layers: List[nn.Module] = [nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)]
            if shortcut_bn:
                layers.append(nn.BatchNorm2d(planes))
            self.downsample = nn.Sequential(*layers)
        self.stride = stride
        self.gated = gated
        if gated:
            kw = dict(squeeze_rate=squeeze_rate, clamp_max=clamp_max, thre_init=thre_init)
            self.gate1 = Gate(inplanes, planes, **kw)
            self.gate2 = Gate(planes, planes, **kw)

    def forward(self, x: torch.Tensor, records: Optional[list] = None) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        if not self.gated:
            a = F.relu(self.bn1(self.conv1(x)))
            return F.relu(identity + self.bn2(self.conv2(a)))
        g1, m1 = self.gate1(x)
        a = F.relu(self.bn1(self.conv1(x)))
        feat1 = a.mean(dim=(2, 3))
        a = a * m1[:, :, None, None]
        g2, m2 = self.gate2(a)
        b = self.bn2(self.conv2(a))
        feat2 = b.mean(dim=(2, 3))
        b = b * m2[:, :, None, None]
        if records is not None:
            records.append(GateRecord(g1, m1, feat1, g1.mean(1)))
            records.append(GateRecord(g2, m2, feat2, g2.mean(1)))
        return F.relu(identity + b)


class _ResNetBase(nn.Module):
    """Shared forward/gate plumbing of the CIFAR and ImageNet ResNets."""

    gated: bool

    def _make_stages(self, widths: Sequence[int], blocks: Sequence[int], first_stride: int,
                     inplanes: int, **block_kw) -> int:
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stride = first_stride if i == 0 else 2
            layer = []
            for j in range(n):
                layer.append(BasicBlock(inplanes, w, stride if j == 0 else 1, **block_kw))
                inplanes = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.num_stages = len(widths)
        return inplanes

    def blocks(self) -> Iterator[BasicBlock]:
        """The basic blocks in forward order."""
        for i in range(self.num_stages):
            yield from getattr(self, f"layer{i + 1}")

    def gates(self) -> Iterator[Gate]:
        """The gate modules in forward order (gate1, gate2 of each block)."""
        for blk in self.blocks():
            if blk.gated:
                yield blk.gate1
                yield blk.gate2

    def forward(self, x: torch.Tensor, return_gates: bool = False):
        # ``self.stem`` is defined by each subclass (CIFAR 3x3 stem, ImageNet 7x7 + maxpool).
        records: Optional[list] = [] if return_gates else None
        x = self.stem(x)
        for blk in self.blocks():
            x = blk(x, records)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        logits = self.fc(x)
        return (logits, records) if return_gates else logits

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


class CifarResNet(_ResNetBase):
    """CIFAR ResNet-(6n+2): 3 stages of 16/32/64 channels (times ``width_mult``)."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, gated: bool = True,
                 width_mult: float = 1.0, **gate_kw):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110); got {depth}")
        n = (depth - 2) // 6
        widths = [max(int(round(w * width_mult)), 1) for w in (16, 32, 64)]
        self.depth, self.gated, self.kind = depth, gated, "cifar"
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        last = self._make_stages(widths, [n] * 3, 1, widths[0], gated=gated, shortcut_bn=False, **gate_kw)
        self.fc = nn.Linear(last, num_classes)
        self._init_weights()

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))


class ImageNetResNet(_ResNetBase):
    """torchvision-layout ResNet-18/34 built from basic blocks."""

    LAYERS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}

    def __init__(self, depth: int, num_classes: int = 1000, in_channels: int = 3, gated: bool = True,
                 **gate_kw):
        super().__init__()
        if depth not in self.LAYERS:
            raise ValueError(f"ImageNet ResNet depth must be 18 or 34; got {depth}")
        self.depth, self.gated, self.kind = depth, gated, "imagenet"
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        last = self._make_stages([64, 128, 256, 512], self.LAYERS[depth], 1, 64, gated=gated,
                                 shortcut_bn=True, **gate_kw)
        self.fc = nn.Linear(last, num_classes)
        self._init_weights()

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(F.relu(self.bn1(self.conv1(x))))


def _cifar(depth: int, gated: bool):
    def build(num_classes: int = 10, in_channels: int = 3, **kw) -> CifarResNet:
        return CifarResNet(depth, num_classes, in_channels, gated=gated, **kw)
    kind = "gated" if gated else "dense"
    build.__name__ = f"{'dy' if gated else ''}resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth}, {kind}."
    return build


def _imagenet(depth: int, gated: bool):
    def build(num_classes: int = 1000, in_channels: int = 3, pretrained_path: Optional[str] = None,
              **kw) -> ImageNetResNet:
        model = ImageNetResNet(depth, num_classes, in_channels, gated=gated, **kw)
        if pretrained_path:
            load_torchvision_state_dict(model, pretrained_path)
        return model
    kind = "gated" if gated else "dense"
    build.__name__ = f"{'dy' if gated else ''}resnet{depth}"
    build.__doc__ = (f"ImageNet ResNet-{depth}, {kind}; ``pretrained_path`` loads a torchvision "
                     f"resnet{depth} state dict from a local file.")
    return build


dyresnet20, dyresnet32, dyresnet56, dyresnet110 = (_cifar(d, True) for d in (20, 32, 56, 110))
resnet20, resnet32, resnet56, resnet110 = (_cifar(d, False) for d in (20, 32, 56, 110))
dyresnet18, dyresnet34 = (_imagenet(d, True) for d in (18, 34))
resnet18, resnet34 = (_imagenet(d, False) for d in (18, 34))

ARCHITECTURES = {f.__name__: f for f in (
    dyresnet20, dyresnet32, dyresnet56, dyresnet110, dyresnet18, dyresnet34,
    resnet20, resnet32, resnet56, resnet110, resnet18, resnet34)}


def build_model(arch: str, **kwargs) -> _ResNetBase:
    """Build a model by name (see ``ARCHITECTURES``)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**kwargs)


def _is_gate_key(key: str) -> bool:
    return ".gate1." in key or ".gate2." in key


def load_dense_state_dict(model: nn.Module, state_dict: dict, strict_classifier: bool = True) -> List[str]:
    """Load a dense (or gated) state dict into ``model``; only gate entries may be missing.

    Accepts ``module.``-prefixed keys (DataParallel/DDP checkpoints).  With
    ``strict_classifier=False`` a classifier of another shape is skipped (left fresh).
    Returns the keys left at their initial values.
    """
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    own = model.state_dict()
    if not strict_classifier:
        for k in ("fc.weight", "fc.bias"):
            if k in sd and k in own and sd[k].shape != own[k].shape:
                del sd[k]
    unexpected = [k for k in sd if k not in own and not k.endswith("num_batches_tracked")]
    if unexpected:
        raise ValueError(f"state dict has keys this {type(model).__name__} does not: {unexpected[:5]}")
    mismatched = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd
                  if k in own and sd[k].shape != own[k].shape]
    if mismatched:
        raise ValueError(f"state dict shapes do not match the model: {mismatched[:5]}")
    missing = [k for k in own if k not in sd]
    bad = [k for k in missing if not _is_gate_key(k) and not k.endswith("num_batches_tracked")
           and not (not strict_classifier and k.startswith("fc."))]
    if bad:
        raise ValueError(f"state dict lacks non-gate entries: {bad[:5]}")
    model.load_state_dict(sd, strict=False)
    return missing


def load_torchvision_state_dict(model: nn.Module, path: str) -> List[str]:
    """Load a torchvision ResNet state dict from the local file ``path`` (never downloads)."""
    from .checkpoint import extract_state_dict, read_checkpoint  # checkpoint builds models: import it late
    state = extract_state_dict(read_checkpoint(path, "torchvision state dict"), path)
    return load_dense_state_dict(model, state, strict_classifier=False)

