import numpy as np
import torch

from cascade.data.lists import build_lists
from cascade.towers.dssm import DSSM
from cascade.towers.embedding import Embeddings, pack_items, pack_user
from export.onnx import export_tower, session


def test_dssm_towers_round_trip_through_onnxruntime(small_world, tmp_path):
    ds, _ = small_world
    spec = ds.schema.features
    torch.manual_seed(0)
    model = DSSM(spec.side("user"), spec.side("item"), Embeddings(spec, 8), history_len=ds.schema.history_max, hidden=(32, 16)).eval()
    lists = build_lists(ds, "test")
    user = torch.from_numpy(pack_user(lists, model.user_slots))
    items = torch.from_numpy(pack_items(lists, model.item_slots)).reshape(-1, len(pack_items(lists, model.item_slots)[0, 0]))
    for tower, x in ((model.user, user), (model.item, items)):
        path = export_tower(tower, x[:3], tmp_path / "tower.onnx")
        got = session(path).run(None, {"x": x.numpy()})[0]  # a batch size the export never saw
        want = tower(x).detach().numpy()
        assert got.shape == want.shape
        assert np.all(np.abs(got - want) <= 1e-5 * np.maximum(1.0, np.abs(want)))
