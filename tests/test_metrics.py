import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.stats import kendalltau
from sklearn.metrics import roc_auc_score

from cascade import metrics as M

# ---------------------------------------------------------------------------- hand-worked values


def test_auc_hand_worked_with_tie():
    # pos 0.9 vs neg 0.9: tie, 1/2;  pos 0.9 vs neg 0.1: 1;  pos 0.5 vs neg 0.9: 0;
    # pos 0.5 vs neg 0.1: 1.  (0.5 + 1 + 0 + 1) / 4 = 0.625
    assert M.auc([1, 0, 1, 0], [0.9, 0.9, 0.5, 0.1]) == pytest.approx(0.625)


def test_auc_single_class_is_nan():
    assert math.isnan(M.auc([1, 1], [0.2, 0.3]))


def test_auc_rejects_nan_scores():
    with pytest.raises(ValueError, match="NaN"):
        M.auc([1, 0], [0.2, float("nan")])


def test_gauc_hand_worked():
    # group A: pos 0.8 > neg 0.2 -> AUC 1 (2 impressions, 1 positive)
    # group B: pos 0.1 vs negs 0.5 (0) and 0.1 (tie, 1/2) -> 0.25 (3 impressions, 1 positive)
    # group C: positives only -> dropped
    labels = [1, 0, 1, 0, 0, 1, 1]
    scores = [0.8, 0.2, 0.1, 0.5, 0.1, 0.3, 0.4]
    groups = ["A", "A", "B", "B", "B", "C", "C"]
    # impressions: (2 * 1 + 3 * 0.25) / 5 = 0.55 ; positives and uniform: (1 + 0.25) / 2 = 0.625
    assert M.gauc(labels, scores, groups, "impressions") == pytest.approx((0.55, 1))
    assert M.gauc(labels, scores, groups, "positives") == pytest.approx((0.625, 1))
    assert M.gauc(labels, scores, groups, "uniform") == pytest.approx((0.625, 1))


def test_gauc_rejects_unknown_weighting():
    with pytest.raises(ValueError, match="weighting"):
        M.gauc([1, 0], [1, 0], [1, 1], "clicks")


def test_logloss_hand_worked():
    # -(ln 0.8 + ln 0.6) / 2 = (0.223144 + 0.510826) / 2 = 0.366985
    assert M.logloss([1, 0], [0.8, 0.4]) == pytest.approx(0.366985, abs=1e-6)


def test_recall_and_hit_rate_with_a_tie_at_the_cut():
    scores = np.array([[3.0, 2.0, 2.0, 2.0, 1.0]])
    rel = np.array([[0, 1, 0, 0, 1]])
    # k = 2: item 0 is in; one place is left for the 3 tied items, each gets it with p = 1/3.
    # Positive item 1 earns 1/3, positive item 4 earns 0 -> recall (1/3) / 2 = 1/6.
    assert M.recall_at_k(scores, rel, 2) == pytest.approx(1 / 6)
    # hit: one of three tied items, one positive among them -> 1/3.
    assert M.hit_rate_at_k(scores, rel, 2) == pytest.approx(1 / 3)
    # k = 3: two places among three tied, miss = C(2,2)/C(3,2) = 1/3 -> hit 2/3.
    assert M.hit_rate_at_k(scores, rel, 3) == pytest.approx(2 / 3)


def test_ndcg_hand_worked():
    scores = np.array([[3.0, 2.0, 2.0, 1.0]])
    rel = np.array([[1, 0, 1, 1]])
    # item 0 at position 1: discount 1. Items 1, 2 tie over positions 2, 3: mean discount
    # (1/log2 3 + 1/log2 4) / 2 = (0.630930 + 0.5) / 2 = 0.565465, earned by item 2.
    # Item 3 at position 4 is past k = 3. DCG = 1.565465; IDCG = 1 + 0.630930 + 0.5 = 2.130930.
    assert M.ndcg_at_k(scores, rel, 3) == pytest.approx(1.565465 / 2.130930, abs=1e-6)


def test_rows_without_positives_are_left_out():
    scores = np.array([[2.0, 1.0], [2.0, 1.0]])
    rel = np.array([[1, 0], [0, 0]])
    assert M.recall_at_k(scores, rel, 1) == 1.0
    assert M.hit_rate_at_k(scores, rel, 1) == 1.0
    assert M.ndcg_at_k(scores, rel, 1) == 1.0
    assert math.isnan(M.recall_at_k(scores, np.zeros((2, 2)), 1))


def test_teacher_recall_at_k_at_m_hand_worked():
    student = np.array([[4.0, 3.0, 2.0, 1.0]])
    teacher = np.array([[1.0, 4.0, 3.0, 2.0]])
    # teacher top-2 = {1, 2}; student top-2 = {0, 1} -> 1 shared / 2 = 0.5; top-3 adds 2 -> 1.
    assert M.teacher_recall_at_k_at_m(student, teacher, k=2, m=2) == pytest.approx(0.5)
    assert M.teacher_recall_at_k_at_m(student, teacher, k=2, m=3) == pytest.approx(1.0)


def test_kendall_tau_hand_worked():
    # pairs (0,1) concordant, (0,2) concordant, (1,2) discordant -> (2 - 1) / 3
    assert M.kendall_tau(np.array([[1.0, 2.0, 3.0]]), np.array([[1.0, 3.0, 2.0]])) == pytest.approx(1 / 3)
    # student ties pair (0,1): n0 = 3, Ts = 1, Tt = 0, C = 2 -> 2 / sqrt(2 * 3)
    assert M.kendall_tau(np.array([[1.0, 1.0, 2.0]]), np.array([[1.0, 2.0, 3.0]])) == pytest.approx(2 / math.sqrt(6))


def test_teacher_gains_hand_worked():
    # k = 2: best item earns 2; items tied over positions 1, 2 share (1 + 0) / 2; last earns 0.
    np.testing.assert_allclose(M.teacher_gains(np.array([[3.0, 2.0, 2.0, 1.0]]), 2), [[2.0, 0.5, 0.5, 0.0]])


def test_joint_recall_hand_worked():
    recall = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]])  # keeps items 0, 1, 2
    prerank = np.array([[1.0, 3.0, 2.0, 9.0, 9.0]])  # among those keeps item 1; 3, 4 were cut
    truth = np.array([[0, 1, 1, 0, 0]])
    # item 1 survives both, item 2 is cut at pre-rank -> 1 / 2
    assert M.joint_recall([recall, prerank], [3, 1], truth) == pytest.approx(0.5)


def test_joint_recall_counts_the_truth_outside_the_lists():
    # row 0: 1 of its 2 listed positives survives, and 2 more positives were never retrieved:
    # 1 / 4. Row 1: its only positive (item 0) survives, nothing missed: 1 / 1. Row 2 has no
    # positive at all: left out. Mean (0.25 + 1) / 2 = 0.625.
    prerank = np.array([[1.0, 3.0, 2.0], [5.0, 1.0, 0.0], [1.0, 2.0, 3.0]])
    truth = np.array([[0, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert M.joint_recall([prerank], [1], truth, total=np.array([4, 1, 0])) == pytest.approx(0.625)
    with pytest.raises(ValueError, match="smaller than the ground truth"):
        M.joint_recall([prerank], [1], truth, total=np.array([1, 1, 0]))


# ---------------------------------------------------------------------------- references


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 300), st.integers(1, 6))
def test_auc_equals_sklearn_with_ties(seed, n, levels):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = rng.integers(0, levels, n).astype(float)  # few levels: many ties
    if y.min() == y.max():
        assert math.isnan(M.auc(y, s))
    else:
        assert M.auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_gauc_equals_weighted_per_group_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = 200
    y, s, g = rng.integers(0, 2, n), rng.integers(0, 5, n).astype(float), rng.integers(0, 30, n)
    want_num = want_den = 0.0
    dropped = 0
    for grp in np.unique(g):
        sel = g == grp
        if y[sel].min() == y[sel].max():
            dropped += 1
            continue
        want_num += sel.sum() * roc_auc_score(y[sel], s[sel])
        want_den += sel.sum()
    value, n_dropped = M.gauc(y, s, g)
    assert n_dropped == dropped
    assert value == pytest.approx(want_num / want_den, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_kendall_tau_equals_scipy_tau_b(seed):
    rng = np.random.default_rng(seed)
    s, t = rng.integers(0, 4, (1, 12)).astype(float), rng.integers(0, 4, (1, 12)).astype(float)
    want = kendalltau(s[0], t[0], variant="b").statistic
    got = M.kendall_tau(s, t)
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-12)


# ---------------------------------------------------------------------------- properties

small_lists = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**31 - 1))


def _random_lists(r, n, seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, (r, n)).astype(float)  # 3 levels: ties everywhere
    rel = rng.integers(0, 2, (r, n))
    mask = rng.random((r, n)) < 0.8
    return rng, scores, rel, mask


def _hard(scores, rel, mask, k, order_key):
    """Recall, hit and NDCG of one row under one tie-break (order_key breaks ties)."""
    valid = np.flatnonzero(mask)
    ranked = sorted(valid, key=lambda j: (-scores[j], order_key[j]))
    top = ranked[:k]
    pos = rel[valid].sum()
    gains = sum(rel[j] / math.log2(i + 2) for i, j in enumerate(top))
    ideal = sum(1 / math.log2(i + 2) for i in range(min(k, pos)))
    return rel[top].sum() / pos, float(rel[top].sum() > 0), gains / ideal


@settings(max_examples=60, deadline=None)
@given(small_lists, st.integers(1, 6))
def test_tie_credit_is_the_mean_over_every_tie_break(shape, k):
    _, scores, rel, mask = _random_lists(*shape)
    for row in range(scores.shape[0]):
        s, y, m = scores[row], rel[row], mask[row]
        if y[m].sum() == 0:
            continue
        runs = [_hard(s, y, m, k, perm) for perm in itertools.permutations(range(len(s)))]
        want = np.mean(runs, axis=0)
        got = [f(s[None], y[None], k, m[None]) for f in (M.recall_at_k, M.hit_rate_at_k, M.ndcg_at_k)]
        np.testing.assert_allclose(got, want, atol=1e-12)


LIST_METRICS = {
    "recall": lambda s, t, y, m: M.recall_at_k(s, y, 3, m),
    "hit": lambda s, t, y, m: M.hit_rate_at_k(s, y, 3, m),
    "ndcg": lambda s, t, y, m: M.ndcg_at_k(s, y, 3, m),
    "teacher_recall": lambda s, t, y, m: M.teacher_recall_at_k_at_m(s, t, 2, 4, m),
    "tau": lambda s, t, y, m: M.kendall_tau(s, t, m),
    "teacher_ndcg": lambda s, t, y, m: M.teacher_ndcg_at_k(s, t, 3, m),
    "joint": lambda s, t, y, m: M.joint_recall([t, s], [5, 2], y, m),
}


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 8), st.integers(1, 12), st.integers(0, 2**31 - 1), st.sampled_from(sorted(LIST_METRICS)))
def test_list_metrics_bounded_and_invariant_to_order_and_padding(r, n, seed, name):
    rng, s, y, m = _random_lists(r, n, seed)
    t = rng.normal(size=(r, n)).round(1)
    f = LIST_METRICS[name]
    base = f(s, t, y, m)
    assert math.isnan(base) or -1.0 - 1e-12 <= base <= 1.0 + 1e-12
    if name != "tau":
        assert math.isnan(base) or base >= 0.0
    # permuting candidates (independently per row) changes nothing
    perm = np.argsort(rng.random((r, n)), axis=1)
    take = lambda a: np.take_along_axis(a, perm, 1)  # noqa: E731
    permuted = f(take(s), take(t), take(y), take(m))
    # padding with garbage values changes nothing
    pad = lambda a, v: np.concatenate([a, v], axis=1)  # noqa: E731
    junk = rng.normal(size=(r, 3)) * 100
    padded = f(pad(s, junk), pad(t, junk), pad(y, np.ones((r, 3), int)), pad(m, np.zeros((r, 3), bool)))
    for other in (permuted, padded):
        assert (math.isnan(base) and math.isnan(other)) or other == pytest.approx(base, abs=1e-12)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 8), st.integers(1, 12), st.integers(0, 2**31 - 1), st.sampled_from(sorted(LIST_METRICS)), st.data())
def test_list_metrics_over_parts_add_up_to_the_whole(r, n, seed, name, data):
    # an evaluation adds up a split's parts: means over rows weighted by the rows each is defined on
    rng, s, y, m = _random_lists(r, n, seed)
    t = rng.normal(size=(r, n)).round(1)
    f = LIST_METRICS[name]
    cut = data.draw(st.integers(0, r))
    whole = f(s, t, y, m)
    total = M.add_totals({}, {name: f(s[:cut], t[:cut], y[:cut], m[:cut])})
    M.add_totals(total, {name: f(s[cut:], t[cut:], y[cut:], m[cut:])})
    got = M.means(total)[name]
    assert (math.isnan(whole) and math.isnan(got)) or got == pytest.approx(whole, abs=1e-12)
    assert whole.rows == M.add_totals({}, {name: whole})[name][1] <= r


def test_add_totals_takes_sums_and_refuses_a_mean_without_its_rows():
    # (utility got, best) sums: (1 + 2) / (4 + 4) = 0.375; a RowMean of 0.5 over 2 rows then 1.0 over 1: 2 / 3
    total = M.add_totals(M.add_totals({}, {"ratio": (1.0, 4.0), "mean": M.RowMean(0.5, 2)}), {"ratio": (2.0, 4.0), "mean": M.RowMean(1.0, 1)})
    assert M.means(total) == pytest.approx({"ratio": 0.375, "mean": 2 / 3})
    assert math.isnan(M.means(M.add_totals({}, {"none": M.RowMean(float("nan"), 0)}))["none"])
    with pytest.raises(TypeError):
        M.add_totals({}, {"plain": 0.5})


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float64, st.integers(1, 40), elements=st.floats(-5, 5)), st.integers(1, 45))
def test_topk_membership_sums_to_k(scores, k):
    member = M.topk_membership(scores[None], k)
    assert member.sum() == pytest.approx(min(k, len(scores)))
    assert member.min() >= 0.0 and member.max() <= 1.0


def test_perfect_student_scores_one():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(50, 30))
    mask = rng.random((50, 30)) < 0.9
    assert M.teacher_recall_at_k_at_m(t, t, 10, 10, mask) == pytest.approx(1.0)
    assert M.kendall_tau(t, t, mask) == pytest.approx(1.0)
    assert M.teacher_ndcg_at_k(t, t, 10, mask) == pytest.approx(1.0)


def test_retrieval_recall_hand_worked():
    retrieved = np.array([[5, 3, 9], [1, 2, 4], [7, 8, 6]])
    positives = np.array([[3, 4, 0], [0, 0, 0], [6, 7, 8]])
    # row 0: {3} of {3, 4} -> 1/2; row 1 has no positive; row 2: all 3 -> 1; mean 0.75
    assert M.retrieval_recall(retrieved, positives) == pytest.approx(0.75)


# ---------------------------------------------------------------------------- exact at ties


def test_joint_recall_tie_at_an_intermediate_cut_hand_worked():
    # Stage 1 keeps item 0 and one of the tied items 1, 2 (a coin flip). Stage 2 then ranks
    # item 0 against exactly one survivor scoring 1 > 0, so with quota 2 item 0 always passes:
    # 1.0. Letting the whole tie group through would put two competitors above it: 0.0.
    first, second, truth = np.array([[1.0, 0, 0]]), np.array([[0.0, 1, 1]]), np.array([[1, 0, 0]])
    assert M.joint_recall([first, second], [2, 2], truth) == pytest.approx(1.0)
    # Quota 1 at stage 2: the survivor (1 or 2) wins, item 0 never passes; each of items 1 and
    # 2 passes exactly when it survived stage 1: 1/2 each.
    np.testing.assert_allclose(M.survival([first, second], [2, 1], np.ones((1, 3), bool)), [[0.0, 0.5, 0.5]])


def _hard_cascade(scores, quotas, valid, perms):
    """Survivors of one realised cascade: stage j orders the alive items by score, then perms[j]."""
    alive = set(np.flatnonzero(valid))
    for s, q, perm in zip(scores, quotas, perms):
        ranked = sorted(alive, key=lambda i: (-s[i], perm[i]))
        alive = set(ranked[:q])
    return alive


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 5), st.integers(2, 3))
def test_joint_recall_is_the_mean_over_every_tie_break(seed, n, stages):
    if stages == 3:
        n = min(n, 4)  # 24^3 orders
    rng = np.random.default_rng(seed)
    scores = [rng.integers(0, 3, n).astype(float) for _ in range(stages)]  # three levels: many ties
    quotas = sorted(rng.integers(1, n + 1, stages).tolist(), reverse=True)
    valid = rng.random(n) < 0.9
    truth = (rng.random(n) < 0.5) & valid
    if not truth.any():
        truth[np.flatnonzero(valid)[:1]] = True
    if not truth.any():
        return
    perms = list(itertools.permutations(range(n)))
    counts = np.zeros(n)
    outcomes = 0
    for combo in itertools.product(perms, repeat=stages):
        for i in _hard_cascade(scores, quotas, valid, combo):
            counts[i] += 1
        outcomes += 1
    want = counts[truth].sum() / outcomes / truth.sum()
    got = M.joint_recall([s[None] for s in scores], quotas, truth[None].astype(float), valid[None])
    assert got == pytest.approx(want, abs=1e-12)
    np.testing.assert_allclose(M.survival([s[None] for s in scores], quotas, valid[None])[0], counts / outcomes, atol=1e-12)


def test_kendall_tau_counts_equal_infinities_as_a_tie():
    # student ranks items 0, 1 tied (both +inf) above item 2; teacher 2 > 1 > 0.
    # pairs: (0,1) tied in student only; (0,2), (1,2) concordant. C = 2, D = 0, n0 = 3,
    # T_s = 1, T_t = 0: tau_b = 2 / sqrt(2 * 3) = 0.8165 (scipy agrees).
    s, t = np.array([[np.inf, np.inf, 0.0]]), np.array([[2.0, 1.0, 0.0]])
    assert M.kendall_tau(s, t) == pytest.approx(2 / math.sqrt(6))
    assert M.kendall_tau(s, t) == pytest.approx(kendalltau(s[0], t[0]).statistic)


def test_empty_lists_give_nan_for_every_list_metric():
    empty = np.zeros((3, 0))
    for f in (M.recall_at_k, M.hit_rate_at_k, M.ndcg_at_k):
        assert math.isnan(f(empty, empty, 2))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_retrieval_recall_is_the_mean_share_of_each_rows_positive_set_retrieved(data):
    rows, k, p = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    ids = st.integers(-1, 12)  # small ids: repeats and hits are common; -1 and 0 are padding
    retrieved = data.draw(hnp.arrays(np.int64, (rows, k), elements=ids))
    positives = data.draw(hnp.arrays(np.int64, (rows, p), elements=st.integers(0, 12)))
    shares = [len(set(r.tolist()) & (set(q.tolist()) - {0})) / len(set(q.tolist()) - {0}) for r, q in zip(retrieved, positives) if set(q.tolist()) - {0}]
    got = M.retrieval_recall(retrieved, positives)
    assert (math.isnan(got) and not shares) or got == pytest.approx(np.mean(shares))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_in_rows_is_row_wise_membership(data):
    rows = data.draw(st.integers(1, 5))
    values = data.draw(hnp.arrays(np.int64, (rows, data.draw(st.integers(0, 6))), elements=st.integers(-3, 9)))
    sets = data.draw(hnp.arrays(np.int64, (rows, data.draw(st.integers(0, 6))), elements=st.integers(-3, 9)))
    want = np.array([[v in set(q.tolist()) for v in r.tolist()] for r, q in zip(values, sets)], bool).reshape(values.shape)
    np.testing.assert_array_equal(M.in_rows(values, sets), want)


def test_retrieval_recall_counts_a_repeated_positive_once():
    # positives {3, 4} (3 listed twice); 3 retrieved -> 1 / 2, not 2 / 3
    assert M.retrieval_recall(np.array([[3, 5]]), np.array([[3, 3, 4]])) == pytest.approx(0.5)


@pytest.mark.parametrize("k", [0, -1, 2.5])
def test_a_cut_below_one_is_refused(k):
    s, y = np.array([[1.0, 0.0]]), np.array([[1, 0]])
    calls = [
        lambda: M.recall_at_k(s, y, k),
        lambda: M.hit_rate_at_k(s, y, k),
        lambda: M.ndcg_at_k(s, y, k),
        lambda: M.teacher_recall_at_k_at_m(s, s, k, 1),
        lambda: M.teacher_recall_at_k_at_m(s, s, 1, k),
        lambda: M.teacher_ndcg_at_k(s, s, k),
        lambda: M.joint_recall([s, s], [2, k], y),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="positive whole number"):
            call()
