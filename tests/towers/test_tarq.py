import pytest
import torch

from cascade.towers.embedding import Embeddings
from cascade.towers.tarq import TARQ, Codebooks
from tests.export.roundtrip import assert_towers_round_trip
from tests.towers.test_embedding import SPEC

USER = torch.tensor([[1, 2, 3, 0, 0], [2, 5, 6, 7, 1]])  # user_id, then a history of 4
ITEMS = torch.tensor([[[1, 1, 2, 0], [3, 4, 0, 0], [9, 0, 0, 0]], [[2, 3, 0, 0], [5, 1, 1, 1], [0, 0, 0, 0]]])
MASK = torch.tensor([[True, True, True], [True, True, False]])
LABEL = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def _model(spec=SPEC, history_len=4, **kw):
    torch.manual_seed(0)
    params = dict(hidden=(16, 12), levels=2, codes=4, attention_hidden=(8,), dropout=0.0) | kw
    return TARQ(spec.side("user"), spec.side("item"), Embeddings(spec, 8), history_len=history_len, **params)


def test_residual_codes_hand_worked():
    books = Codebooks(2, 2, 1)
    with torch.no_grad():
        books.weight.copy_(torch.tensor([[[0.0], [10.0]], [[0.0], [1.0]]]))
    # 11.2: level 0 takes 10 (residual 1.2), level 1 takes 1; 0.4: 0 (residual 0.4), then 0
    codes, residuals, chosen = books.encode(torch.tensor([[[11.2], [0.4]]]))
    assert codes.tolist() == [[[1, 1], [0, 0]]]
    assert torch.allclose(residuals[1], torch.tensor([[[1.2], [0.4]]])) and torch.allclose(chosen[1], torch.tensor([[[1.0], [0.0]]]))


def test_score_hand_worked():
    # L = 2 levels of K = 2 codes, D = 2. u0 = (1, 0); attended rows (l0k0, l0k1, l1k0, l1k1) =
    # (0,1), (2,0), (0,3), (1,1). The item (1, 2) with codes l0 -> 1, l1 -> 1: rows 1 and 2 + 1 = 3.
    # u0 + (2,0) + (1,1) = (4, 1); dot (1, 2) = 6
    m = _model(hidden=(16, 2), levels=2, codes=2)
    u = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]])
    v = torch.tensor([[[[1.0, 2.0], [1.0, 3.0]]]])
    assert m.score(u, v).item() == pytest.approx(6.0)


def test_item_side_carries_its_codes_and_user_side_every_attended_codeword():
    m = _model().eval()
    v = m.item(ITEMS.reshape(6, 4))
    assert v.shape == (6, 2, 12) and m.user(USER).shape == (2, 1 + 2 * 4, 12)
    _, q = m.item.parts(ITEMS.reshape(6, 4))
    codes, _, _ = m.codebooks.encode(q[None])
    assert torch.equal(v[:, 1, :2], (codes[0] + torch.tensor([0, 4])).float()) and not v[:, 1, 2:].any()


def test_training_path_scores_what_the_towers_score():
    m = _model()
    m.train()
    _, term = m.regularised(USER, ITEMS, LABEL, MASK)  # the first step initialises the codebooks from the batch
    assert bool(m.codebooks.initialised) and term.item() > 0
    m.eval()
    logits, _ = m.regularised(USER, ITEMS, LABEL, MASK)
    torch.testing.assert_close(logits, m(USER, ITEMS))


def test_training_lowers_the_alignment_terms():
    m = _model()
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    terms = []
    for _ in range(60):
        _, term = m.regularised(USER, ITEMS, LABEL, MASK)
        opt.zero_grad()
        term.backward()
        opt.step()
        terms.append(term.item())
    assert sum(terms[-5:]) < 0.5 * sum(terms[:5]), (terms[:5], terms[-5:])


def test_the_alignment_cannot_move_its_own_target():
    # the alignment terms rebuild the target attention branch's output from the attended
    # codewords, through the same attention unit and history; were those trained by it, it could
    # shrink the gap by scaling them up, which scales the target too (two seeds of the frontier
    # ran away to losses of 1e9 and more). With the branch's BCE switched off, the alignment
    # reaches the codebooks and neither the unit nor the embeddings
    m = _model(ta_weight=0.0)
    m.train()
    m.regularised(USER, ITEMS, LABEL, MASK)  # initialises the codebooks
    _, term = m.regularised(USER, ITEMS, LABEL, MASK)
    term.backward()
    assert all(p.grad is None or not p.grad.any() for p in m.user.unit.parameters())
    assert m.codebooks.weight.grad is not None and m.codebooks.weight.grad.abs().sum() > 0
    # the branch's BCE is what trains the unit
    m = _model()
    m.train()
    m.regularised(USER, ITEMS, LABEL, MASK)[1].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.user.unit.parameters())


def test_epoch_stats_hand_worked_and_reset():
    m = _model()
    m._counts = torch.tensor([[3.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # level 0: 2 of 4 codes used, entropy -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335;
    # level 1: 4 of 4, ln 4 = 1.386294. Means: 0.75 and 0.974315
    stats = m.epoch_stats()
    assert stats["codebook_utilisation"] == pytest.approx(0.75) and stats["token_entropy"] == pytest.approx(0.974315, abs=1e-5)
    assert m.epoch_stats() == {}


def test_tarq_needs_a_history_and_room_for_its_codes():
    with pytest.raises(ValueError, match="needs one"):
        _model(history_len=0)
    with pytest.raises(ValueError, match="levels must not exceed"):
        _model(hidden=(16, 2), levels=3)


def test_tarq_towers_round_trip_through_onnxruntime(small_world, tmp_path):
    ds, _ = small_world
    m = _model(ds.schema.features, ds.schema.history_max)
    m.train()
    from cascade.data.lists import build_lists
    from cascade.models import list_tensors

    batch = list_tensors(build_lists(ds, "train").take(slice(0, 16)), m)
    m.regularised(batch.user, batch.items, batch.label, batch.mask)  # codebooks from real items, so items spread over codes
    assert_towers_round_trip(m, ds, tmp_path)
