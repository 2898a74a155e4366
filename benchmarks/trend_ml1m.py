"""Issue 12 on MovieLens-1M: the ranker and the cascade with and without the items' trend.

    python benchmarks/trend_ml1m.py [--seeds 0 1 2] [--name trend_ml1m] [--configs CONFIG[:RANKER,INDEPENDENT,DISTILLED[,DISTILLED...]][@SEEDS] ...]

(``@0,1`` gives that config its own seeds, e.g. ``benchmarks/configs/distill_ml1m.yaml@0`` to show a config's seed-0
runs beside another's three seeds.)

For each config and seed, the ranker (``din``), the independent pre-ranker (``exposure_bce``) and
the pre-rankers distilled from that seed's ranker (``listwise_kd``, or several students, e.g. the
enhanced towers; a config may name a ranker alone, e.g. LightGBM's ``gbdt_oof_list``) are trained (seed 0 is the
config's own run folder; other seeds run in runs/bench_seeds/; finished runs are read), then
score the config's frozen recall top-200 lists (the recall tower of configs/ml1m_recall.yaml, the
same lists in both configs). Reported on test, mean ± std over seeds:

* each scorer alone ranking the 200 (Recall@10, NDCG@10 of the real positives, rating >= 4), and
  two built-in scorers with no training: most-popular (training positives) and trending (ratings
  of the item in the window before the request, the window chosen on validation);
* the cascades recall top-200 -> pre-rank top-50 -> rank top-10: Recall@10 / NDCG@10 over the
  lists, and joint recall, the share of each request's logged positives (those recall never
  retrieved count as lost) in the final top-10 (``metrics.joint_recall``, as ``cascade eval``);
* the ranker blended with trending, ``z(ranker) + w z(trending)`` (each list standardised, ``w``
  chosen per seed on valid), alone and as the rank stage of each pre-ranker's cascade.

Writes benchmarks/results/NAME.{md,json} (``--name``, trend_ml1m by default).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from cascade import metrics as M
from cascade.config import load_config
from cascade.data.lists import build_lists
from cascade.data.trend import ItemTrend
from cascade.tasks.distill import cached_scores, train_distill
from cascade.tasks import train_experiment
from cascade.tasks.stage_data import StageData
from cascade.models import MODELS, load_trained
from cascade.tasks.recall import task_logs
from teachers import BOOSTED, TEACHERS

from provenance import mean_std, seeded, write_results
from ranker_ml1m import WEIGHTS, blend, flow, quality

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("din", "exposure_bce", "listwise_kd")
TREND_DAYS = (1, 3, 7, 14, 30, 90, 365)
PRERANK, RANK = 50, 10


def train_and_score(config: Path, names: tuple[str, ...], seed: int, lists: dict, ds):
    """Yields (name, scores (B, N) per split) for the ranker, the independent and the distilled
    pre-rankers (``names``, in that order) at ``seed``, each trained first where missing, so the
    tables can be rewritten as each student finishes."""
    models = {**MODELS, **TEACHERS}
    exps = {e.name: e for e in load_config(config) if e.name in names}
    ranker = seeded(exps[names[0]], seed)
    for name in names:
        exp = seeded(exps[name], seed)
        teacher = None if name == names[0] else ranker
        start = time.perf_counter()
        if exp.model.name in BOOSTED:  # LightGBM writes its scores of every split when it trains
            if not (exp.run_dir / "results.json").exists():
                BOOSTED[exp.model.name](exp)
            scores = {s: np.load(exp.run_dir / "scores" / f"{s}.npy") for s in lists}
        else:
            # a missing teacher is trained by its task, LightGBM by its own trainer
            model = load_trained(exp, ds, models, lambda e: train_distill(e, teacher, models, lambda t: train_experiment(t, config, models, BOOSTED)))
            scores = {s: cached_scores(model, lst, exp.run_dir / "scores" / f"{s}.npy") for s, lst in lists.items()}
        print(f"{config.stem} seed {seed}: {name} ready in {time.perf_counter() - start:.0f}s", flush=True)
        yield name, scores


def cascade_quality(pre: np.ndarray, rank: np.ndarray, lists, n_positives: np.ndarray) -> dict[str, float]:
    """pre-rank top-50 -> rank top-10 over the lists: their Recall@10 / NDCG@10 and joint recall."""
    positive = lists.mask & (lists.label > 0)
    return {**flow(pre, rank, lists, PRERANK, RANK), "joint_recall": M.joint_recall([pre, rank], [PRERANK, RANK], positive, lists.mask, n_positives)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--name", default="trend_ml1m", help="the results' name: benchmarks/results/NAME.{md,json}")
    parser.add_argument("--configs", nargs="+", default=["benchmarks/configs/ml1m_trend.yaml:din_oof,exposure_bce_oof,listwise_kd_oof", "benchmarks/configs/distill_ml1m.yaml"], help="CONFIG[:RANKER,INDEPENDENT,DISTILLED[,DISTILLED...]][@SEED,SEED] (default names: din,exposure_bce,listwise_kd; default seeds: --seeds)")
    args = parser.parse_args()
    alone: dict[str, list[dict]] = {}
    cascades: dict[str, list[dict]] = {}
    fixed: dict[str, dict] = {}
    for spec in args.configs:
        spec, _, own_seeds = spec.partition("@")
        seeds = [int(x) for x in own_seeds.split(",")] if own_seeds else args.seeds
        config, _, picked = spec.partition(":")
        config = Path(config)
        names = tuple(picked.split(",")) if picked else NAMES
        first = next(e for e in load_config(ROOT / config) if e.name == names[0])
        ds = task_logs(first.data, whole=True)[0]
        lists = {s: build_lists(ds, s) for s in ("valid", "test")}
        (recall_exp,) = load_config(ROOT / config.parent / first.data.recall["config"], first.data.recall["experiment"])
        base = task_logs(recall_exp.data, whole=True)[0]
        n_pos = StageData(base).positives(lists["test"].request_id)  # every logged positive, retrieved or not
        if not fixed:  # the scorers with no training, once (both configs hold the same lists)
            tr = base.candidates
            train_pos = tr["item_id"][(tr["label"] > 0) & np.isin(tr["request_id"], base.requests["request_id"][base.requests["split"] == "train"])]
            counts = np.bincount(train_pos, minlength=int(base.items["item_id"].max()) + 1).astype(np.float64)
            fixed["most_popular"] = {s: np.where(lst.mask, counts[lst.item["item_id"]], 0.0) for s, lst in lists.items()}
            trend = ItemTrend.from_dataset(base)
            by_window = {d: {s: trend.counts(lst.item["item_id"], lst.ts, d).astype(np.float64) for s, lst in lists.items()} for d in TREND_DAYS}
            valid = {d: quality(by_window[d]["valid"], lists["valid"])["recall@10"] for d in TREND_DAYS}
            best = max(TREND_DAYS, key=valid.get)
            print("trending, valid Recall@10 by window (days):", {d: round(v, 4) for d, v in valid.items()}, flush=True)
            fixed[f"trending ({best}-day window, chosen on valid)"] = trending_scores = by_window[best]
            for name, s in fixed.items():
                alone[name] = [{**quality(s["test"], lists["test"]), "valid_recall@10": quality(s["valid"], lists["valid"])["recall@10"]}]
        for seed in seeds:
            scores = {}
            for name, s in train_and_score(ROOT / config, names, seed, lists, ds):
                scores[name] = s
                alone.setdefault(f"{config.stem}/{name}", []).append({**quality(s["test"], lists["test"]), "valid_recall@10": quality(s["valid"], lists["valid"])["recall@10"], "teacher_recall@10@50": M.teacher_recall_at_k_at_m(s["test"], scores[names[0]]["test"], RANK, PRERANK, lists["test"].mask)})
                if name == names[0]:  # the ranker blended with trending, its weight chosen on valid
                    weight, with_trend = blend(s, trending_scores, lists)
                    alone.setdefault(f"{config.stem}/{name} + trending (z-blend, weight on valid)", []).append({**quality(with_trend["test"], lists["test"]), "valid_recall@10": quality(with_trend["valid"], lists["valid"])["recall@10"], "weight": weight})
                else:  # a pre-ranker: its cascades into the ranker, into trending and into their blend
                    for ranker, rank_scores in ((names[0], scores[names[0]]), ("trending", trending_scores), (f"{names[0]} + trending", with_trend)):
                        row = cascade_quality(s["test"], rank_scores["test"], lists["test"], n_pos)
                        cascades.setdefault(f"{config.stem}: {name} -> {ranker}", []).append(row)
                write(alone, cascades, args)


def write(alone: dict, cascades: dict, args) -> None:
    weights = "; ".join(n.split(" + ")[0] + ": " + ", ".join(f"{r['weight']:g}" for r in rs) for n, rs in alone.items() if "weight" in rs[0])
    lines = [
        f"# {args.name}: the ranker and the cascade on MovieLens-1M, with and without the items' trend",
        "",
        "The recall tower's top-200 test lists (9,350 requests, configs/ml1m_recall.yaml); positives = rating >= 4.",
        "The models of a config with `recall.trend_days` see each candidate's item trend (ratings of the item in the",
        "1, 7, 30 and 365 days before the request, only ratings strictly before it; with `trend_scale: list` as the",
        "candidate's percentile in its list; cascade/data/trend.py); `ml1m` models do not.",
        "Test split, mean ± population std over the seeds finished for each row (each seed trains the ranker and",
        "the pre-rankers; the tables are rewritten as each one finishes;",
        "`listwise_kd` and the other students are distilled from the same seed's ranker (each config's first",
        "name, `din` by default); teacher Recall@10@50: the share of that ranker's top-10 in the scorer's top-50).",
        "",
        "| scorer alone (top-10 of 200) | seeds | valid Recall@10 | test Recall@10 | test NDCG@10 | test teacher Recall@10@50 |",
        "|---|---:|---|---|---|---|",
        *[f"| {n} | {len(rs)} | {mean_std([r['valid_recall@10'] for r in rs])} | {mean_std([r['recall@10'] for r in rs])} | {mean_std([r['ndcg@10'] for r in rs])} | {mean_std([r['teacher_recall@10@50'] for r in rs]) if 'teacher_recall@10@50' in rs[0] else '-'} |" for n, rs in alone.items()],
        "",
        f"A z-blend: z(ranker) + w z(trending), each list's scores standardised, w in {{{', '.join(f'{w:g}' for w in WEIGHTS)}}}",
        f"chosen per seed on valid Recall@10 (weights chosen: {weights}).",
        "",
        f"| cascade: recall top-200 -> pre-rank top-{PRERANK} -> rank top-{RANK} | seeds | Recall@10 (in the lists) | NDCG@10 | joint recall |",
        "|---|---:|---|---|---|",
        *[f"| {n} | {len(rs)} | {mean_std([r['recall@10'] for r in rs])} | {mean_std([r['ndcg@10'] for r in rs])} | {mean_std([r['joint_recall'] for r in rs])} |" for n, rs in cascades.items()],
        "",
        "Joint recall: the share of each request's logged positives in the final top-10, those the recall",
        "never retrieved counted as lost, mean over test requests with a positive (as `cascade eval`).",
    ]
    write_results(args.name, lines, {"alone": alone, "cascades": cascades})
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
