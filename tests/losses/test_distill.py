import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade.losses.distill import listwise_kd, logit_mse, soft_bce

S = torch.tensor([[0.0, math.log(3.0)]])
T0 = torch.zeros(1, 2)
ALL = torch.ones(1, 2, dtype=torch.bool)


def test_listwise_kd_hand_worked():
    # T = 1: softmax(s) = (1/4, 3/4), softmax(t) = (1/2, 1/2): -(0.5 ln 0.25 + 0.5 ln 0.75) = 0.836988
    assert listwise_kd(S, T0, ALL, 1.0).item() == pytest.approx(0.836988, abs=1e-6)
    # T = 2: softmax(s / 2) = (1, sqrt 3) / (1 + sqrt 3) = (0.366025, 0.633975);
    # -(0.5 ln 0.366025 + 0.5 ln 0.633975) = 0.5 (1.005053 + 0.455746) = 0.730399, times T^2 = 4 -> 2.921598
    assert listwise_kd(S, T0, ALL, 2.0).item() == pytest.approx(2.921598, abs=1e-5)


def test_listwise_kd_ignores_padding():
    s = torch.cat([S, torch.tensor([[40.0]])], 1)
    t = torch.cat([T0, torch.tensor([[-40.0]])], 1)
    mask = torch.tensor([[True, True, False]])
    assert listwise_kd(s, t, mask, 1.0).item() == pytest.approx(listwise_kd(S, T0, ALL, 1.0).item())


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-4, 4, width=32), min_size=2, max_size=6), st.floats(0.5, 5))
def test_listwise_kd_is_smallest_at_the_teacher(teacher, temperature):
    # Gibbs: cross-entropy >= entropy, with equality at s = t (+ any constant)
    t = torch.tensor([teacher], dtype=torch.float64)
    mask = torch.ones_like(t, dtype=torch.bool)
    at_teacher = listwise_kd(t + 1.5, t, mask, temperature)
    elsewhere = listwise_kd(torch.flip(t, [1]) * 0.5, t, mask, temperature)
    assert at_teacher <= elsewhere + 1e-9
    # and the gradient there is zero
    s = (t + 1.5).requires_grad_()
    listwise_kd(s, t, mask, temperature).backward()
    assert s.grad.abs().max() < 1e-9


def test_logit_mse_and_soft_bce_hand_worked():
    # (0 - 0)^2 and (ln 3 - 0)^2 -> mean ln(3)^2 / 2
    assert logit_mse(S, T0, ALL).item() == pytest.approx(math.log(3) ** 2 / 2)
    # target sigmoid(0) = 0.5 for both: BCE(0, 0.5) = ln 2; BCE(ln 3, 0.5) = -0.5 ln 0.75 - 0.5 ln 0.25 = 0.836988
    assert soft_bce(S, T0, ALL).item() == pytest.approx((math.log(2) + 0.836988) / 2, abs=1e-6)
