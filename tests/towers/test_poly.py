import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade.towers.embedding import Embeddings
from cascade.towers.poly import MVKE, PolyEncoder
from tests.export.roundtrip import assert_towers_round_trip
from tests.towers.test_embedding import SPEC


def _model(cls, spec=SPEC, history_len=4, **kw):
    torch.manual_seed(0)
    return cls(spec.side("user"), spec.side("item"), Embeddings(spec, 8), history_len=history_len, hidden=(16, 6), dropout=0.0, **kw).eval()


def test_poly_score_hand_worked():
    # user vectors (1, 0) and (0, 1), item (2, 0): <y, v> = (2, 0), w = softmax = (0.880797, 0.119203);
    # <w1 y1 + w2 y2, v> = 0.880797 x 2 = 1.761594
    m = _model(PolyEncoder)
    u = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    v = torch.tensor([[[[2.0, 0.0]]]])
    assert m.score(u, v).item() == pytest.approx(1.761594, abs=1e-6)


def test_poly_codes_attend_only_over_real_context():
    m = _model(PolyEncoder, codes=3)
    # the same user with history (3) and with (3) padded differently: the same vectors; no history at all: finite
    a = m.user(torch.tensor([[1, 3, 0, 0, 0]]))
    b = m.user(torch.tensor([[1, 0, 3, 0, 0]]))
    torch.testing.assert_close(a, b)
    assert a.shape == (1, 3, 6) and torch.isfinite(m.user(torch.tensor([[1, 0, 0, 0, 0]]))).all()


def test_mvke_score_hand_worked():
    # experts u1 = (1, 0), u2 = (0, 2); item (3, 1) gated (0.25, 0.75): 0.25 x 3 + 0.75 x 2 = 2.25
    m = _model(MVKE, kernels=2)
    u = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    v = torch.tensor([[[[3.0, 1.0], [0.25, 0.75]]]])
    assert m.score(u, v).item() == pytest.approx(2.25)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(1, 20), st.integers(0, 2**31))
def test_mvke_item_gate_is_a_distribution_over_the_kernels(kernels, b, seed):
    m = _model(MVKE, kernels=kernels)
    g = torch.Generator().manual_seed(seed)
    items = torch.cat([torch.randint(0, 10, (b, 1), generator=g), torch.randint(0, 5, (b, 3), generator=g)], 1)
    with torch.no_grad():
        row = m.item(items)[:, 1]
    assert torch.allclose(row[:, :kernels].sum(1), torch.ones(b)) and (row[:, :kernels] > 0).all() and not row[:, kernels:].any()
    assert m.user.kernels is m.item.kernels is m.kernels  # one set of kernels for both sides


def test_mvke_refuses_more_kernels_than_the_gate_row_holds():
    with pytest.raises(ValueError, match="kernels must be from 1 to hidden"):
        _model(MVKE, kernels=7)


@pytest.mark.parametrize("cls", [PolyEncoder, MVKE])
def test_towers_round_trip_through_onnxruntime(cls, small_world, tmp_path):
    ds, _ = small_world
    assert_towers_round_trip(_model(cls, ds.schema.features, ds.schema.history_max), ds, tmp_path)
