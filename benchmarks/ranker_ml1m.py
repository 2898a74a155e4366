"""Is the ranker worth copying on MovieLens-1M? Every trained ranker and pre-ranker of
benchmarks/configs/distill_ml1m.yaml ranks the same recall top-200 test lists; Recall@10 and NDCG@10 of the real
positives (rating >= 4) alone and as pre-rank top-50 -> rank top-10 flows (issue 12, target 1).

    python benchmarks/ranker_ml1m.py [--config benchmarks/configs/distill_ml1m.yaml] [--names din ...] [--extra CONFIG:NAME ...]

Rankers: each experiment named (trained first if missing), most-popular (training positives), and
blends ``z(a) + w z(b)`` of two scorers (each list's scores standardised), ``w`` chosen on the
validation lists as ``task: blend`` chooses it (``cascade.blend``), reported on test. Writes benchmarks/results/ranker_ml1m.{md,json}.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch

from cascade import metrics as M
from cascade.blend import GRID, blend_weights, standardised
from cascade.config import load_config
from cascade.data.lists import build_lists
from cascade.data.schema import EXPOSED
from cascade.tasks import train_experiment
from cascade.tasks.distill import cached_scores
from cascade.models import MODELS, load_trained
from cascade.tasks.recall import task_logs
from teachers import BOOSTED, TEACHERS

from provenance import write_results

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = GRID  # the weights a blend tries (cascade.blend)


def blend(a: dict[str, np.ndarray], b: dict[str, np.ndarray], lists: dict) -> tuple[float, dict[str, np.ndarray]]:
    """``z(a) + w z(b)`` per split, each list's scores standardised and ``w`` chosen on the
    validation Recall@10, both as the tool's blended stage does (``cascade.blend``); returns (w,
    the blend's scores per split)."""
    z = {s: [standardised(torch.from_numpy(np.asarray(x[s], np.float32)), torch.from_numpy(lists[s].mask)).numpy() for x in (a, b)] for s in lists}
    _, w = blend_weights(z["valid"], lambda scores: quality(scores, lists["valid"])["recall@10"])
    return w, {s: z[s][0] + w * z[s][1] for s in lists}


def quality(scores: np.ndarray, lists, k: int = 10) -> dict[str, float]:
    return {"recall@10": M.recall_at_k(scores, lists.label, k, lists.mask), "ndcg@10": M.ndcg_at_k(scores, lists.label, k, lists.mask)}


def flow(pre: np.ndarray, rank: np.ndarray, lists, m: int = 50, k: int = 10) -> dict[str, float]:
    """Pre-ranker top-m, then the ranker orders those: quality of the final top-k."""
    passed = M.topk_membership(pre, m, lists.mask) > 0.5
    final = np.where(passed, rank, rank.min() - 1e6)
    return quality(final, lists, k)


def exposure_auc(scores: np.ndarray, lists) -> float:
    """AUC on the logged exposures (the rated items) of the lists: liked against not liked."""
    rated = lists.mask & (lists.stage == EXPOSED)
    return M.auc(lists.label[rated], scores[rated])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="benchmarks/configs/distill_ml1m.yaml")
    parser.add_argument("--names", nargs="+", default=["din", "exposure_bce", "listwise_kd"], help="experiments of --config")
    parser.add_argument("--extra", nargs="*", default=[], metavar="CONFIG:NAME", help="experiments of other configs whose models score the same lists (shown as CONFIG_STEM/NAME)")
    parser.add_argument("--out", default="ranker_ml1m", help="results name")
    args = parser.parse_args()
    models = {**MODELS, **TEACHERS}
    exps = {e.name: e for e in load_config(ROOT / args.config) if e.name in args.names}
    for spec in args.extra:
        config, name = spec.split(":")
        (e,) = load_config(ROOT / config, name)
        exps[f"{Path(config).stem}/{name}"] = e
    first = exps[args.names[0]]
    ds = task_logs(first.data, whole=True)[0]
    lists = {split: build_lists(ds, split) for split in ("valid", "test")}
    print(f"lists: valid {lists['valid'].mask.shape}, test {lists['test'].mask.shape}", flush=True)
    scores: dict[str, dict[str, np.ndarray]] = {}
    for name, exp in exps.items():
        start = time.perf_counter()
        if exp.model.name in BOOSTED:
            if not (exp.run_dir / "results.json").exists():
                train_experiment(exp, ROOT / args.config, models, BOOSTED)
            scores[name] = {s: np.load(exp.run_dir / "scores" / f"{s}.npy") for s in lists}
        else:
            model = load_trained(exp, ds, models, lambda e: train_experiment(e, ROOT / args.config, models, BOOSTED))
            # cached beside best.pt as a teacher's are (recomputed when best.pt is newer)
            scores[name] = {s: cached_scores(model, lst, exp.run_dir / "scores" / f"{s}.npy") for s, lst in lists.items()}
        print(f"scored {name} in {time.perf_counter() - start:.0f}s", flush=True)
    # most popular: positives per item in the training requests of the same logs
    train_pos = ds.candidates["item_id"][(ds.candidates["label"] > 0) & np.isin(ds.candidates["request_id"], ds.requests["request_id"][ds.requests["split"] == "train"])]
    counts = np.bincount(train_pos, minlength=int(ds.items["item_id"].max()) + 1).astype(np.float32)
    scores["most_popular"] = {s: np.where(lst.mask, counts[lst.item["item_id"]], 0.0) for s, lst in lists.items()}
    singles = list(scores)
    # blends of two scorers, weight chosen on valid Recall@10
    blends = {}
    for a, b in itertools.combinations(singles, 2):
        w, blended = blend(scores[a], scores[b], lists)
        blends[f"z({a}) + {w:g} z({b})"] = blended
    scores.update(blends)

    test = lists["test"]
    rows = []
    for name, by_split in scores.items():
        q, v = quality(by_split["test"], test), quality(by_split["valid"], lists["valid"])
        rows.append({"ranker": name, "valid_recall@10": v["recall@10"], "test_recall@10": q["recall@10"], "test_ndcg@10": q["ndcg@10"], "auc_on_rated": exposure_auc(by_split["test"], test)})
        print(rows[-1], flush=True)
    flows = []
    for pre, rank in itertools.product([n for n in scores if not n.startswith("z(") and any(p in n for p in ("exposure_bce", "listwise_kd"))], list(scores)):
        if pre in scores and pre != rank:
            f = flow(scores[pre]["test"], scores[rank]["test"], test)
            flows.append({"pre-ranker": pre, "ranker": rank, "test_recall@10": f["recall@10"], "test_ndcg@10": f["ndcg@10"]})
    lines = [
        f"# {args.out}: rankers on MovieLens-1M's recall top-200 test lists ({args.config})",
        "",
        f"{len(test):,} test lists of up to {test.list_size} (benchmarks/configs/distill_ml1m.yaml's frozen recall output); positives = rating >= 4. "
        "Blends standardise each list's scores; their weight is chosen on validation Recall@10. AUC on rated: liked vs not among the logged (rated) items.",
        "",
        "| ranker (alone, top-10 of 200) | valid Recall@10 | test Recall@10 | test NDCG@10 | AUC on rated |",
        "|---|---:|---:|---:|---:|",
        *[f"| {r['ranker']} | {r['valid_recall@10']:.4f} | {r['test_recall@10']:.4f} | {r['test_ndcg@10']:.4f} | {r['auc_on_rated']:.4f} |" for r in rows],
        "",
        "| pre-ranker top-50 -> ranker top-10 | test Recall@10 | test NDCG@10 |",
        "|---|---:|---:|",
        *[f"| {f['pre-ranker']} -> {f['ranker']} | {f['test_recall@10']:.4f} | {f['test_ndcg@10']:.4f} |" for f in flows],
    ]
    write_results(args.out, lines, {"rows": rows, "flows": flows})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
