import torch

from cascade.towers.base import dot_score, maxsim_score
from cascade.towers.dssm import DSSM
from cascade.towers.embedding import Embeddings
from tests.towers.test_embedding import SPEC


def _model():
    torch.manual_seed(0)
    return DSSM(SPEC.side("user"), SPEC.side("item"), Embeddings(SPEC, 8), history_len=4, hidden=(16, 8), dropout=0.0, temperature=0.5)


def test_shapes_and_unit_vectors():
    m = _model().eval()
    user = torch.tensor([[1, 3, 4, 0, 0], [2, 0, 0, 0, 0]])  # user_id + 4 history ids
    items = torch.randint(0, 5, (2, 7, 4))
    u, v = m.user(user), m.item(items.reshape(14, 4))
    assert u.shape == (2, 1, 8) and v.shape == (14, 1, 8)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(2, 1))
    logits = m(user, items)
    assert logits.shape == (2, 7)
    # a dot of unit vectors over temperature 0.5 lies in [-2, 2]
    assert logits.abs().max() <= 2.0 + 1e-5


def test_dot_and_maxsim_hand_worked():
    u = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (1, 2 heads, 2)
    v = torch.tensor([[[[3.0, 1.0], [1.0, 1.0]]]])  # (1, 1 item, 2 heads, 2)
    # dot: <u0, v0> + <u1, v1> = 3 + 2 = 5
    assert dot_score(u, v).item() == 5.0
    # maxsim: max(<u0,v0>=3, <u0,v1>=1) + max(<u1,v0>=2, <u1,v1>=2) = 3 + 2 = 5
    v2 = torch.tensor([[[[3.0, 1.0], [0.0, 4.0]]]])
    # with v1 = (0, 4): max(3, 0) + max(2, 8) = 11
    assert maxsim_score(u, v).item() == 5.0 and maxsim_score(u, v2).item() == 11.0
