"""The C++ CPU ops (``torch.ops.manidp.gate_compact`` / ``gated_block``) on their own.

Checked against plain-PyTorch definitions, with ``torch.library.opcheck`` (schema, fake
kernels, dispatch), under ``torch.compile`` and for clear errors on bad inputs.
"""

import pytest
import torch
import torch.nn.functional as F

from manidp.deploy import ops
from manidp.kernels import build_config

pytestmark = pytest.mark.skipif(not ops.HAVE_CPU_OPS, reason=f"manidp._C not built ({ops.IMPORT_ERROR!r})")


def _gate(cin=24, c=20, hidden=10, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(pooled=torch.randn(n, cin, generator=g), fc1=torch.randn(hidden, cin, generator=g) / cin ** 0.5,
                fc2=torch.randn(c, hidden, generator=g) / hidden ** 0.5, fc2_bias=torch.rand(c, generator=g),
                threshold=torch.tensor(0.5))


def compact_indices(active: torch.Tensor):
    """(N, C) bool -> (idx int32 (N, C), cnt int32 (N,)): active ids first, ascending, then -1."""
    n, c = active.shape
    ar = torch.arange(c).expand(n, c)
    order = torch.where(active, ar, ar + c).argsort(dim=1)  # active channels sort before inactive ones
    cnt = active.sum(1).to(torch.int32)
    return torch.where(torch.arange(c) < cnt[:, None], order, -1).to(torch.int32), cnt


def _gate_reference(pooled, fc1, fc2, fc2_bias, threshold, clamp_max):
    g = torch.clamp(F.relu(F.relu(pooled @ fc1.t()) @ fc2.t() + fc2_bias), max=clamp_max)
    idx, cnt = compact_indices((g >= threshold) & (g > 0))
    return g, idx, cnt


@pytest.mark.parametrize("threshold,clamp_max", [(0.5, 1000.0), (float("inf"), 1000.0), (float("-inf"), 1000.0),
                                                 (0.3, 0.6)])
def test_gate_compact_matches_reference(threshold, clamp_max):
    args = _gate()
    args["threshold"] = torch.tensor(threshold)
    g, idx, cnt = ops.gate_compact(**args, clamp_max=clamp_max)
    want_g, want_idx, want_cnt = _gate_reference(**args, clamp_max=clamp_max)
    torch.testing.assert_close(g, want_g, rtol=1e-5, atol=1e-6)
    assert idx.dtype == cnt.dtype == torch.int32
    assert torch.equal(cnt, want_cnt)
    assert torch.equal(idx, want_idx)  # active ids ascending, then -1
    if threshold == float("inf"):
        assert (cnt == 0).all()


def test_gate_compact_counts_differ_per_row():
    args = _gate(n=16, c=64, hidden=32)
    args["threshold"] = torch.tensor(0.4)
    _, idx, cnt = ops.gate_compact(**args, clamp_max=1000.0)
    assert len(set(cnt.tolist())) > 4
    for row, k in zip(idx, cnt):
        active = row[:k]
        assert (active[1:] > active[:-1]).all() and (row[k:] == -1).all()


def _block_args(cin=8, c=12, stride=2, shortcut=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    hidden = max(c // 2, 1)
    gate = lambda ci: [r(hidden, ci) / ci ** 0.5, r(c, hidden) / hidden ** 0.5, torch.rand(c, generator=g) + 0.2,  # noqa: E731
                       torch.tensor(0.4)]
    ws, bs = (r(c, cin, 1, 1) / cin ** 0.5, r(c)) if shortcut else (None, None)
    return [r(c, cin, 3, 3) / (3 * cin ** 0.5), r(c), r(c, c, 3, 3) / (3 * c ** 0.5), r(c), ws, bs,
            *gate(cin), *gate(c), 1000.0, stride]


def _block_reference(x, w1, b1, w2, b2, ws, bs, f11, f12, gb1, t1, f21, f22, gb2, t2, clamp_max, stride):
    """docs/DESIGN.md 3.2 written densely with masks: the masked training forward with folded BN."""
    g1, _, _ = _gate_reference(x.mean((2, 3)), f11, f12, gb1, t1, clamp_max)
    m1 = g1 * ((g1 >= t1) & (g1 > 0))
    a = F.relu(F.conv2d(x, w1, b1, stride, 1)) * m1[:, :, None, None]
    g2, _, _ = _gate_reference(a.mean((2, 3)), f21, f22, gb2, t2, clamp_max)
    m2 = g2 * ((g2 >= t2) & (g2 > 0))
    sc = x if ws is None else F.conv2d(x, ws, bs, stride)
    return F.relu(sc + F.conv2d(a, w2, b2, 1, 1) * m2[:, :, None, None]), m1 > 0, m2 > 0


@pytest.mark.parametrize("mode", list(ops.MODES))
# Odd sizes; 7x7 and 14x14 -> 7x7 outputs (49 = 3 * 16 + 1 pixels: the dot-product tail path).
@pytest.mark.parametrize("shape,stride,shortcut", [((3, 8, 9, 7), 2, True), ((2, 12, 6, 5), 1, False),
                                                   ((1, 8, 16, 16), 1, True), ((2, 8, 14, 14), 2, True),
                                                   ((1, 12, 7, 7), 1, False)])
def test_gated_block_matches_masked_forward(mode, shape, stride, shortcut):
    args = _block_args(cin=shape[1], c=12, stride=stride, shortcut=shortcut)
    x = torch.randn(*shape)
    out, cnt1, cnt2 = ops.gated_block(x, *args[:6], args[6:10], args[10:14], args[14], args[15], mode=mode)
    want, act1, act2 = _block_reference(x, *args)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert cnt1.dtype == cnt2.dtype == torch.int32
    assert torch.equal(cnt1, act1.sum(1).int()) and torch.equal(cnt2, act2.sum(1).int())


def test_opcheck_gate_compact():
    args = _gate(n=3, cin=6, c=5, hidden=3)
    torch.library.opcheck(torch.ops.manidp.gate_compact.default, tuple(args.values()) + (1000.0,))


@pytest.mark.parametrize("stride,shortcut", [(2, True), (1, False)])
def test_opcheck_gated_block(stride, shortcut):
    cin = 8 if shortcut else 12
    args = _block_args(cin=cin, c=12, stride=stride, shortcut=shortcut)
    x = torch.randn(2, cin, 7, 6)
    torch.library.opcheck(torch.ops.manidp.gated_block.default, (x, *args, 0))


def test_ops_trace_under_torch_compile():
    args = _block_args()
    x = torch.randn(2, 8, 9, 9)

    def f(x):
        out, cnt1, cnt2 = torch.ops.manidp.gated_block(x, *args, 0)
        return out.relu().sum((2, 3)), cnt1 + cnt2

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    want = f(x)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])


def test_ops_export():
    args = _block_args()

    class Block(torch.nn.Module):
        def forward(self, x):
            out, cnt1, cnt2 = torch.ops.manidp.gated_block(x, *args, 0)
            return out, cnt1 + cnt2

    x = torch.randn(2, 8, 9, 9)
    program = torch.export.export(Block(), (x,))
    assert "manidp.gated_block" in program.graph_module.code
    got, want = program.module()(x), Block()(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bad_inputs_raise_clear_errors():
    args = _block_args()
    x = torch.randn(2, 8, 9, 9)
    with pytest.raises(RuntimeError, match=r"x must be float32"):
        torch.ops.manidp.gated_block(x.double(), *args, 0)
    with pytest.raises(RuntimeError, match=r"w1 must have shape \(C, Cin, 3, 3\)"):
        torch.ops.manidp.gated_block(x, args[0][:, :4], *args[1:], 0)
    with pytest.raises(RuntimeError, match=r"x must have shape \(N, Cin, H, W\)"):
        torch.ops.manidp.gated_block(x[0], *args, 0)
    with pytest.raises(RuntimeError, match="gate2 fc1 must have shape"):
        torch.ops.manidp.gated_block(x, *args[:10], args[10][:, :3], *args[11:], 0)
    with pytest.raises(RuntimeError, match="ws and bs must be given together"):
        torch.ops.manidp.gated_block(x, *args[:5], None, *args[6:], 0)
    with pytest.raises(RuntimeError, match="stride 1 and Cin == C"):
        torch.ops.manidp.gated_block(x, *args[:4], None, None, *args[6:], 0)
    with pytest.raises(RuntimeError, match="mode must be"):
        torch.ops.manidp.gated_block(x, *args, max(ops.MODES.values()) + 1)
    g = _gate()
    with pytest.raises(RuntimeError, match=r"threshold must be a float32 CPU tensor with one element"):
        ops.gate_compact(g["pooled"], g["fc1"], g["fc2"], g["fc2_bias"], torch.zeros(2), 1000.0)
    with pytest.raises(RuntimeError, match=r"fc1 must have shape \(hidden, Cin\)"):
        ops.gate_compact(g["pooled"], g["fc1"][:, :5], g["fc2"], g["fc2_bias"], g["threshold"], 1000.0)


def test_mode_numbers_compiled_from_build_config():
    """The C++ kernels were compiled with the mode numbers Python uses (kernels/build_config.py)."""
    args = _block_args()
    x = torch.randn(2, 8, 9, 9)
    with pytest.raises(RuntimeError) as err:
        torch.ops.manidp.gated_block(x, *args, -1)
    numbers = [f"{build_config.BLOCK_MODES[m]} ({label})" for m, label in
               (("auto", "auto"), ("instance", "per instance"), ("union", "union"))]
    assert all(n in str(err.value) for n in numbers), str(err.value)
    assert ops.MODES is build_config.BLOCK_MODES
