import pytest
import torch

from cascade.towers.base import Dropout, maxsim_score


def test_dropout_keeps_about_1_minus_p_and_rescales():
    torch.manual_seed(0)
    d = Dropout(0.3).train()
    y = d(torch.ones(200_000))
    kept = y != 0
    # kept fraction ~ Binomial(200k, 0.7)/200k: std = sqrt(0.7 * 0.3 / 200k) = 0.001, so 0.7 +- 0.005 is 5 sigma
    assert abs(kept.float().mean().item() - 0.7) < 0.005
    # every kept value is one over the keep rate, p rounded to 1/65536: round(0.3 * 65536) =
    # 19661 of the 65536 int16 values drop, so the scale is 65536 / 45875 = 1.428577 (not 1 / 0.7)
    torch.testing.assert_close(y[kept], torch.full((int(kept.sum()),), 65536 / 45875))
    # neighbours share one 64-bit draw; their masks must still be independent: both kept 0.49,
    # std sqrt(0.49 * 0.51 / 100k) = 0.0016, so +- 0.008 is 5 sigma
    pairs = kept.view(-1, 2)
    assert abs((pairs[:, 0] & pairs[:, 1]).float().mean().item() - 0.49) < 0.008


def test_dropout_is_identity_in_eval_and_its_gradient_is_the_mask():
    x = torch.randn(64, 8, requires_grad=True)
    d = Dropout(0.5)
    assert d.eval()(x) is x
    torch.manual_seed(1)
    y = d.train()(x)
    y.sum().backward()
    # d(y)/d(x) = mask / (1 - p): 2 where kept, 0 where dropped
    torch.testing.assert_close(x.grad, (y != 0).float() * 2.0)


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_dropout_rejects_p_outside_0_1(p):
    with pytest.raises(ValueError, match="dropout must be in"):
        Dropout(p)


def test_maxsim_gradient_reaches_only_the_arg_max():
    u = torch.tensor([[[1.0, 0.0]]], requires_grad=True)  # (1, 1 head, 2)
    v = torch.tensor([[[[3.0, 1.0], [1.0, 1.0]]]], requires_grad=True)  # (1, 1 item, 2 heads, 2)
    # <u, v0> = 3 > <u, v1> = 1, so the score is <u, v0> and d/dv = (u for v0, 0 for v1), d/du = v0
    maxsim_score(u, v).sum().backward()
    torch.testing.assert_close(v.grad, torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]))
    torch.testing.assert_close(u.grad, torch.tensor([[[3.0, 1.0]]]))
