"""Every metric cascade reports, defined once.

Two families:

* flat metrics over one row per sample: ``auc``, ``gauc``, ``logloss``;
* list metrics over padded ``(R, N)`` score matrices with a validity ``mask (R, N)``:
  ``recall_at_k``, ``hit_rate_at_k``, ``ndcg_at_k``, ``teacher_recall_at_k_at_m``,
  ``kendall_tau``, ``teacher_ndcg_at_k``, ``joint_recall``.

Ties are never broken by candidate order. A cut at k that falls inside a group of tied scores
gives each tied item the expected credit over a uniformly random tie-break (``topk_membership``),
so permuting candidates, or adding padding, never changes a result. List metrics return the mean
over the rows where the metric is defined (a row with no positive has no recall) and return NaN
when no row qualifies; that mean is a ``RowMean``, a float that knows its rows, so the means of
parts of a split add up to the whole one (``add_totals``, ``means``): a streamed evaluation adds
its row groups.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal, Sequence

import numpy as np

GaucWeighting = Literal["impressions", "positives", "uniform"]


# --------------------------------------------------------------------------------------------
# flat metrics


def _as_flat(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinity")
    return y, s


def _tied_ranks(order: np.ndarray, same_as_prev: np.ndarray) -> np.ndarray:
    """1-based ranks in ``order`` with tied runs (``same_as_prev``) given their mean rank."""
    n = len(order)
    starts = np.flatnonzero(~same_as_prev)  # first position of each run
    run_id = np.cumsum(~same_as_prev) - 1
    ends = np.append(starts[1:], n)  # one past the last position
    mean_rank = (starts + 1 + ends) / 2.0  # mean of starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = mean_rank[run_id]
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC: P(score of a random positive > a random negative), ties count one half.

    labels (n,) in {0, 1}; scores (n,). NaN when either class is absent.
    """
    y, s = _as_flat(labels, scores)
    pos = y > 0
    n_pos = int(pos.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    same = np.zeros(len(s), dtype=bool)
    same[1:] = s_sorted[1:] == s_sorted[:-1]
    ranks = _tied_ranks(order, same)
    # Mann-Whitney U: rank sum of positives minus its minimum possible value.
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def gauc(
    labels: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    weighting: GaucWeighting = "impressions",
) -> tuple[float, int]:
    """Group AUC: the weighted mean of per-group AUCs.

    Groups holding one class only have no AUC; they are dropped and counted.
    weighting: ``impressions`` (group size), ``positives`` (positives in the group), ``uniform``.
    Returns (value, number of groups dropped); value is NaN when every group is dropped.
    """
    if weighting not in ("impressions", "positives", "uniform"):
        raise ValueError(f"unknown GAUC weighting {weighting!r}")
    y, s = _as_flat(labels, scores)
    g = np.asarray(groups).ravel()
    if g.shape != y.shape:
        raise ValueError(f"groups {g.shape} and labels {y.shape} differ in length")
    if len(y) == 0:
        return float("nan"), 0
    order = np.lexsort((s, g))  # by group, then score
    g_sorted, s_sorted = g[order], s[order]
    same = np.zeros(len(s), dtype=bool)
    same[1:] = (s_sorted[1:] == s_sorted[:-1]) & (g_sorted[1:] == g_sorted[:-1])
    ranks_global = _tied_ranks(order, same)
    _, group_index, group_size = np.unique(g, return_inverse=True, return_counts=True)
    # Ranks are global over the group-sorted order; subtract each group's offset to get
    # within-group ranks.
    offset = np.concatenate(([0], np.cumsum(group_size)[:-1]))
    ranks = ranks_global - offset[group_index]
    pos = y > 0
    n_pos = np.bincount(group_index, weights=pos, minlength=len(group_size))
    n_neg = group_size - n_pos
    rank_sum = np.bincount(group_index, weights=np.where(pos, ranks, 0.0), minlength=len(group_size))
    ok = (n_pos > 0) & (n_neg > 0)
    dropped = int((~ok).sum())
    if not ok.any():
        return float("nan"), dropped
    per_group = (rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    weight = {"impressions": group_size[ok], "positives": n_pos[ok], "uniform": np.ones(ok.sum())}[weighting]
    return float(np.sum(per_group * weight) / np.sum(weight)), dropped


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy; probabilities clipped to [eps, 1 - eps]."""
    y, p = _as_flat(labels, probs)
    if len(y) == 0:
        return float("nan")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


# --------------------------------------------------------------------------------------------
# list metrics: the tie-group machinery


def _check_lists(scores: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be (R, N), got shape {s.shape}")
    m = np.ones(s.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if m.shape != s.shape:
        raise ValueError(f"mask {m.shape} and scores {s.shape} differ in shape")
    if np.isnan(s[m]).any():
        raise ValueError("scores contain NaN at valid positions")
    return s, m


def _tie_groups(scores: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per item: how many valid items score strictly higher (g) and the size of its tie group (e).

    scores, mask (R, N) -> g, e (R, N) int64; padded positions get g = N, e = 1.
    """
    r, n = scores.shape
    if n == 0:
        return np.zeros((r, 0), np.int64), np.ones((r, 0), np.int64)
    # valid items first, by score descending; padded last (NaN sorts after +inf, and a valid
    # score is never NaN). The order within a tie is free: g and e depend on the values alone.
    order = np.argsort(np.where(mask, -scores, np.nan), axis=1)
    s_sorted = np.take_along_axis(scores, order, 1)
    m_sorted = np.take_along_axis(mask, order, 1)
    new_group = np.ones((r, n), dtype=bool)
    new_group[:, 1:] = (s_sorted[:, 1:] != s_sorted[:, :-1]) | ~m_sorted[:, 1:]
    pos = np.broadcast_to(np.arange(n), (r, n))
    start = np.maximum.accumulate(np.where(new_group, pos, 0), axis=1)
    # end (exclusive) of each group: the next group start, scanned from the right.
    next_start = np.where(new_group, pos, n)
    end = np.minimum.accumulate(np.concatenate([next_start[:, 1:], np.full((r, 1), n)], axis=1)[:, ::-1], axis=1)[:, ::-1]
    g_sorted = np.where(m_sorted, start, n)
    e_sorted = np.where(m_sorted, end - start, 1)
    g = np.empty_like(g_sorted)
    e = np.empty_like(e_sorted)
    np.put_along_axis(g, order, g_sorted, 1)
    np.put_along_axis(e, order, e_sorted, 1)
    return g, e


def topk_membership(scores: np.ndarray, k: int | np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Probability that each item is in the top-k under a uniformly random tie-break.

    scores (R, N), k an int or (R,) ints, mask (R, N) -> (R, N) float64 in [0, 1], 0 at padding.
    An item with g valid items strictly above it and e items tied with it (itself included)
    takes one of the positions g+1 .. g+e uniformly, so P(in top-k) = clip((k - g) / e, 0, 1).
    """
    _check_cut("k", k)
    s, m = _check_lists(scores, mask)
    g, e = _tie_groups(s, m)
    kk = np.asarray(k, dtype=np.float64).reshape(-1, 1) if np.ndim(k) else float(k)
    return np.where(m, np.clip((kk - g) / e, 0.0, 1.0), 0.0)


def _check_cut(name: str, k) -> None:
    """A cut is a positive whole number (or (R,) of them): k <= 0 keeps nothing and would give
    values that differ between metrics, so it is refused."""
    if np.any(np.asarray(k) < 1) or not np.all(np.asarray(k) == np.floor(np.asarray(k))):
        raise ValueError(f"{name} must be a positive whole number, got {k!r}")


class RowMean(float):
    """A list metric's value: its mean over the ``rows`` it is defined on; ``per_row`` (R,) the
    value of every row, NaN where it is not defined (what a bootstrap over requests resamples)."""

    rows: int
    per_row: np.ndarray | None

    def __new__(cls, value: float, rows: int, per_row: np.ndarray | None = None) -> "RowMean":
        out = super().__new__(cls, value)
        out.rows = rows
        out.per_row = per_row
        return out


def _row_mean(values: np.ndarray, defined: np.ndarray) -> RowMean:
    rows = int(defined.sum())
    return RowMean(values[defined].mean() if rows else float("nan"), rows, np.where(defined, values, np.nan))


Totals = dict  # key -> [sum, weight]: means kept in parts that add up


def add_totals(total: Totals, part: dict) -> Totals:
    """``total`` with ``part`` added (in place; returned). Each value of ``part`` is a ``RowMean``
    (its mean times its rows) or a (sum, weight) pair (a ratio of sums, e.g. utility got over the
    best); a plain float has no weight and is refused."""
    for key, value in part.items():
        if isinstance(value, RowMean):
            value = (float(value) * value.rows if value.rows else 0.0, value.rows)
        value_sum, weight = value
        into = total.setdefault(key, [0.0, 0.0])
        into[0] += value_sum
        into[1] += weight
    return total


def means(total: Totals) -> dict:
    """Each key's mean: its sum over its weight (NaN over no rows)."""
    return {key: value_sum / weight if weight else float("nan") for key, (value_sum, weight) in total.items()}


def _relevance(relevance: np.ndarray, mask: np.ndarray) -> np.ndarray:
    rel = np.asarray(relevance, dtype=np.float64)
    if rel.shape != mask.shape:
        raise ValueError(f"relevance {rel.shape} and scores {mask.shape} differ in shape")
    if np.any(rel[mask] < 0) or not np.all(np.isfinite(rel[mask])):
        raise ValueError("relevance must be finite and non-negative")
    return np.where(mask, rel, 0.0)


def recall_at_k(scores: np.ndarray, relevance: np.ndarray, k: int, mask: np.ndarray | None = None) -> RowMean:
    """Recall@k = |top-k ∩ positives| / |positives|, mean over rows with a positive.

    relevance (R, N): > 0 marks a positive (binary use) or carries a weight (soft truth, e.g.
    a teacher's top-k membership); recall is then the captured share of the weight.
    """
    s, m = _check_lists(scores, mask)
    rel = _relevance(relevance, m)
    member = topk_membership(s, k, m)
    total = rel.sum(axis=1)
    defined = total > 0
    return _row_mean((member * rel).sum(axis=1) / np.where(defined, total, 1.0), defined)


_LOG_FACTORIALS = np.zeros(1)  # log(i!) for i < len: grown on demand, read by _lchoose


def _lchoose(n: np.ndarray, k: np.ndarray) -> np.ndarray:
    """log C(n, k) for whole numbers 0 <= k <= n (counts of items), from a table of log factorials."""
    global _LOG_FACTORIALS
    n, k = np.asarray(n, np.int64), np.asarray(k, np.int64)
    top = int(n.max(initial=0))
    if top >= len(_LOG_FACTORIALS):
        _LOG_FACTORIALS = np.r_[0.0, np.cumsum(np.log(np.arange(1, 2 * top + 2, dtype=np.float64)))]
    return _LOG_FACTORIALS[n] - _LOG_FACTORIALS[k] - _LOG_FACTORIALS[n - k]


def hit_rate_at_k(scores: np.ndarray, relevance: np.ndarray, k: int, mask: np.ndarray | None = None) -> RowMean:
    """HitRate@k: share of rows (among those with a positive) with at least one positive in the top-k.

    Exact under a random tie-break: a row hits surely when a positive lies wholly above the
    cut; otherwise the tie group straddling the cut fills its ``k - g`` free places from its
    e members, of which p are positive, and misses with probability C(e - p, k - g) / C(e, k - g).
    """
    _check_cut("k", k)
    s, m = _check_lists(scores, mask)
    pos = _relevance(relevance, m) > 0
    if s.shape[1] == 0:
        return float("nan")  # no candidates: no row has a positive
    g, e = _tie_groups(s, m)
    defined = pos.any(axis=1)
    sure = (pos & (g + e <= k)).any(axis=1)
    straddle = m & (g < k) & (g + e > k)  # members of the group cut through by k (one per row)
    p = (pos & straddle).sum(axis=1)
    has = straddle.any(axis=1)
    size = np.where(straddle, e, 0).max(axis=1)
    free = np.where(straddle, k - g, 0).max(axis=1)
    miss = np.ones(len(s))
    rows = np.flatnonzero(has & ~sure & (p > 0))
    if len(rows):
        n_out = size[rows] - p[rows]
        pm = np.zeros(len(rows))
        fits = n_out >= free[rows]
        pm[fits] = np.exp(_lchoose(n_out[fits], free[rows][fits]) - _lchoose(size[rows][fits], free[rows][fits]))
        miss[rows] = pm
    hit = np.where(sure, 1.0, np.where(has & (p > 0), 1.0 - miss, 0.0))
    return _row_mean(hit, defined)


def _discount_cumsum(n: int) -> np.ndarray:
    """D[q] = sum_{t=1..q} 1 / log2(t + 1), with D[0] = 0; shape (n + 1,)."""
    return np.concatenate(([0.0], np.cumsum(1.0 / np.log2(np.arange(2, n + 2)))))


def _expected_dcg(scores: np.ndarray, gains: np.ndarray, k: int, mask: np.ndarray) -> np.ndarray:
    """Expected DCG@k per row over random tie-breaks: an item in positions g+1..g+e earns its
    gain times the mean discount of those positions that lie within k."""
    g, e = _tie_groups(scores, mask)
    d = _discount_cumsum(scores.shape[1])
    hi = np.minimum(g + e, k)
    lo = np.minimum(g, k)
    disc = np.where(mask & (hi > lo), (d[np.clip(hi, 0, len(d) - 1)] - d[np.clip(lo, 0, len(d) - 1)]) / e, 0.0)
    return (gains * disc).sum(axis=1)


def _ideal_dcg(gains: np.ndarray, k: int) -> np.ndarray:
    best = -np.sort(-gains, axis=1)[:, :k]
    return (best / np.log2(np.arange(2, best.shape[1] + 2))).sum(axis=1)


def ndcg_at_k(scores: np.ndarray, relevance: np.ndarray, k: int, mask: np.ndarray | None = None) -> RowMean:
    """NDCG@k with linear gains (gain = relevance), discount 1/log2(1 + position), normalised by
    the ideal DCG@k; mean over rows with a positive."""
    _check_cut("k", k)
    s, m = _check_lists(scores, mask)
    rel = _relevance(relevance, m)
    idcg = _ideal_dcg(rel, k)
    defined = idcg > 0
    return _row_mean(_expected_dcg(s, rel, k, m) / np.where(defined, idcg, 1.0), defined)


# --------------------------------------------------------------------------------------------
# agreement with a teacher


def teacher_recall_at_k_at_m(
    student: np.ndarray, teacher: np.ndarray, k: int, m: int, mask: np.ndarray | None = None
) -> RowMean:
    """Recall@k@m = |top-m(student) ∩ top-k(teacher)| / k over the same list.

    k = how many of the teacher's best are taken as truth, m = how many the student passes on.
    Both top sets take fractional membership on ties (tie-breaks independent); a row with fewer
    than k valid items divides by its valid count, so a perfect student scores 1.
    Mean over rows with at least one valid item.
    """
    _check_cut("k", k)
    _check_cut("m", m)
    s, msk = _check_lists(student, mask)
    t, _ = _check_lists(teacher, msk)
    inter = (topk_membership(s, m, msk) * topk_membership(t, k, msk)).sum(axis=1)
    n_valid = msk.sum(axis=1)
    defined = n_valid > 0
    return _row_mean(inter / np.maximum(np.minimum(n_valid, k), 1), defined)


def _compare(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """sign(x - y) that also holds for equal infinities."""
    return (x > y).astype(np.int8) - (x < y).astype(np.int8)


def kendall_tau(student: np.ndarray, teacher: np.ndarray, mask: np.ndarray | None = None, chunk_cells: int = 2**24) -> RowMean:
    """Kendall tau-b between the student's and the teacher's scores within each list.

    tau_b = (C - D) / sqrt((n0 - T_s)(n0 - T_t)), n0 = pairs, T_* = pairs tied in one ranking.
    Mean over rows where it is defined (two valid items and neither ranking all tied).
    """
    s, msk = _check_lists(student, mask)
    t, _ = _check_lists(teacher, msk)
    r, n = s.shape
    out = np.full(r, np.nan)
    left, right = np.triu_indices(n, 1)  # each pair once
    rows_per_chunk = max(1, chunk_cells // max(1, len(left)))
    for a in range(0, r, rows_per_chunk):
        b = min(r, a + rows_per_chunk)
        # compare rather than subtract: two scores tied at +-inf are a tie, and inf - inf is NaN
        ds = _compare(s[a:b, left], s[a:b, right])
        dt = _compare(t[a:b, left], t[a:b, right])
        pair = msk[a:b, left] & msk[a:b, right]
        n0 = pair.sum(axis=1)
        conc_minus_disc = np.where(pair, ds * dt, 0).sum(axis=1, dtype=np.int64)
        ts = (pair & (ds == 0)).sum(axis=1)
        tt = (pair & (dt == 0)).sum(axis=1)
        den = np.sqrt((n0 - ts).astype(np.float64) * (n0 - tt))
        out[a:b] = np.where(den > 0, conc_minus_disc / np.where(den > 0, den, 1.0), np.nan)
    return _row_mean(out, ~np.isnan(out))


def teacher_gains(teacher: np.ndarray, k: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Graded relevance from a teacher's order: gain = max(0, k - rank), rank 0-based, so the
    teacher's best item earns k and its k-th earns 1; tied items share the mean over their
    positions. (R, N) -> (R, N)."""
    _check_cut("k", k)
    t, msk = _check_lists(teacher, mask)
    g, e = _tie_groups(t, msk)
    # mean of max(0, k - q) for q = g .. g + e - 1: sum of the positive terms over e.
    lo = np.minimum(g, k)
    hi = np.minimum(g + e, k)
    total = (k - lo) * (k - lo + 1) / 2.0 - (k - hi) * (k - hi + 1) / 2.0  # sum_{q=lo}^{hi-1} (k - q)
    return np.where(msk, total / e, 0.0)


def teacher_ndcg_at_k(student: np.ndarray, teacher: np.ndarray, k: int, mask: np.ndarray | None = None) -> RowMean:
    """NDCG@k of the student's order against the teacher's, gains from ``teacher_gains``."""
    s, msk = _check_lists(student, mask)
    return ndcg_at_k(s, teacher_gains(teacher, k, msk), k, msk)


# --------------------------------------------------------------------------------------------
# the whole cascade


def joint_recall(
    stage_scores: Sequence[np.ndarray],
    quotas: Sequence[int],
    truth: np.ndarray,
    mask: np.ndarray | None = None,
    total: np.ndarray | None = None,
) -> RowMean:
    """Share of a ground truth that survives every stage's quota, mean over rows with truth.

    stage_scores: one (R, N) matrix per stage, applied in order; quotas: each stage's top-q.
    Stage j ranks only the items that survived the stages before it. truth (R, N): the real
    positives (end-to-end recall) or a teacher's top-k membership (consistency); the caller says
    which it reports. total (R,): the ground truth's size per row when part of it lies outside
    the lists (the positives a catalog recall stage never retrieved); default: the truth inside
    the lists. Exact under an independent, uniformly random tie-break at every stage
    (``survival``).
    """
    if len(stage_scores) != len(quotas) or not quotas:
        raise ValueError("need one quota per stage and at least one stage")
    first, msk = _check_lists(stage_scores[0], mask)
    rel = _relevance(truth, msk)
    survive = survival([_check_lists(s, msk)[0] for s in stage_scores], quotas, msk)
    if total is None:
        total = rel.sum(axis=1)
    elif np.any(total < rel.sum(axis=1) - 1e-9):
        raise ValueError("total is smaller than the ground truth inside the lists")
    defined = total > 0
    return _row_mean((survive * rel).sum(axis=1) / np.where(defined, total, 1.0), defined)


# Rows whose tie-breaks must be enumerated (a tie cut at two or more stages before the last)
# are refused beyond this many outcomes, rather than estimated.
MAX_TIE_OUTCOMES = 100_000


def survival(stage_scores: Sequence[np.ndarray], quotas: Sequence[int], mask: np.ndarray) -> np.ndarray:
    """P(each item survives every stage) under independent uniform tie-breaks: (R, N) float64.

    Rows with no tie group cut by an intermediate quota are exact in one vectorised pass. In a
    row where a tie group straddles a cut, a uniformly random subset of it (as many as the free
    places) passes on, so the next stage's competition is random: when that next stage is the
    last, each item's membership is averaged over the multivariate hypergeometric law of how
    many of the drawn items score above it and tie with it (``_last_stage_given_draw``);
    otherwise every outcome of the draw is enumerated.
    """
    for q in quotas:
        _check_cut("quota", q)
    alive = mask.copy()
    survive = np.where(mask, 1.0, 0.0)
    straddled = np.zeros(len(mask), dtype=bool)
    for j, (scores, q) in enumerate(zip(stage_scores, quotas)):
        member = topk_membership(scores, q, alive)
        if j < len(quotas) - 1:
            straddled |= ((member > 0) & (member < 1)).any(axis=1)
        survive = survive * member
        alive = member > 0
    for r in np.flatnonzero(straddled):
        none = np.zeros(mask.shape[1], dtype=bool)
        survive[r] = _survive_from(0, [s[r] for s in stage_scores], list(quotas), mask[r], none, 0)
    return survive


def _survive_from(j: int, scores: list[np.ndarray], quotas: list[int], sure: np.ndarray, pool: np.ndarray, draws: int) -> np.ndarray:
    """One row, (N,) each: P(survive stages j..) when the items alive before stage j are
    ``sure`` plus a uniformly random ``draws``-subset of ``pool``."""
    last = j == len(scores) - 1
    if draws and draws < pool.sum():
        if last:
            return _last_stage_given_draw(scores[j], quotas[j], sure, pool, draws)
        members = np.flatnonzero(pool)
        outcomes = math.comb(len(members), draws)
        if outcomes > MAX_TIE_OUTCOMES:
            raise ValueError(f"a tie group of {len(members)} items cut to {draws} at stage {j} is followed by {len(scores) - j} stages: {outcomes:,} tie-break outcomes to enumerate (limit {MAX_TIE_OUTCOMES:,})")
        acc = np.zeros(len(sure))
        for drawn in itertools.combinations(members, draws):
            alive = sure.copy()
            alive[list(drawn)] = True
            acc += _survive_from(j, scores, quotas, alive, np.zeros_like(pool), 0)
        return acc / outcomes
    alive = sure | pool
    member = topk_membership(scores[j][None], quotas[j], alive[None])[0]
    if last:
        return member
    straddle = (member > 0) & (member < 1)
    free = int(round(member[straddle].sum()))  # each of the e tied holds (k - g) / e
    return _survive_from(j + 1, scores, quotas, member == 1, straddle, free)


def _last_stage_given_draw(scores: np.ndarray, q: int, sure: np.ndarray, pool: np.ndarray, draws: int) -> np.ndarray:
    """(N,): P(alive and in the top-q) when the alive set is ``sure`` plus a uniform
    ``draws``-subset of ``pool``. For item x, of the other drawn items h_a score above it and
    h_b tie with it (multivariate hypergeometric over the pool's above / tied / below counts);
    given those, x is in the top-q with probability clip((q - A - h_a) / (B + h_b + 1), 0, 1),
    A and B its sure competitors above and tied."""
    above = scores[None, :] > scores[:, None]  # [x, y]: y scores above x
    tied = (scores[None, :] == scores[:, None]) & ~np.eye(len(scores), dtype=bool)
    in_pool = pool.astype(np.int64)
    sure_above, sure_tied = (above & sure).sum(1), (tied & sure).sum(1)
    a, b = (above & pool).sum(1), (tied & pool).sum(1)  # x itself is neither above nor tied
    others = pool.sum() - in_pool  # the pool without x
    d = draws - in_pool  # x drawn uses one of the draws
    rest = others - a - b
    log_all = _lchoose(others, d)
    expected = np.zeros(len(scores))
    for h_a in range(0, min(int(a.max()), q) + 1):
        for h_b in range(0, int(b.max()) + 1):
            h_rest = d - h_a - h_b
            ok = (h_a <= a) & (h_b <= b) & (h_rest >= 0) & (h_rest <= rest)
            if not ok.any():
                continue
            logp = _lchoose(a, np.minimum(h_a, a)) + _lchoose(b, np.minimum(h_b, b)) + _lchoose(rest, np.clip(h_rest, 0, rest)) - log_all
            share = np.clip((q - sure_above - h_a) / (sure_tied + h_b + 1.0), 0.0, 1.0)
            expected += np.where(ok, np.exp(logp) * share, 0.0)
    p_alive = np.where(pool, draws / max(int(pool.sum()), 1), np.where(sure, 1.0, 0.0))
    return p_alive * expected


def retrieval_recall(retrieved: np.ndarray, positives: np.ndarray) -> RowMean:
    """Recall@k of a retrieval: |retrieved ∩ positives| / |positives|, mean over rows with a
    positive. retrieved (R, k) item ids (ordered or not; k = the cut), positives (R, P) item ids
    with 0 as padding (an id listed twice is one positive). Retrieval returns a set, so no tie rule is needed here."""
    pos = np.sort(np.asarray(positives, dtype=np.int64), axis=1)
    valid = pos > 0
    valid[:, 1:] &= pos[:, 1:] != pos[:, :-1]  # a positive listed twice counts once
    hit = in_rows(pos, np.asarray(retrieved)) & valid
    n = valid.sum(axis=1)
    defined = n > 0
    return _row_mean(hit.sum(axis=1) / np.maximum(n, 1), defined)


def in_rows(values: np.ndarray, sets: np.ndarray) -> np.ndarray:
    """values (R, a), sets (R, b) integer ids -> (R, a) bool: whether each value is in its row of
    ``sets``. Each row's ids are offset into a range of their own, so one sort and a binary search
    answer every row: O(R (a + b)) memory, where comparing every pair takes R a b booleans (2.5e8
    for 20,000 requests' top-250 against histories of 50)."""
    values, sets = np.asarray(values, dtype=np.int64), np.asarray(sets, dtype=np.int64)
    if values.size == 0 or sets.size == 0:
        return np.zeros(values.shape, bool)
    low = min(int(values.min()), int(sets.min()))
    offset = np.arange(len(values), dtype=np.int64)[:, None] * (max(int(values.max()), int(sets.max())) - low + 1) - low
    keys = np.sort(sets + offset, axis=1).ravel()  # rows in increasing ranges: sorted as a whole
    want = values + offset
    return keys[np.minimum(np.searchsorted(keys, want), len(keys) - 1)] == want
