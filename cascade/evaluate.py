"""Offline evaluation of a cascade: does each stage keep what the next one would rank highest,
how much of the real positives survives, and what each stage costs (`cascade eval`).

Everything runs through one ``Cascade.run(requests, full=True)`` on the test requests (training's
joint report and serving call the same object): recall retrieves its top-n of the catalog, the
pre-ranker and the ranker each score that whole list (the cuts stay those of the cascade), so
every earlier stage can be compared with the ranker's order. The retrieved lists take their
labels from the logs: a retrieved item the request logged as a positive is a positive; a logged
positive recall never retrieved counts as lost in every end-to-end figure.

The baselines are computed on the same requests and lists: most-popular recall (train-split
positives per item, history excluded), a random and a popularity pre-ranker between the same
recall and ranker; on temporal logs also trending recall and a trending pre-ranker (each item's
exposures in the window before the request, ``cascade.data.trend``; the window of
``TRENDING_DAYS`` that keeps the most validation positives). Metric definitions live in ``cascade.metrics``; ``GLOSSARY`` says in one line
what each reported name means.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cascade import metrics as M
from cascade.cascade import Cascade, CascadeOutput, Catalog, Stage, TorchScorer, top_mask
from cascade.config import ConfigError, ExperimentConfig, load_config
from cascade.data.lists import ListBatch
from cascade.data.schema import EXPOSED
from cascade.data.store import Dataset
from cascade.data.trend import ItemTrend, TrendSpec, is_trend_field
from cascade.data.synth import WORLD_FILE, World
from cascade.eval_data import EvalData
from cascade.models import MODELS, build_model, list_tensors
from cascade.prepare import streams, trend_spec, with_trend_fields
from cascade.recall import TowerRetriever
from cascade.saved import STAGE_NAMES, SavedError, read_stages

K_GRID = (10, 20)
M_GRID = (10, 20, 50, 100, 200)

# The report's names, one vocabulary for its tables, the terminal and this glossary (each entry
# starts with the key(s) metrics.json uses).
GLOSSARY = {
    "joint recall": "(joint_recall) share of each request's logged positives that survive every quota (recall top-n -> pre-rank top-m -> rank top-k); positives recall never retrieved count as lost",
    "positives kept": "(positives_kept) share of each request's logged positives still in a stage's output (recall: its top-n; pre-rank: its top-m; rank: its top-k); 'kept by recall', 'kept after pre-rank' in the tables",
    "exposures kept": "(exposed_kept) share of the items the live system exposed that a stage's output contains",
    "teacher R@k@m": "(teacher_recall@k@m) of the ranker's top-k over the recall list, the share inside a stage's top-m (Recall@k@m, RankFlow/ARF's consistency); the tables give k and m, the cascade's rank and pre-rank quotas (teacher R@10@50)",
    "Kendall tau vs rank, vs next stage": "(kendall_tau, kendall_tau_vs_next) Kendall tau-b between a stage's scores and the ranker's over the recall list, or the next stage's (for recall: the pre-ranker's)",
    "teacher NDCG@10": "(teacher_ndcg@10) NDCG@10 of a stage's order with gains from the ranker's top-10",
    "Recall@10, HitRate@10, NDCG@10": "(recall@10, hit_rate@10, ndcg@10) the stage's own order over the recall list against the logged positives inside it",
    "AUC, GAUC, LogLoss": "(auc, gauc, logloss) on the logged exposures of the test requests; GAUC weights each request by its exposures; LogLoss of sigmoid(score), shown only for a stage trained as a probability (BCE alone): a ranking loss's scores are not probabilities",
    "oracle ratio": "(oracle_ratio) synthetic world only: true utility of the final top-k over the best top-k of the catalog (history excluded)",
    "blame": "(blame_recall, blame_prerank, blame_rank) synthetic world only: the lost true utility each stage causes, as a share of the best achievable: recall = best of catalog - best within recall's output, pre-rank = that - best within its output, rank = that - what it shows",
    "FLOPs / candidate": "(flops_per_candidate) matmul FLOPs per scored candidate at serving (torch FlopCounterMode; embedding lookups not counted): two-towers count the user tower once per request plus the score, the item side cached (run per candidate where it reads the item trend); recall per catalog item",
    "p50 ms, p95 ms": "(latency_ms, latency_p95_ms) median and 95th-percentile wall time of the stage per request, one request at a time",
}


def trained_as_probabilities(exp: ExperimentConfig) -> bool:
    """Whether a stage's scores are logits of a click probability: trained by BCE alone
    (pointwise, or a loss mix of BCE terms only; a LightGBM 'binary' model), not by a ranking or
    distillation loss, a softmax over the catalog or a blend of z-scores."""
    if exp.model.name == "gbdt":
        return exp.model.params.get("objective", "lambdarank") == "binary"
    if exp.task == "distill":
        d = exp.distill
        return max(d.tutor, d.arf, d.listwise_kd, d.logit_mse) == 0
    return exp.task == "pointwise"


@dataclass
class Truth:
    """The logs' view of the test requests, aligned with their lists: positive and exposed item ids
    (R, P) / (R, E), 0-padded, and each request's positive count."""

    positives: np.ndarray
    exposed: np.ndarray
    n_positives: np.ndarray

    @classmethod
    def of(cls, logged: ListBatch) -> "Truth":
        ids = logged.item["item_id"]
        pos = np.where(logged.mask & (logged.label > 0), ids, 0)
        exp = np.where(logged.mask & (logged.stage == EXPOSED), ids, 0)
        return cls(pos, exp, (pos > 0).sum(axis=1))

    def contains(self, ids: np.ndarray, which: str) -> np.ndarray:
        """(B, N) bool: candidate ``ids`` (B, N) that are logged positives / exposures of their row."""
        logged = self.positives if which == "positives" else self.exposed
        out = np.zeros(ids.shape, bool)
        for a in range(0, len(ids), 256):  # (256, N, P) at a time
            b = a + 256
            out[a:b] = ((ids[a:b, :, None] == logged[a:b, None, :]) & (logged[a:b, None, :] > 0)).any(axis=2)
        return out & (ids > 0)


def _share_kept(ids: np.ndarray, kept: np.ndarray, logged: np.ndarray) -> float:
    """Mean over rows with a logged item of |logged ∩ kept ids| / |logged|; ids, kept (B, N)."""
    return M.retrieval_recall(np.where(kept, ids, 0), logged)


def most_popular(requests: ListBatch, counts: np.ndarray, catalog: np.ndarray, n: int) -> np.ndarray:
    """Most-popular recall: the n catalog items with the most train positives, the request's
    history excluded. (B, ...) -> (B, n) ids."""
    order = catalog[np.argsort(-counts[catalog], kind="stable")]
    width = min(n + requests.history.shape[1], len(order))  # enough to skip every history item
    top = np.broadcast_to(order[:width], (len(requests), width))
    seen = M.in_rows(top, requests.history)  # the catalog's ids are > 0: the history's padding matches none
    pick = np.argsort(seen, axis=1, kind="stable")[:, :n]  # unseen first, popularity order kept
    return np.where(np.take_along_axis(seen, pick, 1), 0, np.take_along_axis(top, pick, 1))  # 0: the catalog ran out


TRENDING_DAYS = (1, 7, 30)  # windows the trending baselines choose from on the validation split


def trending(requests: ListBatch, trend: ItemTrend, catalog: np.ndarray, n: int, days: float, cells: int = 1 << 21) -> np.ndarray:
    """Trending recall: each request's n catalog items most exposed in the ``days`` before its
    ``ts``, the history excluded (ties to the lower id). (B, ...) -> (B, min(n, C)) ids. The
    requests go in time order, ``cells`` catalog counts at a time (``ItemTrend.catalog_counts``)."""
    catalog = np.asarray(catalog, np.int64)
    size, width = len(catalog), min(n, len(catalog))
    out = np.zeros((len(requests), width), np.int64)
    if width == 0:
        return out
    top_id = int(max(catalog.max(), requests.history.max(initial=0)))
    # one key per cell orders by count, then by catalog position: ties go to the lower id
    tie = np.arange(size - 1, -1, -1, dtype=np.int64)
    order, block = np.argsort(requests.ts, kind="stable"), max(1, cells // size)
    for a in range(0, len(order), block):
        rows = order[a : a + block]
        counts = trend.catalog_counts(catalog, requests.ts[rows], days)
        seen = np.zeros((len(rows), top_id + 1), bool)
        np.put_along_axis(seen, requests.history[rows], True, axis=1)
        counts[seen[:, catalog]] = -1  # the history is never retrieved
        key = counts * size + tie
        top = np.argpartition(-key, width - 1, axis=1)[:, :width] if width < size else np.broadcast_to(np.arange(size), key.shape)
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(key, top, 1), axis=1), 1)
        out[rows] = np.where(np.take_along_axis(counts, top, 1) >= 0, catalog[top], 0)
    return out


def trending_days(valid: Iterable[ListBatch], trend: ItemTrend, catalog: np.ndarray, n: int) -> int:
    """The ``TRENDING_DAYS`` window whose trending top-n keeps the most validation positives;
    ``valid``: the validation lists, in parts."""
    total: M.Totals = {}
    for part in valid:
        M.add_totals(total, {d: M.retrieval_recall(trending(part, trend, catalog, n, d), part.positive_ids) for d in TRENDING_DAYS})
    kept = M.means(total)
    return max(TRENDING_DAYS, key=lambda d: kept.get(d, 0.0))  # no validation positive (NaN, or no part): the first


def stage_quality(scores: np.ndarray, lists: ListBatch, ranker: np.ndarray | None, quotas: tuple[int, int]) -> dict[str, float]:
    """One stage's order over the recall lists (B, n): against the logged positives inside them
    and, unless the stage is the ranker itself (``ranker`` None), against the ranker's scores:
    teacher Recall@k@m for k in the rank quota and ``K_GRID``, m in ``M_GRID``, the pre-rank quota
    and n (the consistency curve)."""
    mask, label = lists.mask, lists.label
    out = {
        "recall@10": M.recall_at_k(scores, label, 10, mask),
        "hit_rate@10": M.hit_rate_at_k(scores, label, 10, mask),
        "ndcg@10": M.ndcg_at_k(scores, label, 10, mask),
    }
    if ranker is None:
        return out
    out |= {"kendall_tau": M.kendall_tau(scores, ranker, mask), "teacher_ndcg@10": M.teacher_ndcg_at_k(scores, ranker, 10, mask)}
    return out | consistency_curve(scores, lists, ranker, quotas, sorted({quotas[1], *K_GRID}))


def consistency_curve(scores: np.ndarray, lists: ListBatch, ranker: np.ndarray, quotas: tuple[int, int], ks: list[int]) -> dict[str, float]:
    """teacher Recall@k@m for each k of ``ks`` and m in ``M_GRID``, the pre-rank quota and n."""
    n, out = lists.list_size, {}
    for k in ks:
        for m in sorted({*M_GRID, quotas[0], n}):
            if k <= m <= n:
                out[f"teacher_recall@{k}@{m}"] = M.teacher_recall_at_k_at_m(scores, ranker, k, m, lists.mask)
    return out


def flow_quality(lists: ListBatch, prerank: np.ndarray, rank: np.ndarray, quotas: tuple[int, int], truth: Truth) -> dict[str, float]:
    """End to end through the quotas (m, k) over the recall lists: exact over tie-breaks."""
    m, k = quotas
    positive = lists.mask & (lists.label > 0)
    return {
        "joint_recall": M.joint_recall([prerank, rank], [m, k], positive, lists.mask, truth.n_positives),
        "positives_after_prerank": M.joint_recall([prerank], [m], positive, lists.mask, truth.n_positives),
        f"teacher_recall@{k}@{m}": M.teacher_recall_at_k_at_m(prerank, rank, k, m, lists.mask),
    }


def blame(lists: ListBatch, kept: list[np.ndarray], k: int, world, best: np.ndarray) -> dict[str, tuple[float, float]]:
    """Stage blame on the synthetic world, each figure as (lost utility, best utility) sums over
    these rows (``M.add_totals``). ``kept``: each stage's survivors (B, n) over the recall
    lists, recall first (its whole list). Utility of a set = the true click probabilities of its
    best k items; the best of the catalog minus what is shown splits exactly into the parts each
    stage drops (see ``GLOSSARY['blame']``). ``best`` (B,): the catalog's best top-k utility."""
    ids = lists.item["item_id"]
    utility = np.where(lists.mask, world.click_prob(lists.request_id, ids), 0.0)
    within = [(-np.sort(-np.where(keep, utility, 0.0), axis=1)[:, :k]).sum(axis=1) for keep in kept]
    total = float(best.sum())
    names = STAGE_NAMES
    out = {f"blame_{names[0]}": (float((best - within[0]).sum()), total)}
    for i in range(1, len(kept)):
        out[f"blame_{names[i]}"] = (float((within[i - 1] - within[i]).sum()), total)
    out["oracle_ratio"] = (float(within[-1].sum()), total)
    return out


@dataclass
class FlowRun:
    """One ``Cascade.run(full=True)`` over a part of a split's requests, with the logs' truth attached."""

    run: CascadeOutput
    logged: ListBatch  # the part's logged lists (B, L)
    truth: Truth
    lists: ListBatch  # recall's lists (B, n), labelled from the logs
    quotas: tuple[int, int]  # pre-rank, rank
    best: np.ndarray | None  # (B,) the catalog's best top-k true utility (synthetic world)
    seconds: float

    def flow(self, world=None) -> dict:
        """The end-to-end figures over this part, for ``M.add_totals``."""
        recall, prerank, rank = self.run.stages
        out = flow_quality(self.lists, prerank.scores, rank.scores, self.quotas, self.truth)
        out["positives_retrieved"] = _share_kept(self.lists.item["item_id"], recall.kept, self.truth.positives)
        if world is not None:
            out |= blame(self.lists, [recall.kept, prerank.kept, rank.kept], self.quotas[1], world, self.best)
        return out


def run_flow(cascade: Cascade, logged: ListBatch, world=None) -> FlowRun:
    """Run ``cascade`` (recall -> pre-rank -> rank) on the requests of ``logged`` (logged lists,
    a part of a split) with every stage scoring the whole recall list."""
    if cascade.catalog is not None:  # the logged exposures get what the catalog gives a candidate
        logged = cascade.catalog.add_trend(logged)
    truth = Truth.of(logged)
    requests = logged.take_columns(np.zeros((len(logged), 0), int))
    start = time.perf_counter()
    run = cascade.run(requests, full=True)
    seconds = time.perf_counter() - start
    lists = run.stages[0].lists
    lists.label = truth.contains(lists.item["item_id"], "positives").astype(np.float32)
    quotas = (cascade.stages[0].quota, cascade.stages[1].quota)
    best = None if world is None else world.best_topk(lists.request_id, quotas[1], exclude=logged.history)[1].sum(axis=1)
    return FlowRun(run, logged, truth, lists, quotas, best, seconds)


def flow_figures(cascade: Cascade, data: EvalData, world=None, split: str = "test", share: float = 1.0, seed: int = 0) -> dict[str, float]:
    """``FlowRun.flow`` over the split, added up part by part; ``share`` < 1: over a seeded
    uniform sample of that share of its requests (``requests`` says how many)."""
    total: M.Totals = {}
    rng, requests = np.random.default_rng(seed), 0
    for logged in data.lists(split):
        if share < 1.0:
            logged = logged.take(np.flatnonzero(rng.random(len(logged)) < share))
        if len(logged):
            M.add_totals(total, run_flow(cascade, logged, world).flow(world))
            requests += len(logged)
    return M.means(total) | {"requests": requests}


@dataclass
class BaselineData:
    """What the baselines take from the whole logs: train positives per item, the catalog and,
    on temporal logs, the exposures with the trending window chosen on the validation split."""

    counts: np.ndarray
    catalog: np.ndarray
    trend: ItemTrend | None = None
    days: int | None = None

    @classmethod
    def of(cls, data: EvalData, n: int) -> "BaselineData":
        counts, catalog = data.popularity(), data.ds.items["item_id"]
        if not data.ds.schema.temporal:
            return cls(counts, catalog)
        trend = data.trend()
        return cls(counts, catalog, trend, trending_days(data.lists("valid"), trend, catalog, n))


def evaluate(cascade: Cascade, data: EvalData, world=None, split: str = "test", seed: int = 0) -> dict:
    """Every figure of the report for one cascade (recall -> pre-rank -> rank) on ``split``."""
    base = BaselineData.of(data, cascade.recall_quota)
    total: M.Totals = {}
    exposed: dict[str, list[tuple[np.ndarray, ...]]] = {st.name: [] for st in cascade.stages}
    per_request: dict[str, list[np.ndarray]] = {}
    requests, seconds = 0, 0.0
    for part, logged in enumerate(data.lists(split)):
        fr = run_flow(cascade, logged, world)
        flow, base_figures = fr.flow(world), baselines(fr, base, world, (seed, part))
        M.add_totals(total, stage_figures(fr) | {("flow", k): v for k, v in flow.items()})
        M.add_totals(total, {("baselines", *k): v for k, v in base_figures.items()})
        flows = {"flow": flow["joint_recall"]} | {name: v for (name, key), v in base_figures.items() if key == "joint_recall"}
        defined = ~np.isnan(flow["joint_recall"].per_row)  # rows with a logged positive: the same for every flow
        for name, rows in ({"request_id": fr.lists.request_id} | {k: v.per_row for k, v in flows.items()}).items():
            per_request.setdefault(name, []).append(rows[defined])
        for st in cascade.stages:  # the AUC family on the logged exposures: gathered, computed once
            exposed[st.name].append(exposure_scores(st, fr.logged))
        requests, seconds = requests + len(logged), seconds + fr.seconds
    if not requests:
        raise ValueError(f"the logs have no '{split}' request to evaluate on")
    out = _nested(M.means(total))
    for name, gathered in exposed.items():
        out["stages"][name] |= exposure_metrics(*(np.concatenate(column) for column in zip(*gathered)))
    if "trending_recall" in out["baselines"]:
        out["baselines"]["trending_recall"] = {"days": base.days} | out["baselines"]["trending_recall"]
    return {
        "requests": requests,
        "quotas": {"recall": cascade.recall_quota, "prerank": cascade.stages[0].quota, "rank": cascade.stages[1].quota},
        "seconds": seconds,
        "stages": out["stages"],
        "flow": out["flow"],
        "baselines": out["baselines"],
        # joint recall per request with a logged positive, for confidence intervals over requests
        "per_request": {name: np.concatenate(parts).round(4).tolist() for name, parts in per_request.items()},
    }


def _nested(flat: dict[tuple, float]) -> dict:
    """{(a, b, c): v} -> {a: {b: {c: v}}}."""
    out: dict = {}
    for key, value in flat.items():
        into = out
        for k in key[:-1]:
            into = into.setdefault(k, {})
        into[key[-1]] = value
    return out


def stage_figures(fr: FlowRun) -> dict:
    """Each stage's figures over this part, keyed ("stages", stage, metric), for ``M.add_totals``."""
    lists, truth, rank = fr.lists, fr.truth, fr.run.stages[-1]
    ids = lists.item["item_id"]
    out = {}
    for stage in fr.run.stages:
        row = {"positives_kept": _share_kept(ids, stage.kept, truth.positives), "exposed_kept": _share_kept(ids, stage.kept, truth.exposed)}
        # the ranker against itself would agree perfectly: no agreement figures for it
        row |= stage_quality(stage.scores, lists, None if stage is rank else rank.scores, fr.quotas)
        out |= {("stages", stage.name, k): v for k, v in row.items()}
    for stage, nxt in zip(fr.run.stages[:-2], fr.run.stages[1:-1]):  # against the next stage, where that is not the ranker
        out[("stages", stage.name, "kendall_tau_vs_next")] = M.kendall_tau(stage.scores, nxt.scores, lists.mask)
        out[("stages", stage.name, "teacher_ndcg@10_vs_next")] = M.teacher_ndcg_at_k(stage.scores, nxt.scores, 10, lists.mask)
    return out


EXPOSURES_PER_ROW = 16  # a request's logged exposures are scored together, up to this many to a list


def exposure_scores(stage: Stage, logged: ListBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stage's scores of the logged exposures: labels, scores, request ids (E,). Each
    request's exposures are scored as lists of their own, ``EXPOSURES_PER_ROW`` at most (a
    MovieLens user's day can hold hundreds: padding every row to the longest would cost far
    more); a scorer that scores each candidate alone gives what it gives in any list. A
    list-dependent scorer (a blend standardises over its list) has no score of an exposure
    outside the list it cuts: none."""
    rows, cols = np.nonzero(logged.mask & (logged.stage == EXPOSED))  # row-major: grouped by row
    if not len(rows) or getattr(stage.scorer, "list_dependent", False):
        return np.zeros(0, np.float32), np.zeros(0), np.zeros(0, np.int64)
    within = np.arange(len(rows)) - np.searchsorted(rows, rows)  # each exposure's place among its row's
    segment = np.cumsum(np.r_[True, (rows[1:] != rows[:-1]) | (within[1:] % EXPOSURES_PER_ROW == 0)]) - 1
    slot = within % EXPOSURES_PER_ROW
    grid = np.zeros((segment[-1] + 1, EXPOSURES_PER_ROW), np.int64)
    valid = np.zeros(grid.shape, bool)
    grid[segment, slot], valid[segment, slot] = cols, True
    first = np.r_[0, np.flatnonzero(np.diff(segment)) + 1]
    scores = np.asarray(stage.scorer(logged.cells(rows[first], grid, valid)), np.float64)
    return logged.label[rows, cols], scores[segment, slot], logged.request_id[rows]


def exposure_metrics(y: np.ndarray, s: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """AUC, GAUC (by exposures) and logloss of sigmoid(score) over exposures: labels ``y``, scores
    ``s``, request ids ``groups`` (E,); none without exposures."""
    if not len(y):
        return {}
    return {"auc": M.auc(y, s), "gauc": M.gauc(y, s, groups)[0], "logloss": M.logloss(y, 1.0 / (1.0 + np.exp(-s)))}


def baselines(fr: FlowRun, base: BaselineData, world, seed) -> dict:
    """Most-popular recall against the run's recall; a random and a popularity pre-ranker in place
    of the run's, between the same recall lists and ranker; on temporal logs trending recall and
    a trending pre-ranker. Over this part, keyed (baseline, metric), for ``M.add_totals``;
    ``seed`` draws the random pre-ranker's scores."""
    lists, truth, quotas, best, rank = fr.lists, fr.truth, fr.quotas, fr.best, fr.run.stages[-1]
    ids = lists.item["item_id"]
    n = lists.list_size
    cuts = [c for c in (50, n) if c <= n]
    top = most_popular(lists, base.counts, base.catalog, n)
    out = {("most_popular_recall", f"positives_kept@{c}"): M.retrieval_recall(top[:, :c], truth.positives) for c in cuts}
    out |= {("recall", f"positives_kept@{c}"): M.retrieval_recall(ids[:, :c], truth.positives) for c in cuts}
    pre_rankers = {"random_prerank": np.random.default_rng(seed).random(ids.shape), "popularity_prerank": base.counts[ids]}
    if base.trend is not None and lists.ts is not None:
        top = trending(lists, base.trend, base.catalog, n, base.days)
        out |= {("trending_recall", f"positives_kept@{c}"): M.retrieval_recall(top[:, :c], truth.positives) for c in cuts}
        pre_rankers["trending_prerank"] = np.where(lists.mask, base.trend.counts(ids, lists.ts, base.days), 0).astype(np.float64)
    for name, scores in pre_rankers.items():
        row = flow_quality(lists, scores, rank.scores, quotas, truth)
        row |= consistency_curve(scores, lists, rank.scores, quotas, [quotas[1]])
        if world is not None:
            m, k = quotas
            pre_kept = top_mask(scores, lists.mask, m)
            rank_kept = top_mask(rank.scores, pre_kept, k)
            row |= blame(lists, [lists.mask, pre_kept, rank_kept], k, world, best)
        out |= {(name, key): value for key, value in row.items()}
    return out


# ---------------------------------------------------------------------------------- cost


def _matmul_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@torch.no_grad()
def flops_per_candidate(model: nn.Module, lists: ListBatch, role: str, candidates: int) -> float:
    """Serving FLOPs per scored candidate (``GLOSSARY``) when the stage scores ``candidates`` items
    for one request (recall: the catalog; pre-rank: recall's quota; rank: pre-rank's), measured on
    the first request of ``lists`` with its valid items repeated to that many."""
    model = model.eval()
    one = lists.take(slice(0, 1))
    valid = np.flatnonzero(one.mask[0])
    one = one.take_columns(np.resize(valid if len(valid) else np.arange(one.list_size), candidates)[None, :])
    t = list_tensors(one, model)
    if role == "recall":  # the user tower once, then one dot per catalog item (exact search)
        u = model.user(t.user)
        return (_matmul_flops(lambda: model.user(t.user)) + 2 * u.numel() * candidates) / candidates
    if hasattr(model, "dot_scale"):  # a two-tower: the item side is cached, unless it reads the trend
        flat = t.items.reshape(candidates, -1)
        v = model.item(flat)
        v = v.reshape(1, candidates, *v.shape[1:])
        u = model.user(t.user)
        live = _matmul_flops(lambda: model.item(flat)) if any(is_trend_field(s.name) for s in model.item_slots) else 0
        return (_matmul_flops(lambda: model.user(t.user)) + live + _matmul_flops(lambda: model.score(u, v))) / candidates
    return _matmul_flops(lambda: model(t.user, t.items)) / candidates


def latency(cascade: Cascade, logged: ListBatch) -> tuple[dict[str, float], dict[str, float]]:
    """The median and the 95th-percentile ms per stage, serving the requests of ``logged`` one at
    a time (each stage scores what the one before passed on)."""
    one = logged.take_columns(np.zeros((len(logged), 0), int))
    times: dict[str, list[float]] = {}
    for i in range(len(one) + 5):
        out = cascade.run(one.take(slice(i % len(one), i % len(one) + 1)))
        if i >= 5:  # the first few warm caches up
            for name, s in out.seconds.items():
                times.setdefault(name, []).append(s * 1000)
    return {name: float(np.median(v)) for name, v in times.items()}, {name: float(np.percentile(v, 95)) for name, v in times.items()}


@dataclass
class SavedCascade:
    """A ``task: cascade`` run as saved (``stages.json``): its logs, world (synthetic only), the
    three stages' experiments, models and quotas."""

    data: EvalData
    world: object | None
    exps: dict[str, ExperimentConfig]
    models: dict[str, nn.Module]
    quotas: dict[str, int]
    trend: TrendSpec = TrendSpec()  # the item trend the stages were trained with

    @property
    def ds(self) -> Dataset:
        return self.data.ds

    def cascade(self) -> Cascade:
        return torch_cascade(self.ds, self.models, self.quotas, self.trend, self.data.trend() if self.trend else None)


def torch_cascade(ds: Dataset, models: dict[str, nn.Module], quotas: dict[str, int], trend: TrendSpec = TrendSpec(), exposures: ItemTrend | None = None) -> Cascade:
    """recall (torch user tower + faiss over the catalog) -> pre-rank -> rank as torch scorers;
    ``models`` and ``quotas`` by role; the catalog computes the item trend ``trend`` says, from
    ``exposures`` (taken from ``ds`` when None)."""
    stages = [Stage(name, TorchScorer(models[name]), quotas[name]) for name in ("prerank", "rank")]
    return Cascade(stages, TowerRetriever(models["recall"], ds), quotas["recall"], Catalog.from_dataset(ds, trend, exposures))


def load_saved(run_dir: str | Path, untrained: bool = False, models: dict | None = None, data: EvalData | None = None) -> SavedCascade:
    """The cascade a ``task: cascade`` run saved; ``untrained``: the same architectures with their
    initial weights (seeded as in training), the baseline a trained cascade must beat. Its logs
    (``data``, when the caller has read them) are read whole, or streamed where the cascade run
    streamed, or would have (its ``data.stream``)."""
    try:
        saved = read_stages(run_dir)
    except SavedError as e:
        raise ConfigError(str(e)) from None
    exps = {name: load_config(saved[name].config, saved[name].experiment)[0] for name in STAGE_NAMES}
    logs = exps["recall"].data
    if data is None:
        data = EvalData.read(logs.dir, streams(replace(logs, stream=saved.data_stream)))
    ds = data.ds
    world = World.load(logs.dir) if (Path(logs.dir) / WORLD_FILE).exists() else None
    stage_trend = trend_spec(exps["prerank"], exps["rank"])
    stage_ds = with_trend_fields(ds, stage_trend)
    built = {}
    for name in STAGE_NAMES:
        torch.manual_seed(exps[name].train.seed)
        model = build_model(exps[name], ds if name == "recall" else stage_ds, models or MODELS)
        if not untrained:
            model.load_state_dict(torch.load(saved.weights(name), weights_only=True, map_location="cpu"))
        built[name] = model.eval()
    return SavedCascade(data, world, exps, built, {name: saved[name].quota for name in STAGE_NAMES}, stage_trend)
