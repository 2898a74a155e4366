"""The report's opening: what the figures say, in sentences, each difference against its noise.

The noise of a figure is the std of its seeds where a cascade ran with several, else a bootstrap
over the test requests (``metrics.per_request``: each request's joint recall, for the cascade and
for each baseline pre-ranker between the same recall and ranker). A difference whose interval
holds 0 is called level, not a win.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RESAMPLES = 1000
STAGE_WORDS = {"recall": "recall", "prerank": "pre-rank", "rank": "rank"}
BASELINE_NAMES = {"random_prerank": "a random pre-ranker", "popularity_prerank": "a popularity pre-ranker", "trending_prerank": "a trending pre-ranker"}


@dataclass(frozen=True)
class Estimate:
    """A figure (or a difference of two) with its 95% interval and how that was found."""

    value: float
    low: float
    high: float
    how: str  # "bootstrap over N test requests" or "N seeds"

    @property
    def level(self) -> bool:
        """The interval holds 0 (for a difference: no winner)."""
        return self.low <= 0.0 <= self.high

    def interval(self) -> str:
        return f"95% CI {self.low:.4f} to {self.high:.4f}, {self.how}"


def bootstrap_mean(values: np.ndarray, seed: int = 0, resamples: int = RESAMPLES, chunk: int = 100) -> tuple[float, float]:
    """The 2.5% and 97.5% percentiles of the mean of ``values`` (R,) over ``resamples`` resamples
    of its rows with replacement."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.concatenate([values[rng.integers(0, len(values), (min(chunk, resamples - i), len(values)))].mean(axis=1) for i in range(0, resamples, chunk)])
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def _per_request(entry: dict, flow: str) -> dict[int, float] | None:
    rows = entry.get("metrics", {}).get("per_request", {})
    if flow not in rows or "request_id" not in rows:
        return None
    return dict(zip(rows["request_id"], rows[flow]))


def _values(group: list[dict], *path: str) -> list[float]:
    """The number at ``metrics/<path>`` of each entry that has one."""
    values = []
    for e in group:
        node = e["metrics"]
        for part in path:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, (int, float)):
            values.append(float(node))
    return values


def _flow_path(flow: str) -> tuple[str, ...]:
    """Where a flow's figures sit: the cascade's own ("flow"), or a baseline pre-ranker's."""
    return ("flow",) if flow == "flow" else ("baselines", flow)


def difference(a: list[dict], b: list[dict], flow_a: str = "flow", flow_b: str = "flow") -> Estimate | None:
    """Joint recall of ``a``'s flow minus ``b``'s (``flow``: the cascade, or a baseline pre-ranker's
    name); with several seeds, the difference of their means with 2 standard errors, else a
    paired bootstrap over the requests both were evaluated on. ``b`` empty: ``a`` alone."""
    if len(a) > 1 or len(b) > 1:
        xa, xb = _values(a, *_flow_path(flow_a), "joint_recall"), _values(b, *_flow_path(flow_b), "joint_recall")
        if len(xa) < 2 or (b and len(xb) < 2):
            return None
        mean = float(np.mean(xa) - (np.mean(xb) if b else 0.0))
        se = math.sqrt(np.var(xa, ddof=1) / len(xa) + (np.var(xb, ddof=1) / len(xb) if b else 0.0))
        return Estimate(mean, mean - 2 * se, mean + 2 * se, f"{len(xa)} seeds" if not b or len(xa) == len(xb) else f"{len(xa)} and {len(xb)} seeds")
    ra = _per_request(a[0], flow_a)
    rb = _per_request(b[0], flow_b) if b else {}
    if ra is None or rb is None:
        return None
    common = [r for r in ra if not b or r in rb]
    if not common:
        return None
    d = np.array([ra[r] - (rb[r] if b else 0.0) for r in common])
    low, high = bootstrap_mean(d)
    return Estimate(float(d.mean()), low, high, f"bootstrap over {len(common):,} test requests")


def _mean(group: list[dict], *path: str) -> float:
    values = _values(group, *path)
    return float(np.mean(values)) if values else math.nan


def stage_losses(group: list[dict]) -> dict[str, tuple[float, float]]:
    """Per stage (recall, pre-rank, rank): the share of the logged positives lost there, and of
    the best achievable true utility (NaN without a world). Each column adds up to 1 minus what
    the cascade shows (joint recall; the oracle ratio)."""
    retrieved, after_pre, joint = (_mean(group, "flow", k) for k in ("positives_retrieved", "positives_after_prerank", "joint_recall"))
    positives = {"recall": 1.0 - retrieved, "prerank": retrieved - after_pre, "rank": after_pre - joint}
    return {stage: (lost, _mean(group, "flow", f"blame_{stage}")) for stage, lost in positives.items()}


def _fmt(estimate: Estimate | None, value: float) -> str:
    return f"{value:.4f}" + (f" ({estimate.interval()})" if estimate else "")


def verdict(groups: dict[str, list[dict]]) -> tuple[list[str], dict | None]:
    """Sentences (markdown) and the stage-loss table of the best cascade, from the cascades'
    entries by label (seeds of one label together)."""
    if not groups:
        return [], None
    score = {label: _mean(g, "flow", "joint_recall") for label, g in groups.items()}
    best = max(score, key=lambda label: -math.inf if math.isnan(score[label]) else score[label])
    g = groups[best]
    k = g[0]["metrics"]["quotas"]["rank"]
    lines = [f"**Best cascade: {best}**, joint recall {_fmt(difference(g, []), score[best])}: the share of the test requests' logged positives in its final top-{k}."]

    teacher_of = {label: grp[0].get("prerank", {}).get("distilled_from") for label, grp in groups.items()}
    independent = [label for label, t in teacher_of.items() if t is None and "prerank" in groups[label][0]]
    distilled = [label for label, t in teacher_of.items() if t is not None]
    if independent and distilled:
        ind = max(independent, key=lambda label: score[label])
        dist = max(distilled, key=lambda label: score[label])
        d = difference(groups[dist], groups[ind])
        change = f"{(score[dist] / score[ind] - 1):+.0%}" if score[ind] > 0 else "n/a"
        said = "" if d is None else (f"; the difference {d.value:+.4f} is within noise ({d.interval()})" if d.level else f"; the difference {d.value:+.4f} is beyond noise ({d.interval()})")
        lines.append(f"**Distillation** (the pre-ranker distilled from {teacher_of[dist]}): joint recall {ind} {score[ind]:.4f} (independent pre-ranker) -> {dist} {score[dist]:.4f}, {change}{said}.")

    baseline_scores = {name: _mean(g, "baselines", name, "joint_recall") for name in BASELINE_NAMES}
    baseline_scores = {n: v for n, v in baseline_scores.items() if not math.isnan(v)}
    if baseline_scores:
        name = max(baseline_scores, key=baseline_scores.get)
        d = difference(g, g, "flow", name)
        if d is None:
            how = "above" if score[best] > baseline_scores[name] else "level with or above"
            judged = f"the trained pre-ranker is {how} it (no per-request figures to weigh the difference)"
        elif d.level:
            judged = f"**level with the trained pre-ranker** (difference {d.value:+.4f}, {d.interval()}): here the trained pre-ranker does not earn its cost"
        elif d.value < 0:
            judged = f"**above the trained pre-ranker** by {-d.value:.4f} ({d.interval()}): here a pre-ranker without a model wins"
        else:
            judged = f"below the trained pre-ranker by {d.value:.4f} ({d.interval()})"
        lines.append(f"**Best baseline:** {BASELINE_NAMES[name]} between the same recall and ranker reaches {baseline_scores[name]:.4f}, {judged}.")

    n = g[0]["metrics"]["quotas"]["recall"]
    kept = {name: _mean(g, "baselines", name, f"positives_kept@{n}") for name in ("recall", "most_popular_recall", "trending_recall")}
    if not math.isnan(kept["recall"]):
        others = {name: v for name, v in kept.items() if name != "recall" and not math.isnan(v)}
        said = ", ".join(f"{name.replace('_', ' ')} {v:.4f}" for name, v in others.items())
        beaten = [name.replace("_", " ") for name, v in others.items() if v >= kept["recall"]]
        lines.append(
            f"**Recall** keeps {kept['recall']:.4f} of the logged positives in its top-{n}" + (f" (without a model: {said})" if said else "")
            + (f"; **{' and '.join(beaten)} {'keeps' if len(beaten) == 1 else 'keep'} as many or more** (means over the same requests, no interval)." if beaten else ".")
        )

    losses = stage_losses(g)
    has_utility = not any(math.isnan(u) for _, u in losses.values())
    by_positives = max(losses, key=lambda s: losses[s][0])
    rows = [[STAGE_WORDS[stage], f"{p:.4f}"] + ([f"{u:.4f}"] if has_utility else []) for stage, (p, u) in losses.items()]
    table = {"header": ["stage", "logged positives lost here"] + (["true utility lost here (blame)"] if has_utility else []), "rows": rows}
    sentence = f"**Where {best} loses most:** {STAGE_WORDS[by_positives]}, {losses[by_positives][0]:.4f} of the logged positives"
    if has_utility:
        by_utility = max(losses, key=lambda s: losses[s][1])
        sentence += f"; by true utility, {STAGE_WORDS[by_utility]} ({losses[by_utility][1]:.4f} of the best achievable)."
        if by_utility != by_positives:
            (pp, pu), (up, uu) = losses[by_positives], losses[by_utility]
            sentence += (
                f" The two disagree because they count different things: {STAGE_WORDS[by_positives]} drops {pp:.4f} of the logged positives but only {pu:.4f} of the utility, "
                f"{STAGE_WORDS[by_utility]} {up:.4f} and {uu:.4f}. A logged positive counts wherever it sits in the list; utility counts only the items good enough for the catalog's best top-{k}, "
                f"so {STAGE_WORDS[by_positives]} mostly drops items that would not have been shown."
            )
    else:
        sentence += " (the true utility each stage loses needs a synthetic world's truth)."
    lines.append(sentence)
    return lines, table
