import math

import pytest
import torch

from cascade.losses.rankflow import probability_mse, topk_bpr, tutor

LOGITS = torch.tensor([[0.0, 0.0, math.log(3.0)]])  # p = (0.5, 0.5, 0.75)
TEACHER = torch.tensor([[5.0, 1.0, 3.0]])
ALL = torch.ones(1, 3, dtype=torch.bool)


def test_topk_bpr_hand_worked():
    # teacher's top-1 is item 0 (p 0.5); the rest, items 1 and 2, have mean p 0.625
    # gap = -0.125; loss = -log(sigmoid(-0.125)) = log(1 + e^0.125) = 0.75758
    assert topk_bpr(LOGITS, TEACHER, ALL, k=1).item() == pytest.approx(math.log(1 + math.exp(0.125)), abs=1e-6)


def test_topk_bpr_rest_excludes_padding():
    # a padded item with a huge student logit must not enter "the rest"
    logits = torch.cat([LOGITS, torch.tensor([[50.0]])], 1)
    teacher = torch.cat([TEACHER, torch.tensor([[-9.0]])], 1)
    mask = torch.tensor([[True, True, True, False]])
    assert topk_bpr(logits, teacher, mask, k=1).item() == pytest.approx(topk_bpr(LOGITS, TEACHER, ALL, k=1).item())


def test_tutor_mixes_rank_and_mse_with_alpha_on_the_rank_term():
    teacher = torch.zeros(1, 3)  # sigmoid 0.5 everywhere: squared errors (0, 0, 0.0625), mean 0.0208333
    assert probability_mse(LOGITS, teacher, ALL).item() == pytest.approx(0.0625 / 3)
    bpr = topk_bpr(LOGITS, teacher, ALL, k=1).item()
    assert tutor(LOGITS, teacher, ALL, k=1, alpha=0.25).item() == pytest.approx(0.25 * bpr + 0.75 * 0.0625 / 3)


def test_tutor_never_moves_the_teacher():
    teacher = TEACHER.clone().requires_grad_()
    logits = LOGITS.clone().requires_grad_()
    tutor(logits, teacher, ALL, k=1, alpha=0.5).backward()
    assert teacher.grad is None and logits.grad.abs().sum() > 0
    # raising the teacher's top item lowers the loss
    assert logits.grad[0, 0] < 0


def test_tutor_rejects_alpha_outside_0_1():
    with pytest.raises(ValueError, match="alpha"):
        tutor(LOGITS, TEACHER, ALL, k=1, alpha=1.5)
