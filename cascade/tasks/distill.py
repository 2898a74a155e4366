"""``task: distill``: a pre-ranker distilled from the ranker after it, on the lists it serves.

The recall output is frozen: every stage-0 candidate a request logged (the synthetic world's
200 recalled items; see DESIGN.md, "Lists, stages and teachers"). The pre-ranker scores that
list and passes its top ``prerank_quota`` on; the ranker (the frozen teacher) picks its top
``rank_quota`` of those. ``train_distill`` trains a pre-ranker on those lists with a mix of
losses (``DistillConfig``), each a pure function of ``cascade.losses``, against the teacher's
scores of every candidate, unexposed ones included; ``cascade_report`` scores the result.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from cascade.blend import BLEND
from cascade import metrics as M
from cascade.config import ConfigError, DistillConfig, load_config
from cascade.data.lists import ListBatch, build_lists, concat_lists
from cascade.data.schema import EXPOSED
from cascade.data.stream import ListStream
from cascade.losses.arf import UncertaintyWeights, global_loss, relax_bce
from cascade.losses.distill import listwise_kd, logit_mse, soft_bce
from cascade.losses.pointwise import bce
from cascade.losses.rankflow import tutor
from cascade.losses.sorting import hard_sort, neural_sort, top_k_indicator
from cascade.data.synth import WORLD_FILE, World
from cascade.distributed import rank_zero_first
from cascade.saved import finished, write_results
from cascade.models import build_model, list_tensors, load_trained, score_lists, training_forward
from cascade.tasks.pointwise import train_pointwise
from cascade.tasks.recall import task_logs
from cascade.train import StreamedTensors, Tensors, Trainer


class DistillLoss(nn.Module):
    """The configured mix over a batch of lists; holds ARF's learnable log sigma, if used."""

    def __init__(self, cfg: DistillConfig):
        super().__init__()
        self.cfg = cfg
        self.arf_weights = UncertaintyWeights(1) if cfg.arf > 0 else None

    def forward(self, logits: torch.Tensor, batch: Tensors) -> torch.Tensor:
        """logits (B, N) of the student on ``batch`` -> ()."""
        cfg, mask, t = self.cfg, batch.mask, batch.teacher
        total = logits.new_zeros(())
        if cfg.exposure_bce:
            total = total + cfg.exposure_bce * bce(logits, batch.label, mask & (batch.stage == EXPOSED))
        if cfg.rankflow_bce:
            total = total + cfg.rankflow_bce * bce(logits, batch.label, mask)
        if cfg.tutor:
            total = total + cfg.tutor * tutor(logits, t, mask, cfg.rank_quota, cfg.tutor_alpha)
        if cfg.arf:
            p_hat = neural_sort(logits, mask, cfg.arf_tau)
            g = top_k_indicator(t, mask, cfg.rank_quota)  # ground truth: the teacher's top-k
            relax = relax_bce(p_hat, g, mask, cfg.prerank_quota)
            opa = global_loss(p_hat, hard_sort(t, mask), mask, cfg.arf_global_rows)
            total = total + cfg.arf * self.arf_weights(relax, opa)
        if cfg.listwise_kd:
            total = total + cfg.listwise_kd * listwise_kd(logits, t, mask, cfg.kd_temperature)
        if cfg.logit_mse:
            total = total + cfg.logit_mse * logit_mse(logits, t, mask)
        if cfg.soft_bce:
            total = total + cfg.soft_bce * soft_bce(logits, t, mask)
        return total


REPORT_CELLS = 1 << 20  # candidates a report reads at once: its metrics' (rows, N) temporaries stay bounded


def cascade_report(student: np.ndarray, teacher: np.ndarray, lists: ListBatch, cfg: DistillConfig, world=None) -> dict[str, float]:
    """How the flow pre-ranker (top ``prerank_quota``) -> teacher (top ``rank_quota``) does.

    student, teacher (B, N) over the frozen recall output. Teacher consistency Recall@k@k,
    Recall@k@20 and Recall@k@m (k = rank_quota, m = prerank_quota); Recall@k and NDCG@k of the real positives in
    the final top-k, out of all positives of the list; with a synthetic ``world``, the oracle
    ratio: true utility of the final top-k over the best top-k of the catalog (history excluded).
    """
    return M.means(report_totals(student, teacher, lists, cfg, world))


def report_totals(student: np.ndarray, teacher: np.ndarray, lists: ListBatch, cfg: DistillConfig, world=None) -> M.Totals:
    """``cascade_report``'s metrics as sums and weights (``means`` gives the report), computed
    ``REPORT_CELLS`` candidates of rows at a time (each metric is a mean over rows, so the parts
    add up exactly: on the 10x world's 20,000 held-out lists of 200 the metrics' temporaries
    took 0.37 GiB at once), and so that a streamed run can add up its row groups."""
    rows = max(1, REPORT_CELLS // max(lists.mask.shape[1], 1))
    total: M.Totals = {}
    for a in range(0, len(lists), rows):
        M.add_totals(total, _report_part(student[a : a + rows], teacher[a : a + rows], lists.take(slice(a, a + rows)), cfg, world))
    return total


def _report_part(student: np.ndarray, teacher: np.ndarray, lists: ListBatch, cfg: DistillConfig, world=None) -> dict:
    """``cascade_report``'s metrics over these rows, for ``M.add_totals``: each a ``RowMean``;
    the oracle ratio as the (utility got, best) sums."""
    k, m, mask = cfg.rank_quota, cfg.prerank_quota, lists.mask
    passed = M.topk_membership(student, m, mask) > 0.5
    lowest = np.float32(min(teacher[mask].min(initial=0.0), 0.0) - 1e6)
    final = np.where(passed, teacher, lowest)  # the ranker orders what the pre-ranker passed
    out = {
        f"teacher_recall@{k}@{k}": M.teacher_recall_at_k_at_m(student, teacher, k, k, mask),  # the tightest cut: the student's own top-k
        f"teacher_recall@{k}@20": M.teacher_recall_at_k_at_m(student, teacher, k, 20, mask),
        f"teacher_recall@{k}@{m}": M.teacher_recall_at_k_at_m(student, teacher, k, m, mask),
        f"recall@{k}": M.recall_at_k(final, lists.label, k, mask),
        f"ndcg@{k}": M.ndcg_at_k(final, lists.label, k, mask),
    }
    if world is not None:
        shown_rows = M.topk_membership(final, k, mask) > 0.5
        shown = np.where(shown_rows, lists.item["item_id"], 0)
        got = world.click_prob(lists.request_id, shown).sum(axis=1)
        _, best = world.best_topk(lists.request_id, k, exclude=lists.history)
        out["oracle_ratio"] = (float(got.sum()), float(best.sum()))
    return out


def cached_scores(teacher: nn.Module, lists: ListBatch, path: Path) -> np.ndarray:
    """``score_lists`` of a frozen teacher, kept beside its ``best.pt`` (every loss mix reuses
    them: DIN over 200 candidates x 20,000 requests takes minutes). Recomputed when ``best.pt``
    is newer than the cache or the lists' shape changed."""
    best = path.parent.parent / "best.pt"
    with rank_zero_first():  # in a data-parallel run rank 0 scores and writes, the others read (both writing raced on the temporary file)
        if path.exists() and path.stat().st_mtime_ns >= best.stat().st_mtime_ns:
            scores = np.load(path)
            if scores.shape == lists.mask.shape:
                return scores
        scores = score_lists(teacher, lists)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, scores)
        tmp.replace(path)
    return scores


def cached_stream_scores(teacher: nn.Module, stream: ListStream, path: Path) -> Callable[[ListBatch], np.ndarray]:
    """A frozen teacher's scores of a stream's lists, as ``cached_scores`` but made a row group at
    a time (``write_stream_scores``) and looked up per batch (``stream_score_lookup``).
    Recomputed when ``best.pt`` is newer or the stream's shape changed."""
    ids_path = path.with_suffix(".ids.npy")
    best = path.parent.parent / "best.pt"

    def fresh() -> bool:
        return ids_path.exists() and path.exists() and path.stat().st_mtime_ns >= best.stat().st_mtime_ns and np.load(path, mmap_mode="r").shape == (len(stream), stream.list_size)

    with rank_zero_first():  # in a data-parallel run rank 0 scores, the others read
        if not fresh():
            write_stream_scores(teacher, stream, path)
    return stream_score_lookup(path)


def write_stream_scores(model: nn.Module, stream: ListStream, path: Path) -> None:
    """``model``'s scores of a stream's lists, made a row group at a time: ``path`` holds them
    (B, N) in the stream's order, ``path`` with ``.ids.npy`` each list's request id."""
    ids_path = path.with_suffix(".ids.npy")
    shape = (len(stream), stream.list_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    ids, at = np.zeros(shape[0], np.int64), 0
    with open(tmp, "wb") as out:  # appended, not memory-mapped: written pages never count in this process
        np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": shape})
        for lst in (g for g in stream.groups() if len(g)):
            scores = np.ascontiguousarray(score_lists(model, lst), np.float32)
            if scores.shape[1] != shape[1] or at + len(lst) > shape[0]:
                raise ValueError(f"{path}: a row group's lists are {scores.shape}, past the stream's {shape}")
            out.write(scores.tobytes())
            ids[at : at + len(lst)] = lst.request_id
            at += len(lst)
    if at != shape[0]:
        raise ValueError(f"{path}: the stream gave {at:,} lists, not the {shape[0]:,} it counted")
    np.save(ids_path, ids)
    tmp.replace(path)  # last: the scores are fresh only once the ids are there


def stream_score_lookup(path: Path) -> Callable[[ListBatch], np.ndarray]:
    """The lookup of ``write_stream_scores``' file: lists (b, N) -> their scores (b, N), by request
    id. Read memory-mapped, a mapping per lookup, so a log of any size costs 4 bytes a candidate on
    disk and a batch's pages in memory (one mapping held for the run keeps every page an epoch
    touched: 0.12 GiB on the 10x world)."""
    ids = np.load(path.with_suffix(".ids.npy"))
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]

    def lookup(lists: ListBatch) -> np.ndarray:
        rows = order[np.minimum(np.searchsorted(sorted_ids, lists.request_id), len(ids) - 1)]
        if not np.array_equal(ids[rows], lists.request_id):  # a cache of other lists: never a silent mismatch
            raise ValueError(f"{path}: holds no scores for request {lists.request_id[ids[rows] != lists.request_id][0]}; delete it to rescore")
        return np.array(np.load(path, mmap_mode="r")[rows])  # the mapping and its pages go with it (0.2 ms)

    return lookup


def streamed_scores(model: nn.Module, stream: ListStream) -> np.ndarray:
    """``score_lists`` of ``model`` (B, N) over a stream's lists, a row group at a time."""
    return np.concatenate([score_lists(model, lst) for lst in stream.groups() if len(lst)])  # a row group may hold none of the split's requests


def report_lists(stream: ListStream) -> ListBatch:
    """A stream's lists with only what the reports read: item ids, label, stage, mask and
    history (no other feature), in ``streamed_scores``' order."""
    return concat_lists([replace(lst, user={}, item={"item_id": lst.item["item_id"]}) for lst in stream.groups() if len(lst)])


ORDER_ONLY_TERMS = ("listwise_kd", "logit_mse", "soft_bce")  # they read the teacher's score scale


def boosted_scores(teacher_exp, lists: dict[str, ListBatch], train: Callable) -> dict[str, np.ndarray]:
    """The scores (B, N) per split of a teacher that is not a torch model (LightGBM): its training
    (``train``, run first if its folder has no ``results.json``) writes them to
    ``scores/SPLIT.npy`` for the same lists."""
    with rank_zero_first():  # in a data-parallel run the others wait for rank 0's scores
        if not finished(teacher_exp.run_dir):
            train(teacher_exp)
    out = {}
    for split, lst in lists.items():
        path = teacher_exp.run_dir / "scores" / f"{split}.npy"
        scores = np.load(path) if path.exists() else None
        if scores is None or scores.shape != lst.mask.shape:
            raise ValueError(f"teacher '{teacher_exp.name}': {path} is missing or was written for other lists; delete {teacher_exp.run_dir} to retrain it")
        out[split] = scores
    return out


def check_order_only(cfg: DistillConfig, teacher_exp) -> None:
    """A LightGBM lambdarank teacher's scores mean something only within a list: it may feed
    only the order-based terms (TopK-BPR, i.e. tutor at alpha 1, and ARF)."""
    used = [t for t in ORDER_ONLY_TERMS if getattr(cfg, t)]
    if cfg.tutor and cfg.tutor_alpha != 1:
        used.append(f"tutor with tutor_alpha {cfg.tutor_alpha} (its MSE term)")
    if used:
        raise ConfigError(f"distill: teacher '{teacher_exp.name}' is order-only (LightGBM lambdarank): it feeds only tutor at tutor_alpha 1 and arf, not {used[0]}")


def teacher_of(exp, teacher_exp, ds, lists: dict[str, ListBatch], stream: dict[str, ListStream] | None, models: dict[str, Callable[..., nn.Module]], train_teacher: Callable | None) -> tuple[dict[str, np.ndarray], Callable[[ListBatch], np.ndarray]]:
    """The frozen teacher of ``teacher_exp`` (None: no teacher, zeros) as ``train_distill`` reads
    it: its scores (B, N) of each split's ``lists``, and its scores of any pool of training lists
    (looked up in the cache when the lists ``stream``). A torch model (or a blend of them) is
    trained first if it has no run, by ``train_teacher`` or as its task says, and its scores
    cached in its run folder; a LightGBM teacher writes its own (``boosted_scores``), scores only
    whole in-memory lists and, as lambdarank, feeds only the order-based terms."""
    zeros = lambda pool: np.zeros(pool.mask.shape, np.float32)  # noqa: E731
    if teacher_exp is None:
        return {split: zeros(lst) for split, lst in lists.items()}, zeros
    if teacher_exp.model.name not in models and teacher_exp.model.name != BLEND:  # a blend of torch models is one
        if train_teacher is None:
            raise ConfigError(f"distill.teacher: '{teacher_exp.name}' ({teacher_exp.model.name}) is not a torch model and nothing here can train it")
        if stream is not None:
            raise ConfigError(f"distill.teacher: '{teacher_exp.name}' ({teacher_exp.model.name}) scores whole in-memory lists, and {exp.data.dir} is streamed; set data.stream: never (or use a torch teacher)")
        if teacher_exp.model.params.get("objective", "lambdarank") == "lambdarank":
            check_order_only(exp.distill, teacher_exp)
        return boosted_scores(teacher_exp, lists, train_teacher), zeros  # the pool lookup is only read when streamed
    default = (lambda e: train_distill(e, None, models)) if teacher_exp.task == "distill" else (lambda e: train_pointwise(e, models))
    teacher = load_trained(teacher_exp, ds, models, train_teacher or default).to(exp.train.device)
    if stream is None:
        return {split: cached_scores(teacher, lst, teacher_exp.run_dir / "scores" / f"{split}.npy") for split, lst in lists.items()}, zeros
    teach = {split: cached_stream_scores(teacher, st, teacher_exp.run_dir / "scores" / f"{split}.streamed.npy") for split, st in stream.items()}
    return {split: teach[split](lst) for split, lst in lists.items()}, teach["train"]


def train_distill(exp, teacher_exp, models: dict[str, Callable[..., nn.Module]], train_teacher: Callable | None = None) -> dict:
    """Train the model of ``exp`` on the frozen recall output with ``exp.distill``'s loss mix
    against the frozen teacher of ``teacher_exp`` (None for a teacher-free mix, e.g. a ranker's
    own self-learning); early-stop on validation Recall@k@m against the teacher (Recall@k of
    the real positives without one); report the cascade on test. ``train_teacher`` trains a
    missing teacher (default: as a distill or pointwise experiment of ``models``); a teacher
    outside ``models`` (LightGBM) must come with it."""

    cfg: DistillConfig = exp.distill
    ds, streamed = task_logs(exp.data)
    if streamed:  # the lists a row group at a time; held-out scores and slim lists in memory
        stream = {split: ListStream.open(exp.data.dir, split, ds, cfg.min_history if split == "train" else 0) for split in ("train", "valid", "test")}
        score = lambda model, split: streamed_scores(model, stream[split])  # noqa: E731
        lists = {split: report_lists(stream[split]) for split in ("valid", "test")}
    else:
        lists = {split: build_lists(ds, split) for split in ("train", "valid", "test")}
        score = lambda model, split: score_lists(model, lists[split])  # noqa: E731
    teacher_scores, teach_train = teacher_of(exp, teacher_exp, ds, lists, stream if streamed else None, models, train_teacher)
    if cfg.min_history and not streamed:  # after the teacher's scores, so its cache stays that of every list
        keep = np.flatnonzero((lists["train"].history > 0).sum(axis=1) >= cfg.min_history)
        lists["train"], teacher_scores["train"] = lists["train"].take(keep), teacher_scores["train"][keep]
    torch.manual_seed(exp.train.seed)
    model = build_model(exp, ds, models)
    loss = DistillLoss(cfg)
    if streamed:  # each pool of training lists takes its teacher scores from the cache
        train = StreamedTensors(stream["train"], lambda pool: list_tensors(pool, model, teach_train(pool)))
        list_size = stream["train"].list_size
    else:
        train, list_size = list_tensors(lists["train"], model, teacher_scores["train"]), lists["train"].list_size
    trainer = Trainer(model, replace(exp.train, batch_size=cfg.lists_per_batch), exp.run_dir, loss=loss, unit="lists")
    teacher_name = "no teacher" if teacher_exp is None else teacher_exp.name
    trainer.log(f"{exp.name}: distill {exp.model.name} from {teacher_name} on {exp.data.dir}{' (streamed)' if streamed else ''}: {len(train):,} train lists of up to {list_size} candidates")
    world = World.load(exp.data.dir) if (Path(exp.data.dir) / WORLD_FILE).exists() else None

    def report(split: str, world=None) -> dict[str, float]:
        student = score(model, split)
        # without a teacher the model is its own ranker: the report is its own Recall@k
        return cascade_report(student, student if teacher_exp is None else teacher_scores[split], lists[split], cfg, world)

    def step_loss(batch: Tensors) -> torch.Tensor:
        logits, regulariser = training_forward(model, batch)  # the tower's own: DAT's mimic, HIT's generation, IntTower's CIR
        return loss(logits, batch) + regulariser

    best = trainer.fit(train, step_loss=step_loss, evaluate=lambda: report("valid"), resolved_config=exp.to_dict())
    test = report("test", world=world)
    reference = {
        # the same flow with the teacher as its own pre-ranker (the ceiling of consistency) and
        # with the logged production cascade's stage as the pre-ranker score
        "teacher_as_preranker": cascade_report(teacher_scores["test"], teacher_scores["test"], lists["test"], cfg, world),
        "logged_preranker": cascade_report(lists["test"].stage.astype(np.float32) + np.random.default_rng(0).random(lists["test"].stage.shape, dtype=np.float32) * 0.5, teacher_scores["test"], lists["test"], cfg, world),
    }
    result = {"experiment": exp.name, "model": exp.model.name, "teacher": teacher_name, "task": "distill", "distill": asdict(cfg), "best_epoch": best.get("epoch"), "valid": {k: v for k, v in best.items() if k.startswith(("teacher_recall", "recall", "ndcg"))}, "test": test, "reference": reference, "seconds_per_epoch": best.get("seconds"), **trainer.parallel}
    write_results(exp.run_dir, result)  # last: the mark of a complete run
    trainer.log(f"test: {json.dumps(test)}")
    return result


def run(exp, context) -> dict:
    """``task: distill`` (``cascade.tasks.TASKS``): the teacher is ``distill.teacher`` of the same
    config file (as ``context.named`` maps it), trained first if it has no run."""
    teacher = None if exp.distill.teacher is None else context.named(load_config(context.config, exp.distill.teacher)[0])
    return train_distill(exp, teacher, context.models, context.train)
