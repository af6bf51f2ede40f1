"""Property-based checks of every available backend against the reference backend.

Random architectures (depth, width, CIFAR/ImageNet stems), batch sizes, spatial
sizes, thresholds (all-closed and all-open gates included) and dtypes; inputs
holding NaN/Inf must propagate as in the dense network and never break indexing.
"""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import threshold_margin
from manidp.calibrate import calibrate_bn, calibrate_keep_ratio
from manidp.deploy import available_backends, compile
from manidp.models import CifarResNet, ImageNetResNet

# The Triton backend on CPU tensors is the interpreter (TRITON_INTERPRET=1): far too slow to
# fuzz here; tests/test_gpu.py holds its contract tests on small shapes.
CPU_BACKENDS = [b for b in available_backends(torch.device("cpu")) if b not in ("reference", "triton")]
FUZZ = settings(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def gated_models(draw):
    """A random small gated ResNet, its input batch and its keep ratio."""
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    if draw(st.booleans()):
        model = CifarResNet(8, num_classes=5, in_channels=draw(st.sampled_from([1, 3])),
                            width_mult=draw(st.sampled_from([0.5, 0.75, 1.0])))
        size = (draw(st.integers(5, 20)), draw(st.integers(5, 20)))
    else:
        model = ImageNetResNet(18, num_classes=7, in_channels=3)
        size = (draw(st.integers(9, 40)), draw(st.integers(9, 40)))
    n = draw(st.integers(1, 5))
    sample = torch.randn(4, model.conv1.in_channels, *size)  # BN statistics need > 1 value
    x = sample[:n] if draw(st.booleans()) else torch.randn(n, *sample.shape[1:])
    calibrate_bn(model, sample)
    calibrate_keep_ratio(model, sample, draw(st.sampled_from([0.0, 0.25, 0.5, 0.8, 1.0])))
    mode = draw(st.sampled_from(["calibrated", "all_closed", "all_open", "mixed"]))
    for i, gate in enumerate(model.gates()):
        if mode == "all_closed" or (mode == "mixed" and i % 3 == 0):
            gate.threshold.fill_(float("inf"))
        elif mode == "all_open" or (mode == "mixed" and i % 3 == 1):
            gate.threshold.fill_(float("-inf"))
    with torch.no_grad():
        # A random deep net with its thresholds overridden can overflow; such a case compares
        # NaN with NaN and checks nothing (non-finite inputs are tested on their own below).
        assume(bool(torch.isfinite(model.eval()(x)).all()))
    # A gate value within rounding of its threshold may fall either side in any two correct
    # implementations: such a draw tests rounding, not the backends (as conftest.calibrated).
    assume(threshold_margin(model, x) > 1e-4)
    return model.eval(), x


def _compare(engine, ref_engine, x, dtype):
    got, st_got = engine(x, return_stats=True)
    want, st_want = ref_engine(x, return_stats=True)
    assert torch.equal(st_got["active"], st_want["active"])
    assert torch.equal(st_got["macs"], st_want["macs"])
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    scale = want.abs().max().clamp_min(1e-6)
    assert float((got.double() - want.double()).abs().max() / scale) < tol


@pytest.mark.skipif(not CPU_BACKENDS, reason="no fast CPU backend built")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@FUZZ
@given(case=gated_models())
def test_backend_matches_reference(backend, case):
    model, x = case
    ref = compile(model, backend="reference")
    engine = compile(model, backend=backend)
    with torch.no_grad():
        _compare(engine, ref, x, torch.float32)


@FUZZ
@given(case=gated_models())
def test_reference_matches_training_model(case):
    model, x = case
    ref = compile(model, backend="reference")
    with torch.no_grad():
        want = model(x)
        got = ref(x)
    assert float((got - want).abs().max() / want.abs().max().clamp_min(1e-6)) < 1e-4


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_propagate(backend, bad):
    torch.manual_seed(0)
    model = CifarResNet(8, num_classes=5)
    x = torch.randn(3, 3, 12, 12)
    calibrate_bn(model, x, keep=0.5)
    model.eval()
    x[1, 0, 3, 4] = bad
    engine = compile(model, backend=backend)
    with torch.no_grad():
        got, stats = engine(x, return_stats=True)
        want = model(x)
    # Instances without bad values are unaffected; the bad one is non-finite, as in the dense network.
    assert torch.isfinite(got[[0, 2]]).all()
    assert not torch.isfinite(got[1]).all()
    assert torch.isfinite(want[[0, 2]]).all() and not torch.isfinite(want[1]).all()
    assert ((stats["active"] >= 0) & (stats["active"] <= 64)).all()
