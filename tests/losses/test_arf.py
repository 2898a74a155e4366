import math

import pytest
import torch

from cascade.losses.arf import UncertaintyWeights, e2e_loss, global_loss, joint_survival, relax_bce, relax_loss
from cascade.losses.sorting import hard_sort, neural_sort, top_k_indicator

# a relaxed sort of 2 items whose columns do not sum to 1 (0.8 each), as NeuralSort's need not
P = torch.tensor([[[0.6, 0.3], [0.2, 0.5]]])
HALF = torch.full((1, 2, 2), 0.5)
G = torch.tensor([[1.0, 0.0]])
ALL = torch.ones(1, 2, dtype=torch.bool)


def test_relax_loss_hand_worked():
    # m = 1: top-1 mass (0.6, 0.3); only item 0 is ground truth: -log(0.6 / 1 + 1e-6), over 2 items
    assert relax_loss(P, G, ALL, m=1).item() == pytest.approx(-math.log(0.6 + 1e-6) / 2, abs=1e-6)
    # a list of no more than m valid items is skipped
    assert relax_loss(P, G, ALL, m=2).item() == 0.0


def test_relax_bce_hand_worked_with_stop_gradient_column_sums():
    # column sums (0.8, 0.8): q_top = (0.6, 0.3) / 0.8 = (0.75, 0.375), q_bottom = (0.25, 0.625)
    # item 0 (g = 1): -log 0.75 = 0.287682; item 1 (g = 0): -log 0.625 = 0.470004; mean 0.378843
    p = P.clone().requires_grad_()
    loss = relax_bce(p, G, ALL, m=1)
    assert loss.item() == pytest.approx((-math.log(0.75) - math.log(0.625)) / 2, abs=1e-5)
    loss.backward()
    # column sum under stop-gradient: dL/dP[0, 0] = -1 / (2 * q_top * 0.8) = -1 / (2 * 0.75 * 0.8) = -0.8333
    # (with the column sum differentiated it would be -0.2083)
    assert p.grad[0, 0, 0].item() == pytest.approx(-1 / (2 * 0.75 * 0.8), rel=1e-4)
    # item 1's bottom mass: dL/dP[1, 1] = -1 / (2 * 0.625 * 0.8) = -1.0
    assert p.grad[0, 1, 1].item() == pytest.approx(-1.0, rel=1e-4)


def test_global_loss_hand_worked():
    # target = identity; rows: -log 0.8 / 2 = 0.111572 and -log 0.7 / 2 = 0.178337; mean 0.144954
    p_hat = torch.tensor([[[0.8, 0.2], [0.3, 0.7]]])
    target = torch.eye(2).unsqueeze(0)
    assert global_loss(p_hat, target, ALL).item() == pytest.approx((-math.log(0.8 + 1e-6) - math.log(0.7 + 1e-6)) / 4, abs=1e-6)
    assert global_loss(p_hat, target, ALL, size=3).item() == 0.0  # shorter than the global size: skipped


def test_e2e_loss_hand_worked():
    # recall: uniform, quota 1 -> q_R = (0.5, 0.5); pre-rank: P, quota 1 -> q_P = (0.75, 0.375)
    # survival p = (0.375, 0.1875); g = (1, 0): (-log 0.375 - log 0.8125) / 2 = 0.594235
    torch.testing.assert_close(joint_survival([HALF, P], [1, 1]), torch.tensor([[0.375, 0.1875]]))
    assert e2e_loss([HALF, P], [1, 1], G, ALL).item() == pytest.approx((-math.log(0.375) - math.log(0.8125)) / 2, abs=1e-5)


def test_uncertainty_weights_keep_the_main_term_at_weight_one():
    w = UncertaintyWeights(1)
    main, aux = torch.tensor(2.0), torch.tensor(4.0)
    assert w(main, aux).item() == pytest.approx(2 + 4 / 2)  # sigma = 1: aux / 2 + log 1
    with torch.no_grad():
        w.log_sigma.fill_(math.log(2.0))
    assert w(main, aux).item() == pytest.approx(2 + 4 / 8 + math.log(2.0))
    with pytest.raises(ValueError, match="expected 1 auxiliary"):
        w(main, aux, aux)


def test_relax_bce_descends_towards_the_ground_truth():
    # a few gradient steps on raw scores move the ground-truth items into the top-m
    torch.manual_seed(0)
    s = torch.randn(1, 8, requires_grad=True)
    mask = torch.ones(1, 8, dtype=torch.bool)
    target = torch.arange(8.0).unsqueeze(0)  # ground truth = items 6 and 7
    g = top_k_indicator(target, mask, 2)
    opt = torch.optim.SGD([s], lr=1.0)
    for _ in range(200):
        opt.zero_grad()
        relax_bce(neural_sort(s, mask, tau=1.0), g, mask, m=2).backward()
        opt.step()
    top2 = hard_sort(s.detach(), mask)[0].argmax(1)[:2]
    assert set(top2.tolist()) == {6, 7}
