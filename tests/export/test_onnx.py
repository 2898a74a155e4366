import torch

from cascade.towers.dssm import DSSM
from cascade.towers.embedding import Embeddings
from tests.export.roundtrip import assert_towers_round_trip


def test_dssm_towers_round_trip_through_onnxruntime(small_world, tmp_path):
    ds, _ = small_world
    spec = ds.schema.features
    torch.manual_seed(0)
    model = DSSM(spec.side("user"), spec.side("item"), Embeddings(spec, 8), history_len=ds.schema.history_max, hidden=(32, 16))
    assert_towers_round_trip(model, ds, tmp_path)
