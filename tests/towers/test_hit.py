import torch

from cascade.losses.pointwise import bce
from cascade.tasks.pointwise import pointwise_step
from cascade.towers.embedding import Embeddings
from cascade.towers.hit import HIT
from cascade.train import Tensors
from tests.export.roundtrip import assert_towers_round_trip
from tests.towers.test_embedding import SPEC


def _model(spec=SPEC, history_len=4):
    torch.manual_seed(0)
    return HIT(spec.side("user"), spec.side("item"), Embeddings(spec, 8), history_len=history_len, hidden=(16, 8), heads=2, head_dim=4, dropout=0.0, generation_weight=1.0)


def _grads(model, loss):
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # not the biases BatchNorm cancels
    grads = torch.autograd.grad(loss, [p for _, p in trained], allow_unused=True)
    return {name: (torch.zeros(1) if g is None else g) for (name, _), g in zip(trained, grads)}


def test_generators_learn_only_from_generation_and_the_tower_never_from_it():
    m = _model().train()
    batch = Tensors(user=torch.tensor([[1, 2, 3, 0, 0], [2, 4, 0, 0, 0]]), items=torch.tensor([[[1, 1, 2, 0]], [[3, 4, 0, 0]]]), label=torch.tensor([[1.0], [0.0]]), mask=torch.ones(2, 1, dtype=torch.bool))
    bce_only, both = _grads(m, bce(m(batch.user, batch.items), batch.label, batch.mask)), _grads(m, pointwise_step(m, batch))
    for name in bce_only:
        if "generator" in name:
            assert bce_only[name].abs().sum() == 0, name  # output cut: the tower cannot train it
            assert both[name].abs().sum() > 0, name
        else:
            torch.testing.assert_close(bce_only[name], both[name], msg=name)  # inputs and partner cut


def test_generator_fields_default_to_the_non_id_fields():
    m = _model()
    assert [s.name for s in m.user.generator_slots] == ["user_id"]  # the only user field here
    assert [s.name for s in m.item.generator_slots] == ["tags"]


def test_hit_towers_round_trip_through_onnxruntime(small_world, tmp_path):
    ds, _ = small_world
    assert_towers_round_trip(_model(ds.schema.features, ds.schema.history_max), ds, tmp_path)
