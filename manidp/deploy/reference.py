"""The reference backend: plain PyTorch, one instance at a time (docs/DESIGN.md 3.2, 7.1).

It is the ground truth every fast backend is tested against, so it is written
for clarity, not speed: per instance it gathers the active weight rows and
input-channel slices and runs compact convolutions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import Backend, BlockResult, register_backend

__all__ = ["ReferenceBackend", "gate_forward"]


def gate_forward(gate, pooled: torch.Tensor):
    """Gate values (fp32) and the boolean active set from pooled input (N, Cin)."""
    h = F.relu(pooled.float() @ gate.fc1.t())
    g = torch.clamp(F.relu(h @ gate.fc2.t() + gate.fc2_bias), max=gate.clamp_max)
    return g, (g >= gate.threshold) & (g > 0)


def active_counts(active: torch.Tensor) -> torch.Tensor:
    """(N, C) bool active sets -> (N,) int32 counts."""
    return active.sum(1).to(torch.int32)


class ReferenceBackend(Backend):
    """Per-instance gather in plain PyTorch; every device, every floating dtype."""

    name = "reference"
    differentiable = True  # plain PyTorch ops: gradients flow to the input and the weights
    devices = ("cpu", "cuda")
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

    def block(self, blk, x: torch.Tensor) -> BlockResult:
        g1, act1 = gate_forward(blk.gate1, x.float().mean(dim=(2, 3)))
        shortcut = self._shortcut(blk, x)
        outs, act2s = [], []
        for n in range(x.shape[0]):
            out_n, act2 = self._instance(blk, x[n:n + 1], g1[n], act1[n], shortcut[n:n + 1])
            outs.append(out_n)
            act2s.append(act2)
        return BlockResult(torch.cat(outs), active_counts(act1), active_counts(torch.stack(act2s)))

    @staticmethod
    def _shortcut(blk, x: torch.Tensor) -> torch.Tensor:
        if not blk.has_shortcut:
            return x
        return F.conv2d(x, blk.shortcut.weight.to(x.dtype), blk.shortcut.bias.to(x.dtype), stride=blk.stride)

    @staticmethod
    def _instance(blk, xn, g1, act1, shortcut_n):
        """One instance: compact conv1, gate2 from the compact output, compact conv2, scatter-add."""
        dt = xn.dtype
        a_idx, size = act1.nonzero().flatten(), shortcut_n.shape[2:]
        if a_idx.numel():
            a = F.conv2d(xn, blk.conv1.weight[a_idx].to(dt), blk.conv1.bias[a_idx].to(dt),
                         stride=blk.stride, padding=1)
            a = F.relu(a * g1[a_idx].to(dt)[None, :, None, None])
        else:
            a = xn.new_zeros(1, 0, *size)
        pooled = torch.zeros(1, blk.planes, device=xn.device)
        pooled[0, a_idx] = a.float().mean(dim=(2, 3))[0]
        g2, act2 = gate_forward(blk.gate2, pooled)
        g2, act2 = g2[0], act2[0]
        b_idx = act2.nonzero().flatten()
        out = shortcut_n.clone()
        if b_idx.numel():
            bias = blk.conv2.bias[b_idx].to(dt)
            if a_idx.numel():
                b = F.conv2d(a, blk.conv2.weight[b_idx][:, a_idx].to(dt), bias, padding=1)
            else:  # no input channel: conv_b is its bias alone
                b = bias[None, :, None, None].expand(1, -1, *size)
            out[:, b_idx] += b * g2[b_idx].to(dt)[None, :, None, None]
        return F.relu(out), act2


register_backend("reference", ReferenceBackend)
