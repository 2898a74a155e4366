import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade.losses.tarq import code_kl, reconstruction, rq_codebook, squared_distance

ONE = torch.ones(1, 1, dtype=torch.bool)


def test_code_kl_hand_worked():
    # 1-D, codewords 0 and 1. The item residual 0: distances (0, 1), p = softmax(0, -1) =
    # (0.731059, 0.268941). The attention residual 1 against attended codewords (0, 1):
    # distances (1, 0), pbar = (0.268941, 0.731059). KL(p || pbar) = (0.731059 - 0.268941) ln(e) =
    # 0.462117, the same backwards: 0.924234
    book = torch.tensor([[0.0], [1.0]])
    got = code_kl(torch.zeros(1, 1, 1), book, torch.ones(1, 1, 1), book[None], ONE)
    assert got.item() == pytest.approx(2 * (0.731059 - 0.268941), abs=1e-5)


def test_code_kl_is_zero_when_both_sides_fall_alike_and_blind_to_padding():
    g = torch.Generator().manual_seed(0)
    r, book = torch.randn(2, 3, 4, generator=g), torch.randn(5, 4, generator=g)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert code_kl(r, book, r, book.expand(2, 5, 4), mask).item() == pytest.approx(0.0, abs=1e-6)
    # a padded candidate far from everything changes nothing
    far = torch.cat([r, torch.full((2, 1, 4), 50.0)], 1)
    padded = torch.cat([mask, torch.zeros(2, 1, dtype=torch.bool)], 1)
    other = torch.randn(2, 5, 4, generator=g)
    assert code_kl(far, book, far.flip(2), other, padded).item() == pytest.approx(code_kl(r, book, r.flip(2), other, mask).item(), rel=1e-5)


def test_reconstruction_and_codebook_terms_hand_worked():
    # half the squared distance: 0.5 (1 + 4) = 2.5; the target gets no gradient
    target = torch.zeros(1, 1, 2, requires_grad=True)
    rebuilt = torch.tensor([[[1.0, 2.0]]], requires_grad=True)
    loss = reconstruction(rebuilt, target, ONE)
    assert loss.item() == pytest.approx(2.5)
    loss.backward()
    assert target.grad is None and torch.equal(rebuilt.grad, torch.tensor([[[1.0, 2.0]]]))
    # residual (1, 0), codeword (0, 0): ||.||^2 = 1 for the codeword, 0.25 x 1 commitment
    r, c = torch.tensor([[[1.0, 0.0]]], requires_grad=True), torch.zeros(1, 1, 2, requires_grad=True)
    total = rq_codebook([r], [c], ONE, 0.25)
    assert total.item() == pytest.approx(1.25)
    total.backward()
    # d/dc ||sg(r) - c||^2 = 2 (c - r) = (-2, 0); d/dr 0.25 ||r - sg(c)||^2 = 0.5 (r - c) = (0.5, 0)
    assert torch.allclose(c.grad, torch.tensor([[[-2.0, 0.0]]])) and torch.allclose(r.grad, torch.tensor([[[0.5, 0.0]]]))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 6), st.integers(1, 8), st.booleans(), st.integers(0, 2**31))
def test_squared_distance_is_the_brute_force_one(b, n, k, e, per_row, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, n, e, generator=g, dtype=torch.float64)
    books = torch.randn(b, k, e, generator=g, dtype=torch.float64) if per_row else torch.randn(k, e, generator=g, dtype=torch.float64)
    want = (a.unsqueeze(2) - (books.unsqueeze(1) if per_row else books)).square().sum(-1)
    got = squared_distance(a, books)
    assert got.shape == (b, n, k) and torch.allclose(got, want, atol=1e-9) and (got >= 0).all()
