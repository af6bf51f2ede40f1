"""Turn a trained gated model into the plain tensors the engine runs (docs/DESIGN.md 3.1).

Every BN is folded into the conv before it: ``W' = W * gamma / sigma`` and
``b' = (b - mu) * gamma / sigma + beta``.  :func:`fold_conv_bn` is the package's
one BN fold (static pruning uses it too).  Gates are kept as they are (fc
weights, bias, threshold, clamp).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["fold_bn", "fold_conv_bn", "model_tensors", "model_config"]


@torch.no_grad()
def fold_conv_bn(weight: torch.Tensor, bias: Optional[torch.Tensor],
                 bn: Optional[nn.BatchNorm2d]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias (fp32, contiguous, on ``weight``'s device) of ``bn(conv(x))`` as one conv.

    ``bias`` None means a bias-free conv; ``bn`` None returns the conv's own weight and bias.
    """
    w = weight.detach().float()
    b = bias.detach().float() if bias is not None else torch.zeros(w.shape[0], device=w.device)
    if bn is not None:
        scale = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)
        w = w * scale[:, None, None, None]
        b = (b - bn.running_mean.float()) * scale + bn.bias.detach().float()
    return w.contiguous(), b.contiguous()


def fold_bn(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` as one conv (fp32, contiguous)."""
    return fold_conv_bn(conv.weight, conv.bias, bn)


def _gate_tensors(prefix: str, gate: nn.Module) -> Dict[str, torch.Tensor]:
    return {
        f"{prefix}.fc1": gate.fc1.weight.detach().float().contiguous(),
        f"{prefix}.fc2": gate.fc2.weight.detach().float().contiguous(),
        f"{prefix}.fc2_bias": gate.fc2.bias.detach().float().contiguous(),
        f"{prefix}.threshold": gate.threshold.detach().float().reshape(()).clone(),
    }


@torch.no_grad()
def model_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Flat name -> tensor map of the folded model, on the CPU."""
    out: Dict[str, torch.Tensor] = {}
    out["stem.weight"], out["stem.bias"] = fold_bn(model.conv1, model.bn1)
    for i, blk in enumerate(model.blocks()):
        p = f"blocks.{i}"
        out[f"{p}.conv1.weight"], out[f"{p}.conv1.bias"] = fold_bn(blk.conv1, blk.bn1)
        out[f"{p}.conv2.weight"], out[f"{p}.conv2.bias"] = fold_bn(blk.conv2, blk.bn2)
        if blk.downsample is not None:
            bn = blk.downsample[1] if len(blk.downsample) > 1 else None
            out[f"{p}.shortcut.weight"], out[f"{p}.shortcut.bias"] = fold_bn(blk.downsample[0], bn)
        out.update(_gate_tensors(f"{p}.gate1", blk.gate1))
        out.update(_gate_tensors(f"{p}.gate2", blk.gate2))
    out["fc.weight"] = model.fc.weight.detach().float().contiguous()
    out["fc.bias"] = model.fc.bias.detach().float().contiguous()
    return {k: v.cpu() for k, v in out.items()}


def model_config(model: nn.Module) -> dict:
    """JSON-serialisable description of the architecture the tensors belong to."""
    blocks = list(model.blocks())
    if not blocks or not all(getattr(b, "gated", False) for b in blocks):
        raise ValueError("compile() needs a gated model (dyresnet*); got a dense one. "
                         "Build the gated architecture and load the dense weights into it.")
    return {
        "arch": f"dyresnet{model.depth}",
        "kind": model.kind,
        "num_classes": model.fc.out_features,
        "in_channels": model.conv1.in_channels,
        "stem": {"kernel": model.conv1.kernel_size[0], "stride": model.conv1.stride[0],
                 "padding": model.conv1.padding[0], "maxpool": model.kind == "imagenet"},
        "clamp_max": float(blocks[0].gate1.clamp_max),
        "blocks": [{"in_channels": b.conv1.in_channels, "planes": b.conv1.out_channels,
                    "stride": b.stride, "shortcut": b.downsample is not None} for b in blocks],
    }
