import pytest
import torch

from cascade.losses.dat import adaptive_mimic


def test_adaptive_mimic_hand_worked():
    a_u = torch.tensor([[1.0, 0.0]])
    p_u = torch.tensor([[1.0, 0.0]])
    a_v = torch.tensor([[[0.0, 0.0], [5.0, 5.0]]])
    p_v = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    labels = torch.tensor([[1.0, 0.0]])
    mask = torch.tensor([[True, True]])
    # positive: ||(1,0)-(0,1)||^2 = 2 and ||(0,0)-(1,0)||^2 = 1 -> 3; the negative adds 0;
    # mean over the 2 valid samples -> 1.5
    assert adaptive_mimic(a_u, a_v, p_u, p_v, labels, mask).item() == pytest.approx(1.5)
