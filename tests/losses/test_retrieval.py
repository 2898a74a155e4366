import math

import pytest
import torch

from cascade.losses.retrieval import log_q_correction, remove_accidental_hits, sampled_softmax


def test_log_q_correction_sign_hand_worked():
    # two candidates with the same raw score 2.0; item 0 is drawn 4x as often as item 1
    # (expected counts 0.4 and 0.1): corrected logits 2 - ln 0.4 = 2.916 and 2 - ln 0.1 = 4.303,
    # so the over-sampled popular item ends up lower.
    out = log_q_correction(torch.tensor([[2.0, 2.0]]), torch.log(torch.tensor([0.4, 0.1])))
    assert out[0, 0].item() == pytest.approx(2 - math.log(0.4))
    assert out[0, 1].item() == pytest.approx(2 - math.log(0.1))
    assert out[0, 0] < out[0, 1]


def test_accidental_hits_are_masked_but_not_the_own_positive():
    logits = torch.zeros(2, 3)
    # row 0's positive is item 7 (column 0); column 2 is item 7 again -> masked
    out = remove_accidental_hits(logits, torch.tensor([7, 8]), torch.tensor([7, 8, 7]), torch.tensor([0, 1]))
    assert out[0].tolist() == [0.0, 0.0, float("-inf")]
    assert out[1].tolist() == [0.0, 0.0, 0.0]


def test_sampled_softmax_hand_worked():
    # row logits (ln 3, 0) -> softmax (3/4, 1/4); target 0 -> -ln(3/4) = 0.287682
    loss = sampled_softmax(torch.tensor([[math.log(3), 0.0]]), torch.tensor([0]))
    assert loss.item() == pytest.approx(-math.log(0.75))


def test_weighted_sampled_softmax_hand_worked():
    # rows: (ln 3, 0) target 0 -> -ln(3/4); (0, 0) target 1 -> ln 2. Weights (0.5, 1.5) average
    # 1, so the loss is (0.5 * 0.287682 + 1.5 * 0.693147) / 2 = 0.591781
    logits = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]])
    loss = sampled_softmax(logits, torch.tensor([0, 1]), torch.tensor([0.5, 1.5]))
    assert loss.item() == pytest.approx((0.5 * -math.log(0.75) + 1.5 * math.log(2)) / 2)
    assert sampled_softmax(logits, torch.tensor([0, 1]), torch.ones(2)).item() == pytest.approx(sampled_softmax(logits, torch.tensor([0, 1])).item())
