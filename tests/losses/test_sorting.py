import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade.losses.sorting import hard_sort, neural_sort, top_k_indicator


def test_neural_sort_hand_worked():
    # s = (1, 3, 2), n = 3, tau = 1. A_s 1 = (|1-3|+|1-2|, |3-1|+|3-2|, |2-1|+|2-3|) = (3, 3, 2).
    # row 0 (scale n-1-0 = 2): 2s - A1 = (-1, 3, 2) -> softmax (0.01321, 0.72140, 0.26539)
    # row 1 (scale 0): -A1 = (-3, -3, -2) -> (0.21194, 0.21194, 0.57612)
    # row 2 (scale -2): -2s - A1 = (-5, -9, -6) -> (0.72140, 0.01321, 0.26539)
    p = neural_sort(torch.tensor([[1.0, 3.0, 2.0]]), torch.ones(1, 3, dtype=torch.bool), tau=1.0)
    expected = torch.tensor([[0.01321, 0.72140, 0.26539], [0.21194, 0.21194, 0.57612], [0.72140, 0.01321, 0.26539]])
    torch.testing.assert_close(p[0], expected, atol=1e-5, rtol=0)


def test_neural_sort_leaves_padding_out_and_puts_it_last():
    # the same valid list with a padded item (score 99) at index 1: the valid block is unchanged
    # (the 99 enters no |s_j - s_k| sum) and the padded item takes the last row with certainty
    p = neural_sort(torch.tensor([[1.0, 99.0, 3.0, 2.0]]), torch.tensor([[True, False, True, True]]), tau=1.0)[0]
    alone = neural_sort(torch.tensor([[1.0, 3.0, 2.0]]), torch.ones(1, 3, dtype=torch.bool), tau=1.0)[0]
    torch.testing.assert_close(p[:3][:, [0, 2, 3]], alone)
    assert p[:3, 1].abs().max() == 0
    torch.testing.assert_close(p[3], torch.tensor([0.0, 1.0, 0.0, 0.0]))


lists = st.integers(2, 8).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=n, max_size=n),
        st.lists(st.booleans(), min_size=n, max_size=n),
    )
)


@settings(max_examples=60, deadline=None)
@given(lists, st.floats(0.01, 100))
def test_neural_sort_rows_sum_to_one(case, tau):
    scores, valid = case
    p = neural_sort(torch.tensor([scores], dtype=torch.float64), torch.tensor([valid]), tau)
    torch.testing.assert_close(p.sum(2), torch.ones(1, len(scores), dtype=torch.float64))
    assert (p >= 0).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-50, 50), min_size=2, max_size=8, unique=True), st.lists(st.booleans(), min_size=8, max_size=8))
def test_neural_sort_tends_to_the_hard_sort(ints, valid):
    # distinct scores at least 1 apart: with tau = 1e-3 every soft row is one-hot to 1e-6
    valid = torch.tensor([valid[: len(ints)]])
    scores = torch.tensor([ints], dtype=torch.float64)
    torch.testing.assert_close(neural_sort(scores, valid, 1e-3), hard_sort(scores, valid), atol=1e-6, rtol=0)


@settings(max_examples=40, deadline=None)
@given(lists, st.randoms(use_true_random=False))
def test_neural_sort_permuting_candidates_permutes_columns(case, rnd):
    scores, valid = case
    valid[0] = True
    perm = list(range(len(scores)))
    rnd.shuffle(perm)
    s, m = torch.tensor([scores], dtype=torch.float64), torch.tensor([valid])
    p = neural_sort(s, m, 1.0)[0]
    q = neural_sort(s[:, perm], m[:, perm], 1.0)[0]
    n_valid = int(m.sum())
    # valid rows: column j of the permuted list is column perm[j] of the original
    torch.testing.assert_close(q[:n_valid], p[:n_valid][:, perm])


def test_hard_sort_ties_go_to_the_lower_index_and_top_k():
    values = torch.tensor([[2.0, 5.0, 2.0, 7.0, 9.0]])
    mask = torch.tensor([[True, True, True, True, False]])  # the 9 is padding
    order = hard_sort(values, mask)[0].argmax(1).tolist()
    assert order == [3, 1, 0, 2, 4]
    assert top_k_indicator(values, mask, 3).tolist() == [[1.0, 1.0, 0.0, 1.0, 0.0]]
    # a per-list k, and a k longer than the list marks every valid item
    two = torch.cat([values, values])
    assert top_k_indicator(two, torch.cat([mask, mask]), torch.tensor([1, 10])).tolist() == [[0, 0, 0, 1, 0], [1, 1, 1, 1, 0]]
