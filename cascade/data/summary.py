"""A short, human-readable summary of a log directory (and of its truth, for a synthetic one)."""

from __future__ import annotations

import numpy as np

from cascade.data.schema import SPLITS, STAGES
from cascade.data.store import Dataset
from cascade.data.synth import World


def summarize(ds: Dataset, world: World | None = None, oracle_requests: int = 2000) -> str:
    s = ds.schema
    req, cand = ds.requests, ds.candidates
    lines = [f"dataset '{s.name}' ({'temporal' if s.temporal else 'random-split'})"]
    lines.append(f"  users {len(ds.users['user_id']):,}  items {len(ds.items['item_id']):,}  requests {len(req['request_id']):,}  candidates {len(cand['item_id']):,}")
    split_counts = "  ".join(f"{sp} {int((req['split'] == sp).sum()):,}" for sp in SPLITS)
    lines.append(f"  requests by split: {split_counts}")
    stage_counts = "  ".join(f"{name} {int((cand['stage'] == code).sum()):,}" for code, name in STAGES.items())
    lines.append(f"  candidates by last stage survived: {stage_counts}")
    exposed = cand["stage"] == 3
    if exposed.any():
        lines.append(f"  exposed: {int(exposed.sum()):,}, positive rate {cand['label'][exposed].mean():.4f}")
    lines.append(f"  history length: mean {req['history_len'].mean():.1f}, max {int(req['history_len'].max(initial=0))} (cap {s.history_max})")
    if s.quotas:
        lines.append("  logged quotas: " + " -> ".join(f"{k} {v}" for k, v in s.quotas.items()))
    fields = ", ".join(f"{f.name}[{f.side}{', multi' if f.multi else ''}, {f.vocab}]" for f in s.features.fields)
    lines.append(f"  fields: {fields}")
    if world is not None and s.quotas:
        lines.append(_oracle_line(ds, world, s.quotas["exposed"], oracle_requests))
    return "\n".join(lines)


def _oracle_line(ds: Dataset, world: World, k: int, n: int) -> str:
    """How much true utility the logged cascade's exposed items reach against the best
    achievable top-k of the catalog (history excluded), over the first n test requests."""
    req, cand = ds.requests, ds.candidates
    test = np.flatnonzero(req["split"] == "test")[:n]
    rid = req["request_id"][test]
    rows = np.isin(cand["request_id"], rid) & (cand["stage"] == 3)
    order = np.argsort(cand["request_id"][rows], kind="stable")
    shown = cand["item_id"][rows][order].reshape(len(rid), -1)
    _, best = world.best_topk(rid, k, exclude=req["history"][test])
    got = world.click_prob(rid, shown).sum(axis=1)
    return (
        f"  oracle (test, {len(rid):,} requests): logged top-{k} true utility {got.mean():.3f} "
        f"/ best achievable {best.sum(axis=1).mean():.3f} = ratio {got.sum() / best.sum():.3f}"
    )
