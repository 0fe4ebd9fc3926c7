import math

import pytest
from hypothesis import given, settings, strategies as st
from torch import nn

from bncal.errors import BncalError
from bncal.momentum import (
    format_momentum,
    InverseDecayMomentum, MAX_TF_MOMENTUM, MIN_TF_MOMENTUM, suggest_momentum, tf_to_torch, torch_to_tf,
)
from bncal.torch.nn import BatchRenorm1d


@given(st.floats(0.0, 1.0))
def test_conversions_are_complements_and_round_trip(m):
    assert torch_to_tf(m) == pytest.approx(1.0 - m)
    assert tf_to_torch(torch_to_tf(m)) == pytest.approx(m, abs=1e-12)
    assert torch_to_tf(tf_to_torch(m)) == pytest.approx(m, abs=1e-12)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_conversions_reject_out_of_range(bad):
    with pytest.raises(BncalError):
        torch_to_tf(bad)
    with pytest.raises(BncalError):
        tf_to_torch(bad)


def test_cumulative_average_has_no_tf_equivalent():
    with pytest.raises(BncalError, match="cumulative"):
        torch_to_tf(None)


def _expected_tf(batch, n):
    steps = math.ceil(n / batch)
    return min(max(1 - 1 / (steps / 4), MIN_TF_MOMENTUM), MAX_TF_MOMENTUM)


@pytest.mark.parametrize("batch,n", [(32, 50_000), (128, 50_000), (512, 50_000), (2048, 50_000),
                                     (4096, 50_000), (8192, 50_000), (256, 1_281_167)])
def test_suggestion_follows_documented_formula(batch, n):
    s = suggest_momentum(batch, n, epochs=90)
    assert s.steps_per_epoch == math.ceil(n / batch)
    assert s.tf == pytest.approx(_expected_tf(batch, n))
    assert s.torch == pytest.approx(1 - s.tf)
    assert s.value == pytest.approx(s.torch)  # default convention is torch
    assert s.window_steps == pytest.approx(1 / (1 - s.tf))
    assert suggest_momentum(batch, n, 90, convention="tf").value == pytest.approx(s.tf)


def test_suggestion_reproduces_published_guidance():
    small = suggest_momentum(32, 50_000, epochs=30)  # many steps per epoch
    assert 0.9 <= small.tf <= 0.99 and not small.use_schedule
    for batch in (2048, 4096):  # few steps per epoch
        large = suggest_momentum(batch, 50_000, epochs=30)
        assert 0.6 <= large.tf <= 0.85
        assert large.use_schedule and "InverseDecayMomentum" in large.schedule


def test_schedule_recommended_when_initial_statistics_would_persist():
    # Window ~62 steps, but a single epoch of 250 steps leaves the initial statistics > 1 % weight.
    s = suggest_momentum(4, 1000, epochs=1)
    assert s.tf > 0.9 and s.use_schedule and s.initial_weight > 0.01
    assert not suggest_momentum(4, 1000, epochs=20).use_schedule


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4096), st.integers(1, 10**6))
def test_suggestion_is_in_range_and_not_increasing_with_batch(batch, n):
    s = suggest_momentum(batch, n)
    assert MIN_TF_MOMENTUM <= s.tf <= MAX_TF_MOMENTUM
    assert suggest_momentum(batch * 2, n).tf <= s.tf


@pytest.mark.parametrize("args", [(0, 10), (1.5, 10), (4, 0), (4, 10, 0)])
def test_suggestion_rejects_bad_sizes(args):
    with pytest.raises(BncalError):
        suggest_momentum(*args)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.BatchNorm2d(3)
        self.b = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, momentum=None))
        self.c = BatchRenorm1d(3)


def _momenta(model):
    return [m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_inverse_decay_sequence_matches_formula_and_sets_every_bn():
    model = _Net()
    sched = InverseDecayMomentum(model, base=0.8, step_scale=10, ceiling=0.9)
    assert _momenta(model) == [1.0, 1.0, 1.0]  # step 0: TF 0, the first batch replaces the init
    for step in range(1, 120):
        torch_m = sched.step()
        expected_tf = min(1 - 0.8 ** (step / 10), 0.9)
        assert sched.tf_momentum() == pytest.approx(expected_tf)
        assert torch_m == pytest.approx(1 - expected_tf)
        assert _momenta(model) == pytest.approx([1 - expected_tf] * 3)
    assert sched.tf_momentum() == pytest.approx(0.9)  # capped
    assert InverseDecayMomentum.steps_to_ceiling(0.9) == math.ceil(10 * math.log(0.1) / math.log(0.8))


def test_inverse_decay_state_dict_restore_and_torch_ceiling():
    model = _Net()
    sched = InverseDecayMomentum(model, ceiling=0.05, convention="torch")
    for _ in range(7):
        sched.step()
    state = sched.state_dict()
    other_model = _Net()
    other = InverseDecayMomentum(other_model)
    other.load_state_dict(state)
    assert other.last_step == 7 and other.ceiling_tf == pytest.approx(0.95)
    assert _momenta(other_model) == pytest.approx(_momenta(model))
    other.restore()
    assert _momenta(other_model) == [0.1, None, 0.01]


def test_inverse_decay_refuses_model_without_bn():
    with pytest.raises(BncalError, match="no BatchNorm"):
        InverseDecayMomentum(nn.Linear(2, 2))


@given(st.floats(1e-9, 1 - 1e-9))
def test_formatted_momentum_tells_both_sides_apart(m):
    """The text keeps 3 significant digits of m and of 1 - m: 0.9997 stays 0.9997, not 1."""
    text = format_momentum(m)
    assert abs(float(text) - m) <= 5e-4 * min(m, 1 - m)
    assert format_momentum(0.9997) == "0.9997" and format_momentum(0.99) == "0.99"
    assert format_momentum(1 - 0.9997) == "0.0003"
