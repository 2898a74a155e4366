import torch

from cascade.data.lists import build_lists
from cascade.towers.embedding import Embeddings, pack_items, pack_user
from teachers.din import DIN
from tests.export.roundtrip import assert_ranker_round_trip
from tests.towers.test_embedding import SPEC


def _din(spec=SPEC, history_len=4):
    torch.manual_seed(0)
    return DIN(spec.side("user"), spec.side("item"), Embeddings(spec, 8), history_len=history_len, attention_hidden=(16, 8), hidden=(16, 8)).eval()


def test_padded_history_positions_never_change_the_output():
    m = _din()
    user = torch.tensor([[1, 3, 4, 0, 0], [2, 5, 0, 0, 0]])
    items = torch.tensor([[[1, 1, 2, 0], [6, 3, 0, 0]], [[7, 0, 0, 0], [2, 4, 4, 1]]])
    before = m(user, items)
    with torch.no_grad():  # were padding read anywhere, a non-zero padding row would show it
        m.embeddings.tables["item_id"].weight[0] = torch.randn(8) * 10
    after = m(user, items)
    # item_id 0 only appears as history padding here, so nothing may move
    torch.testing.assert_close(after, before)


def test_the_target_and_history_interact():
    m = _din()
    items = torch.tensor([[[3, 1, 0, 0]]])
    a = m(torch.tensor([[1, 3, 0, 0, 0]]), items)
    b = m(torch.tensor([[1, 5, 0, 0, 0]]), items)
    assert not torch.allclose(a, b)  # a different history changes the score of the same target


def test_din_round_trips_through_onnxruntime(small_world, tmp_path):
    ds, _ = small_world
    assert_ranker_round_trip(_din(ds.schema.features, ds.schema.history_max), ds, tmp_path)
