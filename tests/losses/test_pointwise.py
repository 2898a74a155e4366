import math

import pytest
import torch

from cascade.losses.pointwise import bce


def test_bce_hand_worked_and_masked():
    logits = torch.tensor([[0.0, 2.0], [50.0, -3.0]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    mask = torch.tensor([[True, False], [False, True]])
    # valid: (logit 0, y 1) -> ln 2 = 0.693147; (logit -3, y 1) -> ln(1 + e^3) = 3.048587; mean 1.870867
    assert bce(logits, labels, mask).item() == pytest.approx((math.log(2) + math.log1p(math.exp(3))) / 2, rel=1e-6)
