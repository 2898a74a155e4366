"""Quotas under a latency budget (``cascade plan BUNDLE --budget-ms B [B ...]``).

The rank quota k is what the product shows and stays; the plan chooses recall's quota R and the
pre-ranker's P (R > P > k) to maximise joint recall on the test split within a p99 budget.

- **Cost** (``measure_costs``): each stage's milliseconds as a function of its candidates,
  measured where they are spent: the bundle served by `cascade serve` in child processes, one
  per quota pair of a few (``probes``: every grid size passes through some stage), test requests
  sent to each in turn one at a time, each stage's time read from the server's own ``timings_ms``. A plan's
  latency for a request is recall(R) + prerank(R) + rank(P) + the rest (the total less the
  stages), each interpolated linearly between grid sizes; its predicted p99 is over those
  requests. It is the server's cascade time (``timings_ms.total``); the HTTP round trip adds to it.
- **Quality** (``quality_grid``): joint recall for every (R, P) of the grids from the torch cascade
  ``cascade eval`` runs (the bundle was checked against it at export), on a seeded sample of test
  requests: recall retrieves the largest R once and each R takes its prefix (the item trend is
  computed over each R's list, as served); pre-rank scores the R; rank scores pre-rank's top
  ``max(P)`` once and each P cuts it as the server would (a list-dependent blend standardised
  over the P it is served). Each figure has a bootstrap CI over requests.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cascade.cascade import Cascade, Stage, best_first, top_mask
from cascade.data.lists import ListBatch
from cascade.evaluate import Truth, load_saved
from cascade.models import MODELS
from cascade.verdict import bootstrap_mean
from export.bundle import MANIFEST, BundleError, read_manifest
from export.replay import http_post, request_body
from export.runtime import CascadeService
from export.serve import start_subprocesses, stop_subprocess
from teachers import TEACHERS

WARMUP = 20  # requests run before any timing (first-call allocations, caches)
WARMUP_S = 3.0  # and for at least this long: a server just started runs slower for seconds


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


def probes(recall_sizes: list[int], rank_sizes: list[int]) -> list[tuple[int, int]]:
    """Quota pairs (R, P) that put every recall size and every rank size through a cascade at
    least once: each R with the largest P below it, each P with the smallest R above it."""
    pairs = {(r, max(p for p in rank_sizes if p < r)) for r in recall_sizes if any(p < r for p in rank_sizes)}
    pairs |= {(min(r for r in recall_sizes if r > p), p) for p in rank_sizes if any(r > p for r in recall_sizes)}
    return sorted(pairs)


def requoted(bundle: Path, out: Path, recall: int, prerank: int) -> Path:
    """A copy of ``bundle`` at ``out`` serving recall's and pre-rank's quotas ``recall`` and
    ``prerank`` (nothing else in a bundle depends on them: the manifest alone changes)."""
    shutil.copytree(bundle, out)
    manifest = json.loads((out / MANIFEST).read_text())
    for stage in manifest["stages"]:
        stage["quota"] = {"recall": recall, "prerank": prerank}.get(stage["name"], stage["quota"])
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def measure_costs(bundle: Path, bodies: list[dict], recall_sizes: list[int], rank_sizes: list[int], others: dict[str, Path] | None = None) -> tuple[CostCurves, dict[str, np.ndarray]]:
    """The bundle served as the server runs it (`cascade serve` in child processes on 127.0.0.1),
    one server per ``probes`` quota pair, all up at once: after at least ``WARMUP`` requests and
    ``WARMUP_S`` seconds untimed, each request of ``bodies`` goes to every server in a random
    order, one at a time, so that every pair is
    timed in the same minutes (this machine's speed drifts by up to 2x from one minute to the
    next; interleaved, three servers of one bundle agree within 5%). Each stage's time and the
    rest (the batch built, the final cut: the total less the stages) come from the server's own
    ``timings_ms``: recall and pre-rank at each recall size, rank at each rank size. ``others``:
    bundles timed in the same rounds, their totals (R,) returned by name."""
    pairs = probes(recall_sizes, rank_sizes)
    others = others or {}
    rows = len(bodies)
    rec, pre, rnk, rest = np.full((rows, len(recall_sizes)), np.nan), np.full((rows, len(recall_sizes)), np.nan), np.full((rows, len(rank_sizes)), np.nan), np.zeros((rows, len(pairs)))
    totals = {name: np.zeros(rows) for name in others}
    rng = np.random.default_rng(0)
    servers = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            servers = start_subprocesses([requoted(bundle, Path(tmp) / f"r{r}_p{p}", r, p) for r, p in pairs] + list(others.values()))
            posts = [http_post(f"http://127.0.0.1:{port}") for _, port in servers]
            until = time.monotonic() + WARMUP_S
            for i, body in enumerate(itertools.islice(itertools.cycle(bodies), WARMUP * 50)):
                for post in posts:
                    post("/recommend", body)
                if i + 1 >= WARMUP and time.monotonic() > until:
                    break
            names = list(others)
            for row, body in enumerate(bodies):
                for c in rng.permutation(len(posts)):
                    t = posts[c]("/recommend", body)["timings_ms"]
                    if c >= len(pairs):
                        totals[names[c - len(pairs)]][row] = t["total"]
                        continue
                    r, p = pairs[c]
                    j, k = recall_sizes.index(r), rank_sizes.index(p)
                    rec[row, j], pre[row, j], rnk[row, k] = t["recall"], t["prerank"], t["rank"]
                    rest[row, c] = t["total"] - t["recall"] - t["prerank"] - t["rank"]
        finally:
            for proc, _ in servers:
                stop_subprocess(proc)
    return CostCurves(recall_sizes, rank_sizes, rec, pre, rnk, np.maximum(rest.mean(axis=1), 0.0)), totals


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
        return [Cascade.cut_as_served(Stage("rank", scorer, 1), cut, a)[1] for a in alive]
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
            cut, _ = best_first(lists, scores, top_mask(scores, lists.mask, width), width)
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


def request_bodies(data, fields: list[str], n: int) -> list[dict]:
    """``n`` request bodies from the first test requests, again from the first where the split
    has fewer (timing needs the count, not new users)."""
    logged = data.first("test", n)
    bodies = [request_body(logged, row, fields) | {"trace": False} for row in range(len(logged))]
    return list(itertools.islice(itertools.cycle(bodies), n))


def run_dir_of(bundle: Path) -> Path:
    """The ``task: cascade`` run a bundle was exported from (its manifest's source)."""
    run_dir = read_manifest(bundle).get("source", {}).get("run_dir")
    if run_dir is None:
        raise BundleError(f"{bundle}: exported from named stages, not a 'task: cascade' run; export the run (cascade export RUN_DIR) to plan its quotas")
    if not Path(run_dir).exists():
        raise BundleError(f"{bundle}: the run it was exported from, {run_dir}, is missing")
    return Path(run_dir)


def plan(bundle: Path, budgets: list[float], recall_sizes: list[int] | None = None, prerank_sizes: list[int] | None = None, requests: int = 2000, cost_requests: int = 500, seed: int = 0, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Measure the bundle's cost curves and the run's quality grid, and choose quotas for each
    budget. Returns every figure (``write``/``text`` format it)."""
    bundle = Path(bundle)
    saved = load_saved(run_dir_of(bundle), models={**MODELS, **TEACHERS})
    service = CascadeService(bundle)
    quotas = {"recall": service.cascade.recall_quota, "prerank": service.cascade.stages[0].quota, "rank": service.cascade.stages[1].quota}
    grids = default_grids(quotas, len(service.catalog.item_ids))
    fields = list(service.user_fields)
    service.close()
    recall_sizes = sorted(set(recall_sizes or grids[0]))
    prerank_sizes = sorted(set(prerank_sizes or grids[1]))
    if min(prerank_sizes) <= quotas["rank"] or min(recall_sizes) <= min(prerank_sizes):
        raise BundleError(f"quotas must shrink: every pre-rank quota above the rank quota {quotas['rank']}, the smallest recall quota above the smallest pre-rank one (got recall {recall_sizes}, pre-rank {prerank_sizes})")
    start = time.perf_counter()
    pairs = probes(recall_sizes, prerank_sizes)
    progress(f"cost: the bundle served at {len(pairs)} quota pairs {pairs}, {cost_requests} test requests each, one at a time")
    costs, _ = measure_costs(bundle, request_bodies(saved.data, fields, cost_requests), recall_sizes, prerank_sizes)
    cost_s = time.perf_counter() - start
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
        "recall_sizes": recall_sizes,
        "prerank_sizes": prerank_sizes,
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
    lines.append(f"plan for {result['bundle']} (rank quota {k} kept; joint recall@{k} on {result['quality_requests']:,} test requests, p99 of the server's cascade time over {result['cost_requests']} test requests sent one at a time{here})")
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
