import torch

from cascade.losses.pointwise import bce
from cascade.tasks.pointwise import pointwise_step
from cascade.towers.dat import DAT
from cascade.towers.embedding import Embeddings
from cascade.train import Tensors
from tests.export.roundtrip import assert_towers_round_trip
from tests.towers.test_embedding import SPEC


def _model(spec=SPEC, history_len=4):
    torch.manual_seed(0)
    return DAT(spec.side("user"), spec.side("item"), Embeddings(spec, 8), history_len=history_len, hidden=(16, 8), dropout=0.0, mimic_weight=1.0)


def test_mimic_loss_reaches_only_the_augmented_vectors():
    m = _model().train()
    batch = Tensors(user=torch.tensor([[1, 2, 3, 0, 0], [2, 4, 0, 0, 0]]), items=torch.tensor([[[1, 1, 2, 0]], [[3, 4, 0, 0]]]), label=torch.tensor([[1.0], [1.0]]), mask=torch.ones(2, 1, dtype=torch.bool))
    trained = [(name, p) for name, p in m.named_parameters() if p.requires_grad]  # not the biases BatchNorm cancels
    bce_only = torch.autograd.grad(bce(m(batch.user, batch.items), batch.label, batch.mask), [p for _, p in trained], allow_unused=True)
    both = torch.autograd.grad(pointwise_step(m, batch), [p for _, p in trained], allow_unused=True)
    for (name, _), g1, g2 in zip(trained, bce_only, both):
        g1 = torch.zeros(1) if g1 is None else g1
        g2 = torch.zeros(1) if g2 is None else g2
        if ".augment." in name:
            assert not torch.allclose(g1, g2), name  # the mimic term moves the augmented vectors
        else:
            torch.testing.assert_close(g1, g2, msg=name)  # and nothing else


def test_dat_towers_round_trip_through_onnxruntime(small_world, tmp_path):
    ds, _ = small_world
    assert_towers_round_trip(_model(ds.schema.features, ds.schema.history_max), ds, tmp_path)
