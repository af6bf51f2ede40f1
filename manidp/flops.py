"""Multiply-accumulate (MAC) accounting, docs/DESIGN.md 1.5.

A conv costs ``Cin_active * Cout_active * k*k * Hout * Wout``; a gate costs its
pooling (one add per input element it reads) and its two fc layers.  BN, ReLU,
max-pooling and residual adds are not counted.  The deployment engine reports
per-instance MACs with the same functions (:func:`block_macs_from_dims`,
:func:`stem_macs_from_dims`), so training-side and deployed numbers agree
exactly; the static-pruning baseline counts with them too.  Every conv output
size in the package comes from :func:`conv_out_size`.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple, Union

import torch
import torch.nn as nn

__all__ = ["MacCount", "conv_out_size", "block_macs_from_dims", "block_macs", "stem_macs_from_dims", "stem_macs",
           "head_macs", "dense_macs", "count_macs", "macs_from_records", "flops_reduction"]

Number = Union[int, torch.Tensor]


class MacCount(NamedTuple):
    """Per-instance MACs of a gated model (gates included) and the dense count."""

    per_instance: torch.Tensor  # (N,) float64
    dense: int

    @property
    def reduction(self) -> float:
        """``1 - mean_i(dynamic_i) / dense``."""
        return flops_reduction(self.per_instance, self.dense)


def flops_reduction(per_instance: torch.Tensor, dense: int) -> float:
    return 1.0 - float(per_instance.double().mean()) / float(dense)


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a conv (or pooling) along one spatial dimension."""
    return (size + 2 * padding - kernel) // stride + 1


def stem_macs_from_dims(in_channels: int, out_channels: int, kernel: int, stride: int, padding: int,
                        maxpool: bool, h: int, w: int) -> Tuple[int, int, int]:
    """MACs of a dense stem conv on an ``h x w`` input and the feature-map size after it.

    ``maxpool`` adds the ImageNet stem's 3x3/2 max-pool (not counted, but it halves the map).
    """
    ho, wo = conv_out_size(h, kernel, stride, padding), conv_out_size(w, kernel, stride, padding)
    macs = in_channels * out_channels * kernel * kernel * ho * wo
    if maxpool:
        ho, wo = conv_out_size(ho, 3, 2, 1), conv_out_size(wo, 3, 2, 1)
    return macs, ho, wo


def block_macs_from_dims(cin: int, planes: int, stride: int, has_shortcut: bool, h: int, w: int,
                         active1: Number = None, active2: Number = None,
                         gate_hidden: Tuple[int, int] = None) -> Tuple[Number, int, int]:
    """MACs of one basic block described by its sizes; the single formula behind every count.

    ``active1``/``active2`` are the active output-channel counts of conv1/conv2
    (ints or per-instance tensors); ``None`` means every channel.  ``gate_hidden``
    holds the hidden widths of (gate1, gate2); ``None`` means an ungated block.
    Returns ``(macs, h_out, w_out)``.
    """
    a1 = planes if active1 is None else active1
    a2 = planes if active2 is None else active2
    ho, wo = conv_out_size(h, 3, stride, 1), conv_out_size(w, 3, stride, 1)
    macs = cin * a1 * 9 * ho * wo + a1 * a2 * 9 * ho * wo
    if has_shortcut:
        macs = macs + cin * planes * ho * wo
    if gate_hidden is not None:
        h1, h2 = gate_hidden
        macs = macs + (cin * h * w + cin * h1 + h1 * planes)      # gate1: pool x, fc1, fc2
        macs = macs + (a1 * ho * wo + planes * h2 + h2 * planes)  # gate2: pool compact a, fc1, fc2
    return macs, ho, wo


def block_macs(block: nn.Module, h: int, w: int, active1: Number = None, active2: Number = None,
               gates: bool = True) -> Tuple[Number, int, int]:
    """MACs of a :class:`manidp.models.BasicBlock` on an ``h x w`` input, and its output size."""
    gated = gates and getattr(block, "gated", False)
    hidden = (block.gate1.fc1.out_features, block.gate2.fc1.out_features) if gated else None
    return block_macs_from_dims(block.conv1.in_channels, block.conv1.out_channels, block.stride,
                                block.downsample is not None, h, w, active1, active2, hidden)


def stem_macs(model: nn.Module, h: int, w: int) -> Tuple[int, int, int]:
    """MACs of the dense stem of a :mod:`manidp.models` ResNet and the feature-map size it produces."""
    conv = model.conv1
    return stem_macs_from_dims(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0],
                               conv.padding[0], getattr(model, "kind", "cifar") == "imagenet", h, w)


def head_macs(model: nn.Module) -> int:
    return model.fc.in_features * model.fc.out_features


def dense_macs(model: nn.Module, input_size: Tuple[int, int]) -> int:
    """MACs of the dense network (no gates) for one ``(H, W)`` input."""
    total, h, w = stem_macs(model, *input_size)
    for blk in model.blocks():
        macs, h, w = block_macs(blk, h, w, gates=False)
        total += macs
    return int(total + head_macs(model))


@torch.no_grad()
def count_macs(model: nn.Module, x: torch.Tensor) -> MacCount:
    """Per-instance MACs of ``model`` on batch ``x`` (eval-mode gates), and the dense count.

    For a dense model every instance costs the dense count.
    """
    if x.dim() != 4:
        raise ValueError(f"expected an (N, C, H, W) batch; got shape {tuple(x.shape)}")
    was_training = model.training
    model.eval()
    try:
        _, records = model(x, return_gates=True)
    finally:
        model.train(was_training)
    return MacCount(macs_from_records(model, records, tuple(x.shape[-2:])), dense_macs(model, tuple(x.shape[-2:])))


def macs_from_records(model: nn.Module, records, input_size: Tuple[int, int]) -> torch.Tensor:
    """(N,) float64 MACs per instance from one forward's gate records (gates counted)."""
    total, h, w = stem_macs(model, *input_size)
    n = records[0].mask.shape[0]
    per = torch.full((n,), float(total + head_macs(model)), dtype=torch.float64)
    it = iter(records)
    for blk in model.blocks():
        if getattr(blk, "gated", False):
            a1 = (next(it).mask > 0).sum(1).double().cpu()
            a2 = (next(it).mask > 0).sum(1).double().cpu()
            macs, h, w = block_macs(blk, h, w, a1, a2)
        else:
            macs, h, w = block_macs(blk, h, w)
        per += macs
    return per
