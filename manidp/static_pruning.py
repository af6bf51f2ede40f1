"""Static channel pruning: the narrow network a channel-pruning method would deploy (docs/DESIGN.md 3.4).

A :class:`StaticPrunedResNet` has the layout of the (gated or dense) ResNet it is
cut from, but every basic block is narrower inside: conv1 computes ``width`` of
its ``planes`` output channels, and conv2 reads only those ``width`` channels and
writes every one of its ``planes`` outputs, so the residual stream keeps its
width and the block needs no scatter.  Stem, shortcuts and classifier stay
dense; gates are dropped::

    a   = relu(bn1(conv1(x)))                      # conv1: Cin   -> width
    out = relu(shortcut(x) + bn2(conv2(a)))        # conv2: width -> planes

This is a plain ResNet with thinner blocks, the network every runtime (PyTorch,
ONNX Runtime, OpenVINO) runs at full speed.  The channels kept are the conv1
filters of largest L1 norm (Li et al., "Pruning Filters for Efficient
ConvNets"), with the same keep ratio for every block; conv2 keeps the matching
input columns.  Norms are taken on the weights as stored in the source (raw conv
weights for a :mod:`manidp.models` network, so the choice does not depend on
``fold_bn``; folded weights for a :class:`~manidp.deploy.DynamicResNet`, the only
ones it holds).  BN is folded by the engine's own fold
(:func:`manidp.deploy.folding.fold_conv_bn`) and MACs are counted by
:func:`manidp.flops.block_macs_from_dims` with ``active1 = width`` and
``active2 = planes``.

Before fine-tuning, the narrow network computes exactly what the full network
computes with the dropped conv1 channels set to zero.

The result is an ordinary trainable ``nn.Module`` with the models' call signature
(``model(x) -> logits``), meant both for benchmarking (``manidp-bench``) and for
fine-tuning a static-pruned baseline:

    >>> from manidp.static_pruning import static_pruned_like, keep_for_target_macs
    >>> keep = keep_for_target_macs(model, 0.45)        # MACs = 0.45 x dense
    >>> net = static_pruned_like(model, keep)            # BN kept: fine-tune it
    >>> fast = static_pruned_like(model, keep, fold_bn=True)   # conv + bias, inference

``keep`` may also be a list of per-block widths (``widths=``).  ``manidp-train
--static_keep K`` (or ``--static_target_macs F``) cuts this network from a dense
checkpoint and fine-tunes it with the trainer's loop; its checkpoints record
``widths``, from which :func:`manidp.checkpoint.rebuild_model` rebuilds it
(docs/DESIGN.md 9).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .deploy.folding import fold_conv_bn
from .flops import block_macs_from_dims, stem_macs_from_dims

__all__ = ["StaticBlock", "StaticPrunedResNet", "static_pruned_like", "keep_for_target_macs",
           "static_macs", "l1_top_channels"]

Widths = List[int]
KeepSpec = Union[float, Sequence[int]]


# ----------------------------------------------------------------------------- source access
class _Conv(NamedTuple):
    """A conv of the source network: weight, bias (or None) and BN (or None)."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    bn: Optional[nn.BatchNorm2d]


class _BlockSpec(NamedTuple):
    in_channels: int
    planes: int
    stride: int
    conv1: _Conv
    conv2: _Conv
    shortcut: Optional[_Conv]


class _Source(NamedTuple):
    kind: str                 # "cifar" | "imagenet"
    depth: Optional[int]
    stem: _Conv
    stem_stride: int
    stem_padding: int
    maxpool: bool
    blocks: List[_BlockSpec]
    fc_weight: torch.Tensor
    fc_bias: torch.Tensor
    has_bn: bool              # False: the source holds BN-folded weights only
    input_size: Tuple[int, int]


def _is_engine(model) -> bool:
    from .deploy.engine import DynamicResNet
    return isinstance(model, DynamicResNet)


def _conv_of(conv: nn.Conv2d, bn: Optional[nn.Module]) -> _Conv:
    b = conv.bias.detach() if conv.bias is not None else None
    return _Conv(conv.weight.detach(), b, bn if isinstance(bn, nn.BatchNorm2d) else None)


def _source(model) -> _Source:
    """Read the layers of a :mod:`manidp.models` ResNet or a DynamicResNet engine."""
    if _is_engine(model):
        cfg = model.config
        s = cfg["stem"]
        blocks = []
        for blk in model.blocks:
            sc = _Conv(blk.shortcut.weight, blk.shortcut.bias, None) if blk.has_shortcut else None
            blocks.append(_BlockSpec(blk.in_channels, blk.planes, blk.stride,
                                     _Conv(blk.conv1.weight, blk.conv1.bias, None),
                                     _Conv(blk.conv2.weight, blk.conv2.bias, None), sc))
        depth = None
        arch = cfg.get("arch", "")
        digits = "".join(ch for ch in arch if ch.isdigit())
        if digits:
            depth = int(digits)
        return _Source(cfg["kind"], depth, _Conv(model.stem.weight, model.stem.bias, None), s["stride"],
                       s["padding"], bool(s["maxpool"]), blocks, model.fc.weight, model.fc.bias, False,
                       tuple(model.input_size))
    if not hasattr(model, "blocks") or not hasattr(model, "conv1") or not hasattr(model, "fc"):
        raise TypeError(f"expected a manidp.models ResNet or a DynamicResNet; got {type(model).__name__}")
    blocks = []
    for blk in model.blocks():
        sc = None
        if blk.downsample is not None:
            sc = _conv_of(blk.downsample[0], blk.downsample[1] if len(blk.downsample) > 1 else None)
        blocks.append(_BlockSpec(blk.conv1.in_channels, blk.conv1.out_channels, blk.stride,
                                 _conv_of(blk.conv1, blk.bn1), _conv_of(blk.conv2, blk.bn2), sc))
    kind = getattr(model, "kind", "cifar")
    stem = _conv_of(model.conv1, getattr(model, "bn1", None))
    has_bn = stem.bn is not None and all(b.conv1.bn is not None and b.conv2.bn is not None for b in blocks)
    size = tuple(getattr(model, "input_size", (32, 32) if kind == "cifar" else (224, 224)))
    return _Source(kind, getattr(model, "depth", None), stem, model.conv1.stride[0], model.conv1.padding[0],
                   kind == "imagenet", blocks, model.fc.weight.detach(), model.fc.bias.detach(), has_bn, size)


# ----------------------------------------------------------------------------- channel choice
def l1_top_channels(weight: torch.Tensor, k: int, in_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices (ascending, int64) of the ``k`` output channels of ``weight`` with the largest L1 norm.

    With ``in_index`` the norm is taken over those input channels only.  Ties go to
    the lower index, so the choice is deterministic.
    """
    w = weight.detach().float()
    if in_index is not None:
        w = w[:, in_index.to(w.device)]
    norms = w.abs().flatten(1).sum(1).cpu()
    c = norms.numel()
    k = int(min(max(k, 0), c))
    # stable: sort by (-norm, index)
    order = sorted(range(c), key=lambda i: (-float(norms[i]), i))[:k]
    return torch.tensor(sorted(order), dtype=torch.long)


def _round_width(keep: float, channels: int) -> int:
    return int(min(max(int(round(keep * channels)), 1), channels))


def _checked_widths(src: _Source, widths: Sequence) -> Widths:
    """Per-block widths as ints in ``[1, planes]``; ValueError otherwise."""
    if len(widths) != len(src.blocks):
        raise ValueError(f"widths must hold one width per block ({len(src.blocks)} blocks); got {len(widths)}")
    out = []
    for w, b in zip(widths, src.blocks):
        if isinstance(w, (tuple, list)) or isinstance(w, bool) or int(w) != w:
            raise ValueError(f"a block width is one integer (conv1's kept outputs); got {w!r}")
        if not 1 <= int(w) <= b.planes:
            raise ValueError(f"block width {w} out of range [1, {b.planes}]")
        out.append(int(w))
    return out


def _resolve_widths(src: _Source, keep: Optional[KeepSpec], widths: Optional[Sequence]) -> Widths:
    if widths is None and keep is not None and not isinstance(keep, (int, float)):
        widths, keep = keep, None
    if widths is not None:
        return _checked_widths(src, widths)
    if keep is None:
        raise ValueError("give a keep ratio or per-block widths")
    if not 0.0 < float(keep) <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1]; got {keep}")
    return [_round_width(keep, b.planes) for b in src.blocks]


# ----------------------------------------------------------------------------- the network
def _bn_copy(bn: nn.BatchNorm2d, index: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(index.numel(), eps=bn.eps, momentum=bn.momentum, affine=True,
                         track_running_stats=True)
    with torch.no_grad():
        idx = index.to(bn.weight.device)
        new.weight.copy_(bn.weight[idx])
        new.bias.copy_(bn.bias[idx])
        new.running_mean.copy_(bn.running_mean[idx])
        new.running_var.copy_(bn.running_var[idx])
    return new


def _make_conv(src: _Conv, out_index: Optional[torch.Tensor], in_index: Optional[torch.Tensor], stride: int,
               padding: int, fold: bool) -> Tuple[nn.Conv2d, nn.Module]:
    """A conv (and its BN, or Identity) holding the selected rows/columns of ``src``."""
    if fold:
        w, b = fold_conv_bn(src.weight, src.bias, src.bn)
    else:
        w = src.weight.detach().float()
        b = src.bias.detach().float() if src.bias is not None else None
    if out_index is not None:
        w = w[out_index.to(w.device)]
        b = b[out_index.to(b.device)] if b is not None else None
    if in_index is not None:
        w = w[:, in_index.to(w.device)]
    conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[-1], stride=stride, padding=padding, bias=b is not None)
    with torch.no_grad():
        conv.weight.copy_(w)
        if b is not None:
            conv.bias.copy_(b)
    bn: nn.Module = nn.Identity()
    if not fold and src.bn is not None:
        idx = out_index if out_index is not None else torch.arange(w.shape[0])
        bn = _bn_copy(src.bn, idx)
    return conv, bn


class StaticBlock(nn.Module):
    """A basic block ``width`` channels wide inside: conv1 ``Cin -> width``, conv2 ``width -> planes``."""

    def __init__(self, spec: _BlockSpec, kept: torch.Tensor, fold: bool):
        super().__init__()
        self.in_channels, self.planes, self.stride = spec.in_channels, spec.planes, spec.stride
        self.width = int(kept.numel())
        self.conv1, self.bn1 = _make_conv(spec.conv1, kept, None, spec.stride, 1, fold)
        self.conv2, self.bn2 = _make_conv(spec.conv2, None, kept, 1, 1, fold)
        self.downsample: Optional[nn.Sequential] = None
        if spec.shortcut is not None:
            conv, bn = _make_conv(spec.shortcut, None, None, spec.stride, 0, fold)
            self.downsample = nn.Sequential(conv) if isinstance(bn, nn.Identity) else nn.Sequential(conv, bn)
        self.register_buffer("kept_index", kept.clone())  # conv1 outputs kept (of planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        a = F.relu(self.bn1(self.conv1(x)))
        return F.relu(identity + self.bn2(self.conv2(a)))

    def macs(self, h: int, w: int, full_width: bool = False) -> Tuple[int, int, int]:
        """MACs on an ``h x w`` input and the output size; ``full_width``: of the block it was cut from."""
        width = self.planes if full_width else self.width
        m, ho, wo = block_macs_from_dims(self.in_channels, self.planes, self.stride, self.downsample is not None,
                                         h, w, width, self.planes)
        return int(m), ho, wo

    def extra_repr(self) -> str:
        return f"in={self.in_channels}, width={self.width}, planes={self.planes}, stride={self.stride}"


class StaticPrunedResNet(nn.Module):
    """A statically channel-pruned ResNet; build it with :func:`static_pruned_like`.

    ``model(x)`` returns logits.  Attributes: ``widths`` (per-block inner width),
    ``folded`` (True: conv + bias, no BN), ``kind``, ``depth``, ``input_size``;
    :meth:`macs` counts MACs as :mod:`manidp.flops` does (no gates), :meth:`dense_macs`
    those of the dense network it was cut from.  It has no gates (:meth:`gates` is
    empty), so the trainer and ``manidp-flops`` treat it as an ungated network.
    """

    def __init__(self, src: _Source, widths: Widths, fold: bool):
        super().__init__()
        self.kind, self.depth, self.folded = src.kind, src.depth, fold
        self.input_size = tuple(src.input_size)
        self.conv1, self.bn1 = _make_conv(src.stem, None, None, src.stem_stride, src.stem_padding, fold)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if src.maxpool else nn.Identity()
        self.layers = nn.Sequential(*(StaticBlock(spec, l1_top_channels(spec.conv1.weight, k), fold)
                                      for spec, k in zip(src.blocks, widths)))
        self.fc = nn.Linear(src.fc_weight.shape[1], src.fc_weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(src.fc_weight.float())
            self.fc.bias.copy_(src.fc_bias.float())

    @property
    def widths(self) -> Widths:
        return [b.width for b in self.layers]

    def blocks(self):
        """The static blocks in forward order."""
        return iter(self.layers)

    def gates(self):
        """No gates (the models' interface: a dense ResNet's ``gates()`` is empty too)."""
        return iter(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def macs(self, input_size: Optional[Tuple[int, int]] = None) -> int:
        """MACs of one ``input_size`` image (default: the source model's input size)."""
        return self._count_macs(input_size, full_width=False)

    def dense_macs(self, input_size: Optional[Tuple[int, int]] = None) -> int:
        """MACs of one image through the dense network this one was cut from (every block at full width)."""
        return self._count_macs(input_size, full_width=True)

    def _count_macs(self, input_size: Optional[Tuple[int, int]], full_width: bool) -> int:
        c = self.conv1
        total, h, w = stem_macs_from_dims(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0],
                                          c.padding[0], isinstance(self.maxpool, nn.MaxPool2d),
                                          *(input_size or self.input_size))
        for blk in self.layers:
            m, h, w = blk.macs(h, w, full_width)
            total += m
        return int(total + self.fc.in_features * self.fc.out_features)


def static_pruned_like(model, keep: Optional[KeepSpec] = None, *, widths: Optional[Sequence[int]] = None,
                       fold_bn: Optional[bool] = None) -> StaticPrunedResNet:
    """A :class:`StaticPrunedResNet` cut from ``model`` (gated or dense ResNet, or a DynamicResNet).

    ``keep``: a ratio in (0, 1] applied to every block (``width = max(1, round(keep * planes))``)
    or a list of per-block widths (same as ``widths=``).  ``keep=1.0`` gives the dense
    network.  ``fold_bn``: ``None`` keeps the source's form (BN layers from a
    :mod:`manidp.models` network, so the result fine-tunes like the original; conv + bias
    from an engine), ``True`` folds BN into conv + bias.  The result is in fp32, on the CPU,
    in train mode as any fresh module (call ``.eval()`` for inference).
    """
    src = _source(model)
    if fold_bn is None:
        fold = not src.has_bn
    else:
        fold = bool(fold_bn)
        if not fold and not src.has_bn:
            raise ValueError("this model holds BN-folded weights only (a DynamicResNet): use fold_bn=True/None")
    src = src._replace(fc_weight=src.fc_weight.detach().cpu(), fc_bias=src.fc_bias.detach().cpu())
    net = StaticPrunedResNet(src, _resolve_widths(src, keep, widths), fold)
    return net.to(torch.device("cpu"))


def static_macs(model, keep: Optional[KeepSpec] = None, input_size: Optional[Tuple[int, int]] = None, *,
                widths: Optional[Sequence[int]] = None) -> int:
    """MACs of ``static_pruned_like(model, keep)`` on one image, without building it."""
    src = _source(model)
    ws = _resolve_widths(src, keep, widths)
    cout, cin, k, _ = src.stem.weight.shape
    total, h, w = stem_macs_from_dims(cin, cout, k, src.stem_stride, src.stem_padding, src.maxpool,
                                      *(input_size or src.input_size))
    for b, width in zip(src.blocks, ws):
        m, h, w = block_macs_from_dims(b.in_channels, b.planes, b.stride, b.shortcut is not None, h, w,
                                       width, b.planes)
        total += m
    return int(total + src.fc_weight.numel())


def keep_for_target_macs(model, target: float, input_size: Optional[Tuple[int, int]] = None,
                         iters: int = 40) -> float:
    """The uniform keep ratio whose static network costs about ``target`` x the dense MACs.

    Bisection over the ratio; widths are integers, so the result is the ratio
    whose MAC fraction is closest to ``target`` among those visited.  ``target`` is
    clamped to what the network can reach (one channel per block at least).
    """
    if not 0.0 < float(target) <= 1.0:
        raise ValueError(f"target MAC fraction must be in (0, 1]; got {target}")
    dense = static_macs(model, 1.0, input_size)
    lo, hi = 0.0, 1.0
    best_keep, best_err = 1.0, abs(1.0 - target)
    for _ in range(iters):
        mid = (lo + hi) / 2
        if mid <= 0:
            break
        frac = static_macs(model, mid, input_size) / dense
        err = abs(frac - target)
        if err < best_err or (err == best_err and mid < best_keep):
            best_keep, best_err = mid, err
        if frac < target:
            lo = mid
        else:
            hi = mid
    return float(best_keep)
