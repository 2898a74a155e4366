"""A LightGBM ranker teacher over user, item and history-cross features.

Features per (request, candidate):
* every user and item field as a LightGBM categorical (multi-valued fields with at most
  ``MULTI_HOT_MAX`` values as multi-hot columns instead);
* history crosses: for each item field other than ``item_id`` with at most ``CROSS_MAX`` values,
  how many history items share a value with the candidate (e.g. history movies sharing a genre
  with the target), and that count over the history length;
* the history length.

``objective="lambdarank"`` trains one query group per request (scores are meaningful only within
a list: an order-only teacher); ``"binary"`` trains a CTR model on the samples. Both answer
``score(lists) -> (B, N)`` (0 at padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import lightgbm as lgb
import numpy as np

from cascade.data.lists import ListBatch
from cascade.data.store import write_atomic, write_text_atomic
from cascade.features import FeatureSpec
from cascade.saved import write_results

MULTI_HOT_MAX = 64
CROSS_MAX = 1000


@dataclass(frozen=True)
class GBDTConfig:
    objective: str = "lambdarank"  # lambdarank | binary
    num_leaves: int = 63
    learning_rate: float = 0.05
    n_estimators: int = 500
    early_stopping: int = 30
    min_data_in_leaf: int = 50
    seed: int = 0
    threads: int = 2


class GBDTTeacher:
    """``drop``: fields it does not use (``model.drop_fields``, as for the torch models)."""

    def __init__(self, spec: FeatureSpec, items: dict[str, np.ndarray], cfg: GBDTConfig = GBDTConfig(), drop: tuple[str, ...] = ()):
        if cfg.objective not in ("lambdarank", "binary"):
            raise ValueError(f"objective {cfg.objective!r} is not 'lambdarank' or 'binary'")
        unknown = sorted(set(drop) - set(spec.names) - {"history"})
        if unknown:
            raise ValueError(f"drop_fields: unknown field '{unknown[0]}' (have: {', '.join(spec.names)}, history)")
        spec = FeatureSpec(tuple(f for f in spec.fields if f.name not in drop))
        self.spec, self.cfg, self.use_history = spec, cfg, "history" not in drop
        # item field values by item id (row 0: padding), for the history crosses
        n = int(items["item_id"].max()) + 1
        self._by_id = {}
        for f in spec.side("item"):
            if f.name in items and f.name != "item_id" and f.vocab <= CROSS_MAX:
                v = items[f.name]
                table = np.zeros((n,) + v.shape[1:], dtype=np.int64)
                table[items["item_id"]] = v
                self._by_id[f.name] = table.reshape(n, -1)
        self.booster: lgb.Booster | None = None
        self.feature_names: list[str] = []

    # ---------------------------------------------------------------- features

    def history_crosses(self, lists: ListBatch) -> dict[str, np.ndarray]:
        """Per item field f: (B, N) count of history items sharing a value of f with the candidate."""
        hist = lists.history
        valid = hist > 0
        out = {}
        for name, table in self._by_id.items():
            vocab = self.spec[name].vocab
            values = table[hist]  # (B, L, m)
            # counts[b, v] = how many history items of list b carry value v
            counts = np.zeros((len(hist), vocab + 1))
            rows = np.broadcast_to(np.arange(len(hist))[:, None, None], values.shape)
            np.add.at(counts, (rows[valid], values[valid]), 1.0)
            counts[:, 0] = 0.0
            target = lists.item[name].reshape(*lists.mask.shape, -1)  # (B, N, m)
            # an item counts once per shared value; values within one item are distinct
            out[name] = np.take_along_axis(counts, target.reshape(len(hist), -1), 1).reshape(target.shape).sum(axis=2)
        return out

    def features(self, lists: ListBatch) -> tuple[np.ndarray, list[str], list[str]]:
        """(rows, K) float32 over valid positions in list order, the column names, and which
        columns are categorical."""
        rows, cols = np.nonzero(lists.mask)
        columns, names, categorical = [], [], []
        for side, table in (("user", lists.user), ("item", lists.item)):
            for f in self.spec.side(side):
                if f.name not in table:
                    continue
                v = table[f.name]
                v = v[rows, cols] if side == "item" or f.table == "candidates" else v[rows]
                if f.multi:
                    if f.vocab > MULTI_HOT_MAX:
                        continue
                    hot = np.zeros((len(v), f.vocab + 1), dtype=np.float32)
                    np.put_along_axis(hot, v.reshape(len(v), -1), 1.0, axis=1)
                    columns.append(hot[:, 1:])
                    names += [f"{f.name}={i}" for i in range(1, f.vocab + 1)]
                else:
                    columns.append(v.reshape(-1, 1).astype(np.float32))
                    names.append(f.name)
                    categorical.append(f.name)
        if self.use_history:
            length = (lists.history > 0).sum(axis=1)
            for name, count in self.history_crosses(lists).items():
                c = count[rows, cols]
                columns += [c[:, None], (c / np.maximum(length[rows], 1))[:, None]]
                names += [f"history_shares_{name}", f"history_share_rate_{name}"]
            columns.append(length[rows][:, None].astype(np.float32))
            names.append("history_len")
        return np.concatenate(columns, axis=1).astype(np.float32), names, categorical

    # ---------------------------------------------------------------- training and scoring

    def _dataset(self, lists: ListBatch, reference: lgb.Dataset | None = None) -> lgb.Dataset:
        x, names, categorical = self.features(lists)
        self.feature_names = names
        label = lists.label[lists.mask]
        group = lists.mask.sum(axis=1) if self.cfg.objective == "lambdarank" else None
        if self.cfg.objective == "lambdarank":
            label = np.rint(label).astype(np.int64)
            # A list holds its logged items first (deepest stage first), and LightGBM's NDCG breaks
            # score ties by position: unshuffled, a model of few distinct scores (one tree) would
            # inherit the logged order and look best, and early stopping would keep it. A seeded
            # shuffle within each list makes a tie carry no label.
            list_of_row = np.repeat(np.arange(len(group)), group)
            order = np.lexsort((np.random.default_rng(self.cfg.seed).random(len(label)), list_of_row))
            x, label = x[order], label[order]
        return lgb.Dataset(x, label=label, group=group, feature_name=names, categorical_feature=categorical, reference=reference, free_raw_data=False)

    def fit(self, train: ListBatch, valid: ListBatch) -> dict[str, float]:
        """Train with early stopping on the validation lists; returns the best validation score."""
        cfg = self.cfg
        train_set = self._dataset(train)
        valid_set = self._dataset(valid, reference=train_set)
        params = {
            "objective": cfg.objective,
            "metric": "ndcg" if cfg.objective == "lambdarank" else "auc",
            "num_leaves": cfg.num_leaves,
            "learning_rate": cfg.learning_rate,
            "min_data_in_leaf": cfg.min_data_in_leaf,
            "seed": cfg.seed,
            "deterministic": True,
            "num_threads": cfg.threads,
            "verbosity": -1,
        }
        if cfg.objective == "lambdarank":
            params["eval_at"] = [10]
        self.booster = lgb.train(params, train_set, num_boost_round=cfg.n_estimators, valid_sets=[valid_set], callbacks=[lgb.early_stopping(cfg.early_stopping, verbose=False)])
        return {k: float(v) for k, v in self.booster.best_score["valid_0"].items()}

    def score(self, lists: ListBatch) -> np.ndarray:
        """Raw scores (B, N): logits for ``binary``, order-only list scores for ``lambdarank``; 0 at
        padding."""
        if self.booster is None:
            raise RuntimeError("fit the teacher first")
        x, _, _ = self.features(lists)
        out = np.zeros(lists.mask.shape, dtype=np.float32)
        # raw scores: logits for binary (the teacher contract), list scores for lambdarank
        out[lists.mask] = self.booster.predict(x, num_iteration=self.booster.best_iteration, raw_score=True)
        return out


def _teacher(exp, ds, cfg: GBDTConfig) -> GBDTTeacher:
    from cascade.config import ConfigError

    try:
        return GBDTTeacher(ds.schema.features, ds.items, cfg, tuple(exp.model.drop_fields))
    except ValueError as e:
        raise ConfigError(f"{exp.where}.model.{e}") from None


def train_gbdt(exp) -> dict:
    """`cascade train` for ``model.name: gbdt``. ``task: pointwise``: a binary LightGBM on logged
    exposures, early stopping on validation AUC, scored on test like the neural models.
    ``task: distill`` (with ``distill.teacher: null``): a ranker on the flow's lists, see
    ``train_gbdt_lists``."""
    import time

    from cascade.config import ConfigError
    from cascade.data.schema import EXPOSED
    from cascade.data.lists import pointwise_lists
    from cascade.tasks.pointwise import pointwise_metrics
    from cascade.tasks.recall import task_logs

    if exp.task == "distill":
        return train_gbdt_lists(exp)
    if exp.task != "pointwise":
        raise ConfigError(f"{exp.where}.task: model 'gbdt' trains as 'pointwise' or 'distill', not '{exp.task}'")
    ds, _ = task_logs(exp.data, whole=True)
    try:
        cfg = GBDTConfig(**{"objective": "binary", "seed": exp.train.seed, **exp.model.params})
    except TypeError as e:
        raise ConfigError(f"{exp.where}.model.params: {e}") from None
    flat = {}
    for split in ("train", "valid", "test"):
        f = pointwise_lists(ds, split)
        flat[split] = f.take(np.flatnonzero(f.stage[:, 0] == EXPOSED))
    teacher = _teacher(exp, ds, cfg)
    start = time.perf_counter()
    teacher.fit(flat["train"], flat["valid"])
    seconds = time.perf_counter() - start
    result = {
        "experiment": exp.name,
        "model": "gbdt",
        "trees": teacher.booster.best_iteration,
        "valid": pointwise_metrics(teacher.score(flat["valid"]), flat["valid"].label, flat["valid"].request_id),
        "test": pointwise_metrics(teacher.score(flat["test"]), flat["test"].label, flat["test"].request_id),
        "train_seconds": seconds,
    }
    exp.run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(exp.run_dir / "model.txt", teacher.booster.model_to_string())
    write_results(exp.run_dir, result)  # last: the mark of a complete run
    return result


def train_gbdt_lists(exp) -> dict:
    """A LightGBM ranker on its own candidate space, the teacher of a distill run: one query group
    per request's list (the frozen recall output; unexposed items are label 0), ``lambdarank`` by
    default (an order-only teacher), early stopping on validation NDCG@10. Writes ``model.txt``,
    its scores of every split's lists to ``scores/SPLIT.npy`` (what ``flow.train_distill`` reads)
    and ``results.json`` with the flow's report of itself as its own pre-ranker."""
    import time

    from cascade.config import ConfigError
    from cascade.data.lists import build_lists
    from cascade.tasks.distill import cascade_report
    from cascade.tasks.recall import task_logs

    if exp.distill.teacher is not None:
        raise ConfigError(f"{exp.where}.distill.teacher: a 'gbdt' ranker trains on labels only, so it takes no teacher (got '{exp.distill.teacher}')")
    ds, _ = task_logs(exp.data, whole=True)
    try:
        cfg = GBDTConfig(**{"seed": exp.train.seed, **exp.model.params})
    except TypeError as e:
        raise ConfigError(f"{exp.where}.model.params: {e}") from None
    lists = {split: build_lists(ds, split) for split in ("train", "valid", "test")}
    teacher = _teacher(exp, ds, cfg)
    start = time.perf_counter()
    best = teacher.fit(lists["train"], lists["valid"])
    seconds = time.perf_counter() - start
    (exp.run_dir / "scores").mkdir(parents=True, exist_ok=True)
    scores = {}
    for split, lst in lists.items():
        scores[split] = teacher.score(lst)
        write_atomic(exp.run_dir / "scores" / f"{split}.npy", lambda f: np.save(f, scores[split]))
    write_text_atomic(exp.run_dir / "model.txt", teacher.booster.model_to_string())
    test = cascade_report(scores["test"], scores["test"], lists["test"], exp.distill)
    result = {"experiment": exp.name, "model": "gbdt", "task": "distill", "objective": cfg.objective, "trees": teacher.booster.best_iteration, "valid": best, "test": test, "train_seconds": seconds}
    write_results(exp.run_dir, result)  # last: the mark of a complete run
    return result
