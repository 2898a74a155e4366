import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade.towers.cold import COLD
from cascade.towers.embedding import Embeddings
from tests.export.roundtrip import assert_ranker_round_trip
from tests.towers.test_embedding import SPEC


def _model(spec=SPEC, history_len=4):
    torch.manual_seed(0)
    return COLD(spec.side("user"), spec.side("item"), Embeddings(spec, 4), history_len=history_len, hidden=(16, 8), dropout=0.0, reduction=2).eval()


def test_groups_are_the_fields_and_every_user_item_cross():
    m = _model(history_len=0)  # user: user_id; item: item_id, tags -> 1 + 2 + 1 x 2 = 5 groups
    with torch.no_grad():
        m.embeddings.tables["user_id"].weight[2] = torch.tensor([1.0, 2.0, 3.0, 4.0])
        m.embeddings.tables["item_id"].weight[5] = torch.tensor([2.0, 0.0, 1.0, -1.0])
        m.embeddings.tables["tags"].weight[1] = torch.tensor([1.0, 1.0, 0.0, 0.0])
        m.embeddings.tables["tags"].weight[3] = torch.tensor([3.0, 1.0, 2.0, 0.0])
    g = m._groups(torch.tensor([[2]]), torch.tensor([[[5, 1, 3, 0]]]))
    assert m.groups == 5 and g.shape == (1, 5, 4)
    tags = torch.tensor([2.0, 1.0, 1.0, 0.0])  # the mean of tags 1 and 3
    assert torch.equal(g[0, 2], tags)
    assert torch.equal(g[0, 3], torch.tensor([2.0, 0.0, 3.0, -4.0]))  # user_id * item_id
    assert torch.equal(g[0, 4], torch.tensor([2.0, 2.0, 3.0, 0.0]))  # user_id * tags
    w = m.group_weights(torch.tensor([[2]]), torch.tensor([[[5, 1, 3, 0]]]))
    assert w.shape == (1, 5) and ((w > 0) & (w < 1)).all()


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**31))
def test_each_candidate_is_scored_alone(n, seed):
    # no cache and no list context: permuting a list permutes its scores, and a candidate scores
    # the same alone
    g = torch.Generator().manual_seed(seed)
    m = _model()
    user = torch.cat([torch.randint(1, 6, (2, 1), generator=g), torch.randint(0, 10, (2, 4), generator=g)], 1)
    items = torch.cat([torch.randint(1, 10, (2, n, 1), generator=g), torch.randint(0, 5, (2, n, 3), generator=g)], 2)
    perm = torch.randperm(n, generator=g)
    with torch.no_grad():
        scores = m(user, items)
        torch.testing.assert_close(m(user, items[:, perm]), scores[:, perm])
        torch.testing.assert_close(m(user, items[:, :1]), scores[:, :1])


def test_cold_round_trips_through_onnxruntime(small_world, tmp_path):
    ds, _ = small_world
    assert_ranker_round_trip(_model(ds.schema.features, ds.schema.history_max), ds, tmp_path)
