"""The ONNX round trip every exported module must pass."""

import numpy as np
import torch

from cascade.data.lists import build_lists
from cascade.towers.embedding import pack_items, pack_user
from export.onnx import export_tower, session


def assert_parity(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert np.all(np.abs(got - want) <= 1e-5 * np.maximum(1.0, np.abs(want)))


def assert_towers_round_trip(model, ds, tmp_path, max_items: int = 300) -> None:
    """Export both towers at batch 3, run them in onnxruntime on a whole test split (a batch
    size the export never saw) and compare with torch."""
    model.eval()
    lists = build_lists(ds, "test")
    user = torch.from_numpy(pack_user(lists, model.user_slots))
    items = torch.from_numpy(pack_items(lists, model.item_slots))
    items = items.reshape(-1, items.shape[-1])[:max_items]
    for name, tower, x in (("user", model.user, user), ("item", model.item, items)):
        got = session(export_tower(tower, x[:3], tmp_path / f"{name}.onnx")).run(None, {"x": x.numpy()})[0]
        assert_parity(got, tower(x).detach().numpy())
