"""ManiDP losses (docs/DESIGN.md 1.3) against values worked out by hand on tiny tensors."""

import math

import pytest
import torch

from manidp.losses import complexity_loss, complexity_weights, gram, similarity_loss


def test_complexity_weights_by_hand():
    """t = 0.5 * 2 = 1: w = (t - ce)/t for ce < t, else 0 (ce == t is not easy)."""
    ce = torch.tensor([0.1, 0.5, 1.0, 2.0])
    w = complexity_weights(ce, mean_prev_loss=2.0, thre_cls=0.5, gamma=1.0)
    assert torch.allclose(w, torch.tensor([0.9, 0.5, 0.0, 0.0]))
    w2 = complexity_weights(ce, mean_prev_loss=2.0, thre_cls=0.5, gamma=2.0)
    assert torch.allclose(w2, torch.tensor([0.81, 0.25, 0.0, 0.0]))


def test_complexity_weights_clamp_and_no_previous_loss():
    """ce = 0 gives weight 1; a zero L_prev makes nobody easy; tiny margins stay >= 1e-10."""
    assert torch.allclose(complexity_weights(torch.tensor([0.0]), 1.0), torch.tensor([1.0]))
    assert torch.equal(complexity_weights(torch.tensor([0.0, 1.0]), 0.0), torch.zeros(2))
    w = complexity_weights(torch.tensor([0.5 - 1e-12], dtype=torch.float64), 1.0, thre_cls=0.5)
    assert float(w) == pytest.approx(1e-10)  # (t - ce) / t = 2e-12, clamped up


def test_complexity_weights_carry_no_gradient():
    """The weights are constants for the optimiser."""
    ce = torch.tensor([0.1, 0.3], requires_grad=True)
    w = complexity_weights(ce, 2.0)
    assert not w.requires_grad


def test_complexity_loss_by_hand():
    """sum over gates of mean_i(lasso_i * w_i) = mean(.9, 1, 0, 0) + mean(.45, .25, 0, 0) = 0.65."""
    lasso1 = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    lasso2 = torch.tensor([0.5, 0.5, 0.5, 0.5], requires_grad=True)
    w = torch.tensor([0.9, 0.5, 0.0, 0.0], requires_grad=True)
    loss = complexity_loss([lasso1, lasso2], w)
    assert loss.item() == pytest.approx(0.65)
    loss.backward()
    assert torch.allclose(lasso1.grad, w.detach() / 4)
    assert w.grad is None  # weights are detached inside the loss


def test_complexity_loss_without_gates_is_zero():
    """A dense model has no gates: the complexity loss is 0."""
    assert complexity_loss([], torch.ones(3)).item() == 0.0


def test_similarity_loss_by_hand_identity_vs_ones():
    """G(g) = I, G(feat) = all ones: diff has two off-diagonal ones, 2 / N^2 = 0.5."""
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    feat = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert similarity_loss(g, feat).item() == pytest.approx(0.5)


def test_similarity_loss_by_hand_scaled_rows():
    """g rows (1,1), (1,0): cos = 1/sqrt2; feat rows orthogonal (scaled): diff^2 sums to 1, / 4."""
    g = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    feat = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    assert gram(g)[0, 1].item() == pytest.approx(1 / math.sqrt(2))
    assert similarity_loss(g, feat).item() == pytest.approx(0.25)


def test_similarity_loss_gradients_reach_both_sides():
    """Neither side is detached (docs/DESIGN.md 1.3)."""
    g = torch.tensor([[1.0, 1.0], [1.0, 0.0]], requires_grad=True)
    feat = torch.tensor([[2.0, 0.5], [0.1, 3.0]], requires_grad=True)
    similarity_loss(g, feat).backward()
    assert g.grad.abs().sum() > 0 and feat.grad.abs().sum() > 0


def test_similarity_loss_zero_rows_are_finite():
    """A gate that closed every channel (all-zero row) must not give NaN."""
    g = torch.tensor([[0.0, 0.0], [1.0, 2.0]], requires_grad=True)
    feat = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = similarity_loss(g, feat)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(g.grad).all() and torch.isfinite(feat.grad).all()


def test_similarity_loss_batch_mismatch_raises():
    """g and feat must describe the same instances."""
    with pytest.raises(ValueError):
        similarity_loss(torch.ones(2, 3), torch.ones(3, 3))
