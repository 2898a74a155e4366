import numpy as np
import torch

from cascade.data.lists import build_lists
from cascade.pipeline import dat_step
from cascade.towers.dat import DAT
from cascade.towers.embedding import Embeddings, pack_items, pack_user
from cascade.train import Tensors
from export.onnx import export_tower, session
from tests.towers.test_embedding import SPEC


def _model(spec=SPEC, history_len=4):
    torch.manual_seed(0)
    return DAT(spec.side("user"), spec.side("item"), Embeddings(spec, 8), history_len=history_len, hidden=(16, 8), dropout=0.0, mimic_weight=1.0)


def test_mimic_loss_reaches_only_the_augmented_vectors():
    m = _model().train()
    batch = Tensors(user=torch.tensor([[1, 2, 3, 0, 0], [2, 4, 0, 0, 0]]), items=torch.tensor([[[1, 1, 2, 0]], [[3, 4, 0, 0]]]), label=torch.tensor([[1.0], [1.0]]), mask=torch.ones(2, 1, dtype=torch.bool))
    from cascade.pipeline import bce_step

    bce_only = torch.autograd.grad(bce_step(m, batch), list(m.parameters()), allow_unused=True)
    both = torch.autograd.grad(dat_step(m, batch), list(m.parameters()), allow_unused=True)
    for (name, _), g1, g2 in zip(m.named_parameters(), bce_only, both):
        g1 = torch.zeros(1) if g1 is None else g1
        g2 = torch.zeros(1) if g2 is None else g2
        if ".augment." in name:
            assert not torch.allclose(g1, g2), name  # the mimic term moves the augmented vectors
        else:
            torch.testing.assert_close(g1, g2, msg=name)  # and nothing else


def test_dat_towers_round_trip_through_onnxruntime(small_world, tmp_path):
    ds, _ = small_world
    m = _model(ds.schema.features, ds.schema.history_max).eval()
    lists = build_lists(ds, "test")
    user = torch.from_numpy(pack_user(lists, m.user_slots))
    items = torch.from_numpy(pack_items(lists, m.item_slots))
    items = items.reshape(-1, items.shape[-1])[:300]
    for tower, x in ((m.user, user), (m.item, items)):
        got = session(export_tower(tower, x[:3], tmp_path / "t.onnx")).run(None, {"x": x.numpy()})[0]
        want = tower(x).detach().numpy()
        assert np.all(np.abs(got - want) <= 1e-5 * np.maximum(1.0, np.abs(want)))
