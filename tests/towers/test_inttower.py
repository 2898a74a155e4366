import torch

from cascade.towers.base import maxsim_score
from cascade.towers.embedding import Embeddings
from cascade.towers.inttower import IntTower, LightSE
from tests.export.roundtrip import assert_towers_round_trip
from tests.towers.test_embedding import SPEC


def _model(spec=SPEC, history_len=4):
    torch.manual_seed(0)
    return IntTower(spec.side("user"), spec.side("item"), Embeddings(spec, 8), history_len=history_len, hidden=(16, 12, 8), heads=3, head_dim=5, dropout=0.0).eval()


def test_light_se_hand_worked():
    se = LightSE(2)
    with torch.no_grad():
        se.weight.weight.zero_()  # a = softmax(0, 0) = (1/2, 1/2): every field scaled by 1.5
    e = torch.tensor([[[1.0, 3.0], [2.0, -2.0]]])
    torch.testing.assert_close(se(e), 1.5 * e)


def test_user_heads_on_every_layer_item_heads_on_the_last():
    m = _model()
    u = m.user(torch.tensor([[1, 2, 3, 0, 0]]))
    v = m.item(torch.tensor([[1, 1, 2, 0]]))
    # user: 3 layers (inputs: embeddings, hidden 16, hidden 12) x 3 heads; item: 3 heads
    assert u.shape == (1, 9, 5) and v.shape == (1, 3, 5)
    assert [h.in_features for h in m.user.heads] == [2 * 8, 16, 12]
    assert [h.in_features for h in m.item.heads] == [8]


def test_score_is_maxsim_plus_bias():
    m = _model()
    with torch.no_grad():
        m.bias.fill_(0.25)
    user, items = torch.tensor([[1, 2, 3, 0, 0]]), torch.tensor([[[1, 1, 2, 0], [3, 4, 0, 0]]])
    u, v = m.user(user), m.item(items.reshape(2, 4)).reshape(1, 2, 3, 5)
    torch.testing.assert_close(m(user, items), maxsim_score(u, v) + 0.25)


def test_inttower_towers_round_trip_through_onnxruntime(small_world, tmp_path):
    ds, _ = small_world
    assert_towers_round_trip(_model(ds.schema.features, ds.schema.history_max), ds, tmp_path)


def test_initial_scores_start_near_zero_at_the_published_size():
    # 8 user fields + history, 32 heads x 64 on 3 user layers: default-initialised heads start
    # the summed MaxSim near +-100 and the sigmoid saturates (seen: train loss 2.67, AUC 0.37).
    from cascade.features import Field, FeatureSpec

    spec = FeatureSpec(tuple(Field(f"u{i}", "user", 50) for i in range(8)) + (Field("item_id", "item", 50), Field("genre", "item", 9)))
    torch.manual_seed(0)
    m = IntTower(spec.side("user"), spec.side("item"), Embeddings(spec, 32), history_len=10, hidden=(300, 300, 128), heads=32, head_dim=64)
    user = torch.randint(1, 50, (256, 18))
    items = torch.randint(1, 9, (256, 1, 2))
    assert m(user, items).abs().max() < 1.0


def test_cir_hand_worked_and_off_by_default():
    from cascade.losses.inttower import contrastive_interaction

    # two positive pairs whose normalised vectors are (1, 0) and (0, 1); the negative pair is ignored
    user = torch.tensor([[2.0, 0.0], [0.0, 3.0], [5.0, 5.0]])
    item = torch.tensor([[1.0, 0.0], [0.0, 0.5], [1.0, 1.0]])
    labels = torch.tensor([1.0, 1.0, 0.0])
    # logits = [[1, 0], [0, 1]] / 0.5 = [[2, 0], [0, 2]]; CE per row = log(1 + e^-2) = 0.126928
    assert abs(contrastive_interaction(user, item, labels, 0.5).item() - 0.126928) < 1e-6
    assert contrastive_interaction(user[:1], item[:1], labels[:1], 0.5).item() == 0.0  # one positive: nothing to contrast
    assert _model().cir_weight == 0.0


def test_cir_step_adds_the_regulariser_to_bce():
    from cascade.losses.pointwise import bce
    from cascade.tasks.pointwise import pointwise_step
    from cascade.train import Tensors

    torch.manual_seed(0)
    m = IntTower(SPEC.side("user"), SPEC.side("item"), Embeddings(SPEC, 8), history_len=4, hidden=(16, 12, 8), heads=3, head_dim=5, dropout=0.0, cir_weight=0.5).eval()
    batch = Tensors(user=torch.randint(0, 5, (6, 5)), items=torch.randint(0, 5, (6, 1, 4)), label=torch.tensor([[1.0], [1.0], [0.0], [1.0], [0.0], [0.0]]), mask=torch.ones(6, 1, dtype=torch.bool))
    with_cir, plain = pointwise_step(m, batch), bce(m(batch.user, batch.items), batch.label, batch.mask)
    m.cir_weight = 0.0
    assert pointwise_step(m, batch).item() == plain.item()
    assert with_cir.item() > plain.item()  # CIR is a cross-entropy over 3 positives: > 0


def test_training_through_layer_score_gets_the_gradients_of_the_concatenated_score():
    torch.manual_seed(3)
    m = _model()
    for head in m.user.heads:  # the default tiny heads tie many maxima at init; ties split gradients either way
        torch.nn.init.normal_(head.weight)
    user, items = torch.tensor([[1, 2, 3, 0, 0], [2, 4, 0, 0, 0]]), torch.tensor([[[1, 1, 2, 0], [3, 4, 0, 0]], [[2, 1, 1, 0], [1, 3, 0, 0]]])
    grads = []
    for forward in (m.forward, lambda u, i: m.score(m.user(u), m.item(i.reshape(4, 4)).reshape(2, 2, 3, 5))):
        m.zero_grad()
        forward(user, items).pow(2).sum().backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("user.heads.2") for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], msg=k)
