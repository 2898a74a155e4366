import numpy as np
import torch

from cascade.towers.embedding import Embeddings
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


def test_split_first_attention_layer_equals_the_concatenated_one():
    # W [q; k; q - k; q * k] + c computed on the concatenation, as the paper writes it
    m = _din()
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    qq, kk = q.unsqueeze(2).expand(2, 3, 5, 8), k.unsqueeze(1).expand(2, 3, 5, 8)
    want = m.attention(torch.cat([qq, kk, qq - kk, qq * kk], dim=-1)).squeeze(-1)
    table = m.embeddings.tables["item_id"]
    with torch.no_grad():
        table.weight[1:4] = q[0]  # target ids 1..3 embed as q[0]
        table.weight[4:9] = k[0]  # history ids 4..8 embed as k[0]
    pooled = m.attend(torch.tensor([[4, 5, 6, 7, 8]]), torch.tensor([[1, 2, 3]]))
    torch.testing.assert_close(pooled, torch.einsum("nl,le->ne", want[0], k[0]).unsqueeze(0))


def test_mean_pooling_is_the_same_history_vector_for_every_candidate():
    # the control without the interaction: the pooled history is the plain mean of the real
    # history items' embeddings, whatever the target, and padding is left out
    torch.manual_seed(0)
    m = DIN(SPEC.side("user"), SPEC.side("item"), Embeddings(SPEC, 8), history_len=4, attention_hidden=(16, 8), hidden=(16, 8), pooling="mean").eval()
    history, targets = torch.tensor([[3, 5, 0, 0]]), torch.tensor([[1, 2, 4]])
    pooled = m.attend(history, targets)  # (1, 3, 8)
    table = m.embeddings.tables["item_id"].weight
    want = (table[3] + table[5]) / 2
    for n in range(3):
        torch.testing.assert_close(pooled[0, n], want)
    att = _din().attend(history, targets)
    assert not torch.allclose(att[0, 0], att[0, 1])  # attention pools differently per target


def test_an_unknown_pooling_is_refused():
    import pytest

    with pytest.raises(ValueError, match="pooling: 'max' is not one of attention, mean"):
        DIN(SPEC.side("user"), SPEC.side("item"), Embeddings(SPEC, 8), history_len=4, pooling="max")


def test_din_with_history_fields_round_trips_through_onnxruntime(small_world, tmp_path):
    from cascade.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
    from cascade.models import history_fields

    ds, _ = small_world
    fields = history_fields(ExperimentConfig("din", DataConfig(), ModelConfig(name="din", history_fields=("category", "pop_band")), TrainConfig()), ds)
    # each item id's category, as the items table gives it
    np.testing.assert_array_equal(fields["category"][ds.items["item_id"]], ds.items["category"])
    spec = ds.schema.features
    torch.manual_seed(0)
    m = DIN(spec.side("user"), spec.side("item"), Embeddings(spec, 8, fields), history_len=ds.schema.history_max, attention_hidden=(16, 8), hidden=(16, 8)).eval()
    assert_ranker_round_trip(m, ds, tmp_path)


def test_history_fields_must_be_single_valued_item_fields(small_world):
    import pytest

    from cascade.config import ConfigError, DataConfig, ExperimentConfig, ModelConfig, TrainConfig
    from cascade.models import history_fields

    ds, _ = small_world
    for bad in ("tags", "segment", "item_id"):  # multi-valued, a user field, the id itself
        with pytest.raises(ConfigError, match=f"model.history_fields: '{bad}' is not a single-valued field of the items table \\(have: category, pop_band\\)"):
            history_fields(ExperimentConfig("din", DataConfig(), ModelConfig(name="din", history_fields=(bad,)), TrainConfig()), ds)
