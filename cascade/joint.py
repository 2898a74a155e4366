"""The whole cascade: recall (faiss over the catalog) -> pre-rank -> rank, reported and trained
as one (``task: cascade``, what `cascade train` runs for such an experiment).

Each request's recall stage is the recall tower's top-``recall_quota`` of the catalog (history
excluded; ``flow.recall_output``): a retrieved item the request logged keeps its label, any other
is an unexposed negative. The pre-ranker passes its top ``prerank_quota`` on, the ranker shows its
top ``rank_quota``. ``joint_report`` says how much of each request's real positives survives every
quota (positives recall never retrieved count as lost), and on the synthetic world the oracle
ratio. The stages start from warm-up models, each an experiment trained on its own; ``method``:

- ``frozen``: no training; the cascade of the given stages (the baselines).
- ``rankflow`` (Qin et al., SIGIR 2022): ``rounds`` rounds of (1) regenerate each stage's data
  with the current models: recall's top-n (faiss index rebuilt from the current item tower) for
  the pre-ranker and recall, the pre-ranker's top-m of it for the ranker; (2) self-learning,
  ranker first: each stage BCE on its own list (unexposed = 0) plus every logged positive of the
  split; (3) tutor learning: the ranker teaches the pre-ranker (top-k), the pre-ranker teaches
  recall (top-m), ``alpha * TopK-BPR + (1 - alpha) * probability MSE`` on the student's list.
  Options: ``trained`` stages, ``recall_lr``, ``recall_self: retrieval`` (recall's self-learning
  keeps its own sampled-softmax objective), ``self_positives: listed`` (only a list's own
  positives), ``recall_tutor_alpha: 1`` (TopK-BPR only: recall's logits are not probabilities).
- ``lcron`` (Wang et al., ICML 2025): recall and pre-ranker trained as one network on the warm-up
  recall's lists (plus the catalog draws below) against the ranker's top-k: L_e2e (BCE of the product of both stages' relaxed
  top-quota memberships) + each stage's ARF-v2 loss under learnable uncertainty weights. The
  quotas in the loss are the stages' (``lcron_recall_quota`` of the n-item list, then
  ``prerank_quota``); the authors' PyTorch code uses the ground-truth count for both. The
  ranker stays frozen.

Recall's training lists (its self-learning and tutor lists, LCRON's) also hold
``catalog_negatives`` uniform draws from the catalog, label 0: recall's candidate space is the
whole catalog, and trained on its own top-n alone it forgets the rest (on ML-1M one RankFlow
round without them cut the share of real positives in its top-200 from 0.26 to 0.03). This is
our addition; neither paper's code has it (LCRON never retrieves from a catalog).

Every phase fine-tunes a warm-up model, so its BatchNorm layers keep their running statistics
(``keep_norm_statistics``): re-estimated on the stage lists they shift a tower's output (measured
in the closing note of issue 4). Every phase trains with this experiment's ``train`` config (lr, device, seed) for the epochs the
schedule gives, no early stopping, in its own folder under ``run_dir``: a stopped run resumes.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from cascade import metrics as M
from cascade.data.lists import ListBatch
from cascade.data.stream import ListStream
from cascade.data.store import write_atomic
from cascade.saved import SavedStage, SavedStages, write_results, write_stages
from cascade.config import CascadeConfig, ConfigError, DistillConfig, load_config
from cascade.blend import Blend
from cascade.cascade import Cascade, Stage, TorchScorer, top_mask
from cascade.data.synth import WORLD_FILE, World
from cascade.flow import DistillLoss, report_totals, train_distill
from cascade.models import list_tensors, load_trained
from cascade.distributed import barrier, data_parallel, world_size
from cascade.pipeline import prepare_data, streams, tower_forward, train_blend, train_pointwise, train_recall, trend_spec, with_trend_fields
from cascade.recall import RecallStep, item_table, streamed_training_data, training_pairs
from cascade.losses.arf import UncertaintyWeights, e2e_loss, relax_bce
from cascade.losses.sorting import neural_sort, top_k_indicator
from cascade.stage_data import Source, StageData, parts
from cascade.train import StreamedTensors, Tensors, Trainer


# ------------------------------------------------------------------------------ the flow


def top_of(lists: ListBatch, scores: np.ndarray, m: int, also: np.ndarray | None = None) -> ListBatch:
    """Each list cut to its top-m by ``scores`` (B, N) (``cascade.top_mask``) plus the items
    ``also`` (B, N) marks, in their list order (padding where a row keeps fewer)."""
    keep = top_mask(scores, lists.mask, m)
    if also is not None:
        keep |= also & lists.mask
    cols = np.argsort(~keep, axis=1, kind="stable")[:, : int(keep.sum(1).max())]
    cut = lists.take_columns(cols)
    return replace(cut, mask=cut.mask & np.take_along_axis(keep, cols, 1))


def joint_report(lists: ListBatch, prerank: np.ndarray, rank: np.ndarray, positives: np.ndarray, cfg: CascadeConfig, world=None) -> dict[str, float]:
    """The cascade over each request's recall output ``lists`` (B, n) with the pre-ranker's and
    ranker's scores (B, n); ``positives`` (B,) the request's logged positives, retrieved or not.

    ``positives_retrieved``, ``positives_after_prerank`` and ``joint_recall``: the share of the
    real positives still alive after recall, pre-rank and rank (end-to-end joint recall);
    ``cascade_report``'s teacher consistency of the pre-ranker against this cascade's ranker,
    Recall@k / NDCG@k of the positives inside the lists, and the oracle ratio."""
    return M.means(joint_totals(lists, prerank, rank, positives, cfg, world))


def joint_totals(lists: ListBatch, prerank: np.ndarray, rank: np.ndarray, positives: np.ndarray, cfg: CascadeConfig, world=None) -> M.Totals:
    """``joint_report`` as sums and weights (``M.Totals``), which add up over parts of the lists:
    the joint recalls are means over the rows with a positive."""
    m, k = cfg.prerank_quota, cfg.rank_quota
    truth = (lists.label > 0) & lists.mask
    out = {
        "positives_retrieved": M.joint_recall([prerank], [lists.list_size], truth, lists.mask, positives),
        "positives_after_prerank": M.joint_recall([prerank], [m], truth, lists.mask, positives),
        "joint_recall": M.joint_recall([prerank, rank], [m, k], truth, lists.mask, positives),
    }
    return M.add_totals(M.add_totals({}, out), report_totals(prerank, rank, lists, DistillConfig(prerank_quota=m, rank_quota=k), world))


# ------------------------------------------------------------------------------ training


def keep_norm_statistics(model: nn.Module) -> None:
    """Put ``model``'s BatchNorm layers in eval mode, so a training step normalises with their
    running statistics and leaves them as they are: a warm-up stage fine-tuned on another
    distribution (its stage lists) keeps the normalisation its other weights were trained with."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def as_training(source: Source, pack: Callable[[ListBatch], Tensors]) -> Tensors | StreamedTensors:
    """A phase's training data: ``pack`` (lists -> Tensors, e.g. with a teacher's scores) of the
    lists in memory, or of each pool of a spilled stage as it is read."""
    return pack(source) if isinstance(source, ListBatch) else StreamedTensors(source, pack)


def _fit(model: nn.Module, model_name: str, lists: Source, pack: Callable[[ListBatch], Tensors], loss_cfg: DistillConfig, exp, run_dir: Path, epochs: int, lr: float | None = None) -> float:
    """One phase: ``epochs`` of ``loss_cfg``'s mix on ``lists`` packed by ``pack`` (at ``lr``,
    default ``exp.train.lr``), plus the tower's own regulariser (``pipeline.tower_forward`` of
    ``model_name``: DAT's mimic, HIT's generation, IntTower's CIR); returns its seconds."""
    start = time.perf_counter()
    loss = DistillLoss(loss_cfg)
    trainer = Trainer(model, replace(exp.train, epochs=epochs, batch_size=exp.cascade.lists_per_batch, lr=lr or exp.train.lr), run_dir, loss=loss, unit="lists")
    streamed = " (streamed)" if isinstance(lists, ListStream) else ""
    trainer.log(f"{run_dir.name}: {len(lists):,} lists of up to {lists.list_size} candidates{streamed}, {epochs} epoch(s)")
    forward = tower_forward(model_name)

    def step(b: Tensors) -> torch.Tensor:
        keep_norm_statistics(model)
        logits, regulariser = forward(model, b)
        return loss(logits, b) + regulariser

    trainer.fit(as_training(lists, pack), step, None, resolved_config=exp.to_dict())
    return time.perf_counter() - start


def _fit_retrieval(recall: nn.Module, stages: StageData, recall_exp, exp, run_dir: Path, epochs: int, lr: float | None) -> float:
    """Recall's self-learning with its own warm-up objective (``recall.RecallStep`` over the
    logged (request, positive) pairs of the train split, made a row group at a time when the
    logs stream) for ``epochs``; returns its seconds."""
    start = time.perf_counter()
    ds = stages.ds
    table = item_table(ds, recall.item_slots)
    if stages.streamed:
        _, pairs = streamed_training_data(ds, recall_exp.data.dir, recall, table, recall_exp.recall)
    else:
        pairs = training_pairs(ds, recall, "train", table, recall_exp.recall)
    step = RecallStep(recall_exp.recall, recall, table, ds.items["item_id"], pairs)
    trainer = Trainer(recall, replace(exp.train, epochs=epochs, batch_size=recall_exp.train.batch_size, lr=lr or exp.train.lr), run_dir)
    trainer.log(f"{run_dir.name}: {len(pairs):,} (request, positive) pairs, sampled softmax, {epochs} epoch(s)")

    def loss(b: Tensors) -> torch.Tensor:
        keep_norm_statistics(recall)
        return step(recall, b)

    trainer.fit(pairs, loss, None, resolved_config=exp.to_dict())
    return time.perf_counter() - start


class StackedStages(nn.Module):
    """Two stages' models over one packed input, their columns side by side (user (B, Wa + Wb),
    items (B, N, Wa' + Wb')), so one Trainer trains both: forward -> (B, N, 2) logits."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second
        self.cut_user = sum(s.width for s in first.user_slots)
        self.cut_item = sum(s.width for s in first.item_slots)

    def pack(self, lists: ListBatch, teacher: np.ndarray) -> Tensors:
        one, two = list_tensors(lists, self.first, teacher), list_tensors(lists, self.second)
        return replace(one, user=torch.cat([one.user, two.user], 1), items=torch.cat([one.items, two.items], 2))

    def forward(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        first = self.first(user[:, : self.cut_user], items[..., : self.cut_item])
        second = self.second(user[:, self.cut_user :], items[..., self.cut_item :])
        return torch.stack([first, second], dim=-1)


class LcronLoss(nn.Module):
    """LCRON over (B, N, 2) logits of (recall, pre-ranker) against the teacher's top-k:
    ``L_e2e + L_recall / (2 sigma_r^2) + L_prerank / (2 sigma_p^2) + log sigma_r sigma_p``."""

    def __init__(self, quotas: tuple[int, int], k: int, tau: float):
        super().__init__()
        self.quotas, self.k, self.tau = quotas, k, tau
        self.weights = UncertaintyWeights(2)

    def forward(self, logits: torch.Tensor, batch: Tensors) -> torch.Tensor:
        mask = batch.mask
        p_hats = [neural_sort(logits[..., i], mask, self.tau) for i in (0, 1)]
        g = top_k_indicator(batch.teacher, mask, self.k)
        singles = [relax_bce(p, g, mask, q) for p, q in zip(p_hats, self.quotas)]
        return self.weights(e2e_loss(p_hats, list(self.quotas), g, mask), *singles)


def train_experiment(exp, config: Path, models: dict[str, Callable[..., nn.Module]], boosted: dict[str, Callable] | None = None, named: Callable = lambda e: e) -> dict:
    """Train one experiment of the config file ``config`` by its task (what `cascade train`
    runs); ``boosted``: models with their own training function (LightGBM), for any task.
    ``named``: what an experiment this one names in ``config`` (a student's teacher, a cascade's
    pre-rank and rank stages) becomes before use, e.g. the same experiment at another seed
    (benchmarks/distill_joint.py); a cascade's recall tower is not mapped, for it made the
    lists its stages were trained on. In a data-parallel run every rank returns once rank 0 has
    written the results."""
    if exp.task == "cascade":
        result = train_cascade(exp, config, models, named)
    elif exp.task == "distill" and not (boosted and exp.model.name in boosted):
        teacher = None if exp.distill.teacher is None else named(load_config(config, exp.distill.teacher)[0])
        result = train_distill(exp, teacher, models, lambda e: train_experiment(e, config, models, boosted, named))
    elif exp.task == "recall":
        result = train_recall(exp, models)
    elif exp.task == "blend":
        result = train_blend(exp, models, lambda e: train_experiment(e, config, models, boosted, named))
    elif boosted and exp.model.name in boosted:
        result = boosted[exp.model.name](exp)
    else:
        result = train_pointwise(exp, models)
    barrier()  # no rank looks for this run's results.json before rank 0 has written it
    return result


def train_cascade(exp, config: Path, models: dict[str, Callable[..., nn.Module]], named: Callable = lambda e: e) -> dict:
    """Run ``exp.cascade``'s method from the warm-up stages (each ``named`` as in
    ``train_experiment``, and trained first if its run folder has no ``best.pt``); report the
    cascade on valid and test before training and after each round. Writes ``results.json``
    in ``exp.run_dir``."""
    cfg: CascadeConfig = exp.cascade
    recall_config = Path(cfg.recall["config"])
    (recall_exp,) = load_config(recall_config, cfg.recall["experiment"])
    if recall_exp.task != "recall":
        raise ConfigError(f"{exp.where}.cascade.recall: experiment '{recall_exp.name}' of {recall_config} is not a recall task")
    data = replace(recall_exp.data, stream=exp.data.stream)  # the recall's logs, streamed as this experiment says
    streamed = streams(data)
    ds = prepare_data(data, candidates=not streamed)
    world = World.load(data.dir) if (Path(data.dir) / WORLD_FILE).exists() else None
    # the warm-up stages, each trained with its own config on this experiment's device if missing
    on_device = lambda e: replace(e, train=replace(e.train, device=exp.train.device))  # noqa: E731
    recall = load_trained(on_device(recall_exp), ds, models, lambda e: train_experiment(e, recall_config, models))
    stage_exps = [named(load_config(config, name)[0]) for name in (cfg.prerank, cfg.rank)]
    stage_trend = trend_spec(*stage_exps)  # the stages' item trend, computed on every regenerated list
    stage_ds = with_trend_fields(ds, stage_trend)
    prerank, rank = (load_trained(on_device(e), stage_ds, models, lambda e: train_experiment(e, config, models, named=named)) for e in stage_exps)
    for model in (recall, prerank, rank):
        model.to(exp.train.device)
    n, m, k = cfg.recall_quota, cfg.prerank_quota, cfg.rank_quota
    stage_data = StageData(ds, stage_trend, data.dir if streamed else None, exp.run_dir / "stage_data")
    if streamed:
        print(f"{exp.name}: {data.dir} streams: each round's stage data is written under {stage_data.spill} a row group at a time", flush=True)
    rounds: list[dict] = []
    seconds: dict[str, float] = {}

    def report(label: str) -> dict[str, Source]:
        lists = stage_data(recall, n)
        row = {"after": label}
        flow = Cascade([Stage("prerank", TorchScorer(prerank), m), Stage("rank", TorchScorer(rank), k)])
        for split in ("valid", "test"):
            total: M.Totals = {}
            for lst in parts(lists[split]):
                run = flow.run(lst, candidates=lst, full=True)  # the ranker scores the whole list for consistency
                M.add_totals(total, joint_totals(lst, run.stages[0].scores, run.stages[1].scores, stage_data.positives(lst.request_id), cfg, world if split == "test" else None))
            row[split] = M.means(total)
        rounds.append(row)
        print(f"{exp.name} after {label}: test " + " ".join(f"{key} {v:.4f}" for key, v in row["test"].items()))
        return lists

    lists = report("start")
    if cfg.method == "rankflow":
        self_loss = DistillConfig(teacher=None, exposure_bce=0, rankflow_bce=1.0, prerank_quota=m, rank_quota=k)
        pre_tutor = DistillConfig(exposure_bce=0, tutor=1.0, tutor_alpha=cfg.tutor_alpha, prerank_quota=m, rank_quota=k)
        recall_tutor = DistillConfig(exposure_bce=0, tutor=1.0, tutor_alpha=cfg.recall_tutor_alpha, prerank_quota=n, rank_quota=m)
        for r in range(1, cfg.rounds + 1):
            start, here = time.perf_counter(), exp.run_dir / f"round{r}"
            served = lists["train"]  # recall's top-n with the current recall tower
            every_positive = cfg.self_positives == "all"
            with_positives = stage_data(recall, n, keep_positives=True, splits=("train",), name="with_positives")["train"] if every_positive else served
            if "recall" in cfg.trained:  # recall's lists, from the tower as the round starts
                recall_served = stage_data(recall, n, False, cfg.catalog_negatives, exp.train.seed * 100 + r, ("train",), name="recall_served")["train"]

            if "rank" in cfg.trained:
                chooser = stage_data.scores(prerank, with_positives, "prerank_of_with_positives")

                def ranker_lists(lst: ListBatch) -> ListBatch:  # the pre-ranker's top-m (and, with every_positive, each positive)
                    return top_of(lst, chooser(lst), m, also=(lst.label > 0) & lst.mask if every_positive else None)

                _fit(rank, stage_exps[1].model.name, with_positives, lambda lst: list_tensors(ranker_lists(lst), rank), self_loss, exp, here / "rank_self", cfg.self_epochs)
            if "prerank" in cfg.trained:
                _fit(prerank, stage_exps[0].model.name, with_positives, lambda lst: list_tensors(lst, prerank), self_loss, exp, here / "prerank_self", cfg.self_epochs)
            if "recall" in cfg.trained and cfg.recall_self == "retrieval":
                _fit_retrieval(recall, stage_data, recall_exp, exp, here / "recall_self", cfg.self_epochs, cfg.recall_lr)
            elif "recall" in cfg.trained:
                recall_self = stage_data(recall, n, every_positive, cfg.catalog_negatives, exp.train.seed * 100 + r, ("train",), name="recall_self")["train"] if every_positive else recall_served
                _fit(recall, recall_exp.model.name, recall_self, lambda lst: list_tensors(lst, recall), self_loss, exp, here / "recall_self", cfg.self_epochs, cfg.recall_lr)
            if "prerank" in cfg.trained:
                tutor = stage_data.scores(rank, served, "rank_of_served")
                _fit(prerank, stage_exps[0].model.name, served, lambda lst: list_tensors(lst, prerank, tutor(lst)), pre_tutor, exp, here / "prerank_tutor", cfg.tutor_epochs)
            if "recall" in cfg.trained:
                recall_tutor_scores = stage_data.scores(prerank, recall_served, "prerank_of_recall_served")  # the pre-ranker as it now is
                _fit(recall, recall_exp.model.name, recall_served, lambda lst: list_tensors(lst, recall, recall_tutor_scores(lst)), recall_tutor, exp, here / "recall_tutor", cfg.tutor_epochs, cfg.recall_lr)
            seconds[f"round{r}"] = time.perf_counter() - start
            lists = report(f"round {r}")  # the next round's stage data, from the updated recall tower
    elif cfg.method == "lcron":
        start = time.perf_counter()
        train = stage_data(recall, n, catalog_negatives=cfg.catalog_negatives, seed=exp.train.seed, splits=("train",), name="lcron")["train"]
        stacked = StackedStages(recall, prerank)
        stages = {"recall": recall, "prerank": prerank}
        kept = [name for name in stages if name not in cfg.trained]
        frozen = [stages[name] for name in kept]
        for model in frozen:
            model.requires_grad_(False)
        loss = LcronLoss((cfg.lcron_recall_quota, m), k, cfg.tau)
        trainer = Trainer(stacked, replace(exp.train, epochs=cfg.lcron_epochs, batch_size=cfg.lists_per_batch), exp.run_dir / "lcron", loss=loss, unit="lists")
        trainer.log(f"lcron: recall + pre-ranker{''.join(f' ({name} frozen)' for name in kept)} on {len(train):,} lists of {train.list_size}{' (streamed)' if streamed else ''}, against {cfg.rank}'s top-{k}")
        def step(b: Tensors) -> torch.Tensor:
            keep_norm_statistics(stacked)
            for model in frozen:
                model.eval()  # a frozen stage scores as it serves: no dropout
            return loss(stacked(b.user, b.items), b)

        teacher = stage_data.scores(rank, train, "rank_of_lcron")
        trainer.fit(as_training(train, lambda lst: stacked.pack(lst, teacher(lst))), step, None, resolved_config=exp.to_dict())
        seconds["lcron"] = time.perf_counter() - start
        report("lcron")
    stage_data.clear()
    worse = got_worse(rounds)
    if worse:
        print(f"warning: {exp.name} {worse}; its warm-up stages are better kept", flush=True)
    save_stages(exp, {"recall": (recall_config, recall_exp.name, recall), "prerank": (config, cfg.prerank, prerank), "rank": (config, cfg.rank, rank)})
    result = {"experiment": exp.name, "method": cfg.method, "stages": {"recall": recall_exp.name, "prerank": cfg.prerank, "rank": cfg.rank}, "cascade": exp.to_dict()["cascade"], "rounds": rounds, "test": rounds[-1]["test"], "seconds": seconds, "world_size": world_size() if data_parallel() else 1}
    write_results(exp.run_dir, result)  # last: the mark of a complete run
    return result


def got_worse(rounds: list[dict]) -> str | None:
    """What to say when a trained cascade ends below its start on test joint recall (``rounds``:
    its ``results.json`` rows, the start first), or None."""
    if len(rounds) < 2:
        return None
    start, end = rounds[0]["test"]["joint_recall"], rounds[-1]["test"]["joint_recall"]
    if end >= start:
        return None
    return f"made the cascade worse than it started: test joint recall {start:.4f} at the start, {end:.4f} after {rounds[-1]['after']}"


def save_stages(exp, stages: dict[str, tuple[Path, str, nn.Module]]) -> None:
    """The cascade as trained, for `cascade export`: each stage's weights (``stages/NAME.pt``) and
    ``stages.json`` (``saved.write_stages``) naming its config file (absolute), experiment and
    quota, and the cascade's ``data.stream``."""
    out = exp.run_dir / "stages"
    out.mkdir(parents=True, exist_ok=True)
    quotas = {"recall": exp.cascade.recall_quota, "prerank": exp.cascade.prerank_quota, "rank": exp.cascade.rank_quota}
    saved = {}
    for name, (config, experiment, model) in stages.items():
        weights = {k: v.cpu() for k, v in model.state_dict().items()}
        write_atomic(out / f"{name}.pt", lambda f: torch.save(weights, f))
        # a blend's weights, as chosen on validation, in plain sight
        saved[name] = SavedStage(str(Path(config).resolve()), experiment, quotas[name], f"stages/{name}.pt", model.describe() if isinstance(model, Blend) else None)
    write_stages(exp.run_dir, SavedStages(saved, exp.data.stream))
