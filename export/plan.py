"""Quotas under a latency budget (``cascade plan BUNDLE --budget-ms B [B ...]``).

The rank quota k is what the product shows and stays; the plan chooses recall's quota R and the
pre-ranker's P (R > P > k) to maximise joint recall on the test split within a p99 budget.

- **Cost** (``measure_costs``): each stage's milliseconds as a function of its candidates, measured
  on the bundle (onnxruntime, faiss, the live item features) one request at a time as the server
  runs it: recall retrieving n (and attaching the items' fields), pre-rank scoring n, rank scoring
  n, on a grid of n; and what a request costs beyond its stages (building the batch, the final
  cut), measured at the bundle's own quotas. A plan's latency for a request is recall(R) +
  prerank(R) + rank(P) + the rest, each interpolated linearly between grid points; the plan's
  predicted p99 is over the sampled requests. The figure is the server's own (``timings_ms.total``
  of a response); HTTP adds its round trip on top.
- **Quality** (``quality_grid``): joint recall for every (R, P) of the grids from the torch cascade
  ``cascade eval`` runs (the bundle was checked against it at export), on a seeded sample of test
  requests: recall retrieves the largest R once and each R takes its prefix (the item trend is
  computed over each R's list, as served); pre-rank scores the R; rank scores pre-rank's top
  ``max(P)`` once and each P cuts it as the server would (a list-dependent blend standardised
  over the P it is served). Each figure has a bootstrap CI over requests.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cascade import metrics as M
from cascade.cascade import Cascade, best_first, top_mask
from cascade.data.lists import ListBatch
from cascade.evaluate import Truth, load_saved
from cascade.models import MODELS
from cascade.verdict import bootstrap_mean
from export.bundle import BundleError
from export.replay import request_body
from export.runtime import CascadeService
from teachers import TEACHERS

WARMUP = 20  # requests run before any timing (first-call allocations, caches)


def default_grids(quotas: dict[str, int], catalog: int) -> tuple[list[int], list[int]]:
    """Recall's and pre-rank's quota grids around the bundle's own: a quarter to four times each,
    recall within the catalog, pre-rank above the rank quota."""
    r0, p0, k = quotas["recall"], quotas["prerank"], quotas["rank"]
    recall = sorted({min(max(r0 * f // 4, 2), catalog) for f in (1, 2, 4, 8, 16)})
    prerank = sorted({max(p0 * f // 4, k + 1) for f in (2, 4, 8, 16)} | {2 * k})
    return recall, prerank


def _interp(sizes: list[int], ms: np.ndarray, n: int) -> np.ndarray:
    """Per-request ms (R,) at ``n`` candidates, linear between the grid's sizes (R, S) (and
    along the last segment past its end)."""
    x = np.asarray(sizes, float)
    if len(x) == 1:
        return ms[:, 0]
    j = int(np.clip(np.searchsorted(x, n) - 1, 0, len(x) - 2))
    w = (n - x[j]) / (x[j + 1] - x[j])
    return ms[:, j] + w * (ms[:, j + 1] - ms[:, j])


@dataclass
class CostCurves:
    """Milliseconds per request (R requests) of each stage at each grid size, and the rest."""

    recall_sizes: list[int]
    rank_sizes: list[int]
    recall: np.ndarray  # (R, len(recall_sizes)): retrieve n, attach their fields
    prerank: np.ndarray  # (R, len(recall_sizes)): score the n recall passed on
    rank: np.ndarray  # (R, len(rank_sizes)): score the n pre-rank passed on
    rest: np.ndarray  # (R,): a request's time beyond its stages

    def per_request(self, r: int, p: int) -> np.ndarray:
        """(R,) predicted ms of each sampled request under quotas (r, p, k)."""
        return _interp(self.recall_sizes, self.recall, r) + _interp(self.recall_sizes, self.prerank, r) + _interp(self.rank_sizes, self.rank, p) + self.rest

    def p99(self, r: int, p: int) -> float:
        return float(np.percentile(self.per_request(r, p), 99))

    def table(self) -> dict[str, dict[int, float]]:
        """Each stage's p50 and p99 ms by size."""
        out: dict[str, dict[int, float]] = {}
        for name, sizes, ms in (("recall", self.recall_sizes, self.recall), ("prerank", self.recall_sizes, self.prerank), ("rank", self.rank_sizes, self.rank)):
            for q in (50, 99):
                out[f"{name} p{q}"] = {n: float(np.percentile(ms[:, j], q)) for j, n in enumerate(sizes)}
        return out


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - start) * 1000


def measure_costs(service: CascadeService, requests: ListBatch, recall_sizes: list[int], rank_sizes: list[int]) -> CostCurves:
    """``service``'s stages on each of ``requests`` (B, as logged: user fields, history, ts) one
    at a time, at every size of the grids; the rest at the bundle's quotas."""
    cascade: Cascade = service.cascade
    prerank, rank = cascade.stages
    fields = list(service.user_fields)
    parsed = [service.parse(request_body(requests, row, fields) | {"trace": False}) for row in range(len(requests))]
    for p in parsed[:WARMUP]:
        service.run_parsed([p])
    parsed = parsed[WARMUP:]
    rows = len(parsed)
    rec, pre, rnk, rest = np.zeros((rows, len(recall_sizes))), np.zeros((rows, len(recall_sizes))), np.zeros((rows, len(rank_sizes))), np.zeros(rows)
    rng = np.random.default_rng(0)
    for i, p in enumerate(parsed):
        batch = service.batch([p])
        # sizes in a random order per request: no size always pays the first call's cache misses
        for j in rng.permutation(len(recall_sizes)):
            n = recall_sizes[j]
            lists, rec[i, j] = _timed(lambda: cascade.catalog.attach(batch, cascade.retriever(batch, n)[0]))
            scores, pre[i, j] = _timed(lambda: np.asarray(prerank.scorer(lists), np.float32))
        # rank's candidates: pre-rank's best of the largest recall list
        lists = cascade.catalog.attach(batch, cascade.retriever(batch, recall_sizes[-1])[0])
        scores = np.asarray(prerank.scorer(lists), np.float32)
        for j in rng.permutation(len(rank_sizes)):
            n = rank_sizes[j]
            cut, _ = best_first(lists, scores, top_mask(scores, lists.mask, n), n)
            _, rnk[i, j] = _timed(lambda: rank.scorer(cut))
        served = service.run_parsed([p])[0]["timings_ms"]
        rest[i] = served["total"] - sum(v for k, v in served.items() if k != "total")
    return CostCurves(recall_sizes, rank_sizes, rec, pre, rnk, np.maximum(rest, 0.0))


@dataclass
class QualityGrid:
    """Joint recall per request (R requests with a logged positive) at every (recall, pre-rank)
    quota pair; NaN where P >= R."""

    recall_sizes: list[int]
    prerank_sizes: list[int]
    k: int
    per_request: np.ndarray  # (R, len(recall_sizes), len(prerank_sizes))

    def mean(self, i: int, j: int) -> float:
        return float(self.per_request[:, i, j].mean())

    def ci(self, i: int, j: int) -> tuple[float, float]:
        return bootstrap_mean(self.per_request[:, i, j])


def _rank_served(scorer, cut: ListBatch, prerank_sizes: list[int]) -> list[np.ndarray]:
    """The rank stage's scores of ``cut`` (B, max P: pre-rank's survivors best first) as served
    when pre-rank passes on its first P, for each P (-inf past them)."""
    cols = np.arange(cut.list_size)[None, :]
    alive = [cut.mask & (cols < p) for p in prerank_sizes]
    if getattr(scorer, "list_dependent", False) and hasattr(scorer, "served"):  # a torch blend: its parts scored once
        return scorer.served(cut, alive)
    if getattr(scorer, "list_dependent", False):  # scored on each list it would be served
        out = []
        for p, a in zip(prerank_sizes, alive):
            first = cut.take_columns(np.broadcast_to(np.arange(min(p, cut.list_size)), (len(cut), min(p, cut.list_size))))
            scores = np.full(cut.mask.shape, -np.inf, np.float32)
            scores[:, : first.list_size] = np.where(first.mask, np.asarray(scorer(first), np.float32), -np.inf)
            out.append(scores)
        return out
    scores = np.asarray(scorer(cut), np.float32)
    return [np.where(a, scores, -np.inf).astype(np.float32) for a in alive]


def quality_grid(cascade: Cascade, parts, recall_sizes: list[int], prerank_sizes: list[int], progress: Callable[[str], None] = lambda _: None) -> QualityGrid:
    """Joint recall at every (R, P) with the rank quota of ``cascade`` (torch), over the logged
    test lists ``parts`` (an iterable of ``ListBatch``)."""
    prerank, rank = cascade.stages
    k, r_max, p_max = rank.quota, max(recall_sizes), max(prerank_sizes)
    rows = []
    for logged in parts:
        truth = Truth.of(logged)
        requests = logged.take_columns(np.zeros((len(logged), 0), int))
        ids, _ = cascade.retriever(requests, r_max)
        out = np.full((len(logged), len(recall_sizes), len(prerank_sizes)), np.nan)
        for i, r in enumerate(recall_sizes):
            lists = cascade.catalog.attach(requests, ids[:, :r])
            scores = np.asarray(prerank.scorer(lists), np.float32)
            width = min(p_max, r)
            cut, pre = best_first(lists, scores, top_mask(scores, lists.mask, width), width)
            positive = truth.contains(cut.item["item_id"], "positives")
            valid = [j for j, p in enumerate(prerank_sizes) if p < r]
            served = _rank_served(rank.scorer, cut, [prerank_sizes[j] for j in valid])
            for j, rank_scores in zip(valid, served):
                kept = top_mask(rank_scores, np.isfinite(rank_scores), k)
                out[:, i, j] = (kept & positive).sum(axis=1) / np.maximum(truth.n_positives, 1)
        rows.append(out[truth.n_positives > 0])
        progress(f"{sum(len(r) for r in rows):,} requests")
    return QualityGrid(recall_sizes, prerank_sizes, k, np.concatenate(rows))


@dataclass
class Plan:
    budget_ms: float
    quotas: dict[str, int] | None  # None: nothing fits
    joint_recall: float
    ci: tuple[float, float]
    p99_ms: float


def choose(costs: CostCurves, quality: QualityGrid, budget_ms: float) -> Plan:
    """The (R, P) of the grids with the highest joint recall whose predicted p99 is within
    ``budget_ms`` (ties to the lower p99); ``quotas`` None, with the cheapest's p99, when none is."""
    best, cheapest = None, None
    for i, r in enumerate(quality.recall_sizes):
        for j, p in enumerate(quality.prerank_sizes):
            if p >= r:
                continue
            jr, p99 = quality.mean(i, j), costs.p99(r, p)
            if cheapest is None or p99 < cheapest[1]:
                cheapest = ((i, j), p99)
            if p99 <= budget_ms and (best is None or (jr, -p99) > (best[1], -best[2])):
                best = ((i, j), jr, p99)
    if best is None:
        return Plan(budget_ms, None, float("nan"), (float("nan"), float("nan")), cheapest[1])
    (i, j), jr, p99 = best
    return Plan(budget_ms, {"recall": quality.recall_sizes[i], "prerank": quality.prerank_sizes[j], "rank": quality.k}, jr, quality.ci(i, j), p99)


def sample(data, requests: int, seed: int):
    """The test split's logged lists in parts, a seeded uniform sample of about ``requests`` of them."""
    total = int((data.ds.requests["split"] == "test").sum()) if not data.streamed else None
    share = 1.0 if total is None or requests >= total else requests / total
    rng = np.random.default_rng(seed)
    for logged in data.lists("test"):
        if share < 1.0:
            logged = logged.take(np.flatnonzero(rng.random(len(logged)) < share))
        if len(logged):
            yield logged


def run_dir_of(bundle: Path) -> Path:
    """The ``task: cascade`` run a bundle was exported from (its manifest's source)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    run_dir = manifest.get("source", {}).get("run_dir")
    if run_dir is None:
        raise BundleError(f"{bundle}: exported from named stages, not a 'task: cascade' run; export the run (cascade export RUN_DIR) to plan its quotas")
    if not Path(run_dir).exists():
        raise BundleError(f"{bundle}: the run it was exported from, {run_dir}, is missing")
    return Path(run_dir)


def plan(bundle: Path, budgets: list[float], recall_sizes: list[int] | None = None, prerank_sizes: list[int] | None = None, requests: int = 2000, cost_requests: int = 300, seed: int = 0, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Measure the bundle's cost curves and the run's quality grid, and choose quotas for each
    budget. Returns every figure (``write``/``text`` format it)."""
    bundle = Path(bundle)
    saved = load_saved(run_dir_of(bundle), models={**MODELS, **TEACHERS})
    service = CascadeService(bundle)
    try:
        if service.online is not None:  # the counters hold every logged exposure, as after a replay
            service.catch_up(saved.data.trend())
        quotas = {"recall": service.cascade.recall_quota, "prerank": service.cascade.stages[0].quota, "rank": service.cascade.stages[1].quota}
        grids = default_grids(quotas, len(service.catalog.item_ids))
        recall_sizes = sorted(set(recall_sizes or grids[0]))
        prerank_sizes = sorted(set(prerank_sizes or grids[1]))
        if min(prerank_sizes) <= quotas["rank"] or min(recall_sizes) <= min(prerank_sizes):
            raise BundleError(f"quotas must shrink: every pre-rank quota above the rank quota {quotas['rank']}, the smallest recall quota above the smallest pre-rank one (got recall {recall_sizes}, pre-rank {prerank_sizes})")
        start = time.perf_counter()
        progress(f"cost: {cost_requests} test requests one at a time, recall at {recall_sizes}, rank at {prerank_sizes}")
        costs = measure_costs(service, saved.data.first("test", cost_requests + WARMUP), recall_sizes, prerank_sizes)
        cost_s = time.perf_counter() - start
    finally:
        service.close()
    start = time.perf_counter()
    progress(f"quality: joint recall@{quotas['rank']} on about {requests:,} test requests")
    cascade = saved.cascade()
    quality = quality_grid(cascade, sample(saved.data, requests, seed), recall_sizes, prerank_sizes, lambda s: progress(f"  quality: {s}"))
    grid = [
        {"recall": r, "prerank": p, "joint_recall": quality.mean(i, j), "ci": quality.ci(i, j), "p99_ms": costs.p99(r, p), "p50_ms": float(np.percentile(costs.per_request(r, p), 50))}
        for i, r in enumerate(recall_sizes)
        for j, p in enumerate(prerank_sizes)
        if p < r
    ]
    current = next((g for g in grid if g["recall"] == quotas["recall"] and g["prerank"] == quotas["prerank"]), None)
    return {
        "bundle": str(bundle),
        "quotas": quotas,
        "cost_requests": len(costs.rest),
        "quality_requests": len(quality.per_request),
        "seconds": {"cost": round(cost_s, 1), "quality": round(time.perf_counter() - start, 1)},
        "costs": {"rest p50": float(np.percentile(costs.rest, 50)), "rest p99": float(np.percentile(costs.rest, 99))} | {k: {str(n): v for n, v in d.items()} for k, d in costs.table().items()},
        "grid": grid,
        "current": current,
        "plans": [vars(choose(costs, quality, b)) for b in budgets],
    }


def text(result: dict[str, Any]) -> str:
    """The plan as a person reads it: each budget's quotas, then the grid."""
    q = result["quotas"]
    k = q["rank"]
    lines = []
    cur = result["current"]
    here = f"; the bundle's own {q['recall']},{q['prerank']},{k}: joint recall {cur['joint_recall']:.4f}, p99 {cur['p99_ms']:.2f} ms" if cur else ""
    lines.append(f"plan for {result['bundle']} (rank quota {k} kept; joint recall@{k} on {result['quality_requests']:,} test requests, p99 over {result['cost_requests']} requests timed one at a time in the server's cascade{here})")
    for p in result["plans"]:
        if p["quotas"] is None:
            lines.append(f"  budget {p['budget_ms']:g} ms: nothing on the grid fits (the cheapest predicts p99 {p['p99_ms']:.2f} ms)")
        else:
            c = p["quotas"]
            lines.append(f"  budget {p['budget_ms']:g} ms: quotas {c['recall']},{c['prerank']},{c['rank']} -> joint recall {p['joint_recall']:.4f} [{p['ci'][0]:.4f}, {p['ci'][1]:.4f}], predicted p99 {p['p99_ms']:.2f} ms (serve it: cascade export RUN_DIR --quotas {c['recall']},{c['prerank']},{c['rank']})")
    return "\n".join(lines)


def grid_table(result: dict[str, Any]) -> dict[str, list]:
    """Rows: recall quotas; columns: pre-rank quotas; cells 'joint recall / p99 ms' (a
    ``report.text_table`` table)."""
    rs = sorted({g["recall"] for g in result["grid"]})
    ps = sorted({g["prerank"] for g in result["grid"]})
    at = {(g["recall"], g["prerank"]): g for g in result["grid"]}
    rows = [[str(r)] + [f"{at[r, p]['joint_recall']:.4f} / {at[r, p]['p99_ms']:.2f}" if (r, p) in at else "" for p in ps] for r in rs]
    return {"header": ["recall \\ pre-rank"] + [str(p) for p in ps], "rows": rows}
