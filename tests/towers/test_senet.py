import torch

from cascade.towers.embedding import Embeddings
from cascade.towers.senet import SENet, SENetTwoTower
from tests.export.roundtrip import assert_towers_round_trip
from tests.towers.test_embedding import SPEC


def test_senet_hand_worked():
    se = SENet(2, reduction=2)  # 2 fields -> 1 -> 2
    with torch.no_grad():
        se.excite[0].weight[:] = torch.tensor([[1.0, 1.0]])
        se.excite[0].bias.zero_()
        se.excite[2].weight[:] = torch.tensor([[1.0], [-1.0]])
        se.excite[2].bias.zero_()
    e = torch.tensor([[[1.0, 3.0], [4.0, 0.0]]])
    # squeeze: field means (2, 2); W1: 2 + 2 = 4, relu 4; W2: (4, -4);
    # sigmoid: (0.9820138, 0.0179862) -> field 0 * 0.9820138, field 1 * 0.0179862
    want = torch.tensor([[[0.9820138, 2.9460414], [0.0719448, 0.0]]])
    torch.testing.assert_close(se(e), want)


def test_senet_two_tower_reweights_before_the_mlp(small_world, tmp_path):
    torch.manual_seed(0)
    m = SENetTwoTower(SPEC.side("user"), SPEC.side("item"), Embeddings(SPEC, 8), history_len=4, hidden=(16, 8), reduction=2).eval()
    assert isinstance(m.user.reweight, SENet) and isinstance(m.item.reweight, SENet)
    out = m(torch.tensor([[1, 2, 3, 0, 0]]), torch.tensor([[[1, 1, 2, 0]]]))
    with torch.no_grad():
        m.user.reweight.excite[2].bias.fill_(-1e4)  # every user field weighted ~0: the user side loses its input
    assert not torch.allclose(out, m(torch.tensor([[1, 2, 3, 0, 0]]), torch.tensor([[[1, 1, 2, 0]]])))
    ds, _ = small_world
    spec = ds.schema.features
    m = SENetTwoTower(spec.side("user"), spec.side("item"), Embeddings(spec, 8), history_len=ds.schema.history_max, hidden=(16, 8))
    assert_towers_round_trip(m, ds, tmp_path)
