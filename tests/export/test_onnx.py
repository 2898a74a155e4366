import pytest
import torch
from torch import nn

from cascade.towers.dssm import DSSM
from cascade.towers.embedding import Embeddings
from export.onnx import fold_batchnorm
from tests.export.roundtrip import assert_towers_round_trip, randomise_batchnorm


def test_dssm_towers_round_trip_through_onnxruntime(small_world, tmp_path):
    ds, _ = small_world
    spec = ds.schema.features
    torch.manual_seed(0)
    model = DSSM(spec.side("user"), spec.side("item"), Embeddings(spec, 8), history_len=ds.schema.history_max, hidden=(32, 16))
    assert_towers_round_trip(model, ds, tmp_path)


def test_fold_batchnorm_by_hand():
    # Linear 1 -> 1 with w = 2, b = 1; BatchNorm mean 3, var 4 - eps, gamma 5, beta 7:
    # y = ((2x + 1) - 3) / 2 * 5 + 7 = 5x + 2, so the folded Linear is w = 5, b = 2.
    lin, bn = nn.Linear(1, 1), nn.BatchNorm1d(1)
    with torch.no_grad():
        lin.weight.fill_(2.0), lin.bias.fill_(1.0)
        bn.running_mean.fill_(3.0), bn.running_var.fill_(4.0 - bn.eps), bn.weight.fill_(5.0), bn.bias.fill_(7.0)
    folded = fold_batchnorm(nn.Sequential(lin, bn, nn.ReLU()))
    assert isinstance(folded[1], nn.Identity)
    assert folded[0].weight.item() == pytest.approx(5.0) and folded[0].bias.item() == pytest.approx(2.0)
    assert bn.running_mean.item() == 3.0  # the original is untouched


def test_fold_batchnorm_keeps_the_function_and_refuses_a_lone_batchnorm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3), nn.BatchNorm1d(3))
    randomise_batchnorm(net)
    x = torch.randn(8, 6)
    torch.testing.assert_close(fold_batchnorm(net)(x), net.eval()(x))
    with pytest.raises(ValueError, match="'1' does not follow a Linear"):
        fold_batchnorm(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
