"""The whole cascade: recall (faiss over the catalog) -> pre-rank -> rank, reported and trained
as one (``task: cascade``, what `cascade train` runs for such an experiment).

Each request's recall stage is the recall tower's top-``recall_quota`` of the catalog (history
excluded; ``cascade.recall.recall_output``): a retrieved item the request logged keeps its label, any other
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from cascade import metrics as M
from cascade.blend import Blend
from cascade.cascade import Cascade, Stage, TorchScorer, top_mask
from cascade.config import CascadeConfig, ConfigError, DistillConfig, ExperimentConfig, load_config
from cascade.data.lists import ListBatch
from cascade.data.store import write_atomic
from cascade.data.stream import ListStream
from cascade.data.synth import WORLD_FILE, World
from cascade.distributed import data_parallel, world_size
from cascade.losses.arf import UncertaintyWeights, e2e_loss, relax_bce
from cascade.losses.sorting import neural_sort, top_k_indicator
from cascade.models import list_tensors, load_trained, training_forward
from cascade.prepare import trend_spec, with_trend_fields
from cascade.recall import RecallStep, item_table, streamed_training_data, training_pairs
from cascade.saved import SavedStage, SavedStages, write_results, write_stages
from cascade.tasks.distill import DistillLoss, report_totals
from cascade.tasks.recall import task_logs
from cascade.tasks.stage_data import Source, StageData, parts
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


def fit_phase(model: nn.Module, lists: Source, pack: Callable[[ListBatch], Tensors], loss_cfg: DistillConfig, exp, run_dir: Path, epochs: int, lr: float | None = None) -> float:
    """One phase: ``epochs`` of ``loss_cfg``'s mix on ``lists`` packed by ``pack`` (at ``lr``,
    default ``exp.train.lr``), plus the model's own regulariser (``models.training_forward``:
    DAT's mimic, HIT's generation, IntTower's CIR); returns its seconds."""
    start = time.perf_counter()
    loss = DistillLoss(loss_cfg)
    trainer = Trainer(model, replace(exp.train, epochs=epochs, batch_size=exp.cascade.lists_per_batch, lr=lr or exp.train.lr), run_dir, loss=loss, unit="lists")
    streamed = " (streamed)" if isinstance(lists, ListStream) else ""
    trainer.log(f"{run_dir.name}: {len(lists):,} lists of up to {lists.list_size} candidates{streamed}, {epochs} epoch(s)")

    def step(b: Tensors) -> torch.Tensor:
        keep_norm_statistics(model)
        logits, regulariser = training_forward(model, b)
        return loss(logits, b) + regulariser

    trainer.fit(as_training(lists, pack), step, None, resolved_config=exp.to_dict())
    return time.perf_counter() - start


def fit_retrieval(recall: nn.Module, stages: StageData, recall_exp, exp, run_dir: Path, epochs: int, lr: float | None) -> float:
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


@dataclass
class JointRun:
    """A joint cascade as it trains: its experiment, the three stages' models and experiments,
    their stage data, and the report rows after each phase (``report``)."""

    exp: ExperimentConfig
    recall_exp: ExperimentConfig
    stage_exps: list[ExperimentConfig]  # pre-rank, rank
    recall: nn.Module
    prerank: nn.Module
    rank: nn.Module
    stage_data: StageData
    streamed: bool
    world: World | None
    rounds: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def cfg(self) -> CascadeConfig:
        return self.exp.cascade

    def report(self, label: str) -> dict[str, Source]:
        """Recall's top-n with the current recall tower (the next phase's stage data), and the
        cascade over it reported on valid and test (a row of ``rounds``)."""
        cfg = self.cfg
        lists = self.stage_data(self.recall, cfg.recall_quota)
        row = {"after": label}
        flow = Cascade([Stage("prerank", TorchScorer(self.prerank), cfg.prerank_quota), Stage("rank", TorchScorer(self.rank), cfg.rank_quota)])
        for split in ("valid", "test"):
            total: M.Totals = {}
            for lst in parts(lists[split]):
                run = flow.run(lst, candidates=lst, full=True)  # the ranker scores the whole list for consistency
                M.add_totals(total, joint_totals(lst, run.stages[0].scores, run.stages[1].scores, self.stage_data.positives(lst.request_id), cfg, self.world if split == "test" else None))
            row[split] = M.means(total)
        self.rounds.append(row)
        print(f"{self.exp.name} after {label}: test " + " ".join(f"{key} {v:.4f}" for key, v in row["test"].items()))
        return lists


def rankflow_round(joint: JointRun, r: int, lists: dict[str, Source]) -> None:
    """RankFlow's round ``r`` on ``lists`` (recall's top-n as the round starts): self-learning of
    each trained stage, ranker first, then tutor learning (the ranker teaches the pre-ranker, the
    pre-ranker recall), each phase in ``run_dir/roundR/PHASE``."""
    exp, cfg, stage_data = joint.exp, joint.cfg, joint.stage_data
    recall, prerank, rank = joint.recall, joint.prerank, joint.rank
    n, m, k = cfg.recall_quota, cfg.prerank_quota, cfg.rank_quota
    self_loss = DistillConfig(teacher=None, exposure_bce=0, rankflow_bce=1.0, prerank_quota=m, rank_quota=k)
    pre_tutor = DistillConfig(exposure_bce=0, tutor=1.0, tutor_alpha=cfg.tutor_alpha, prerank_quota=m, rank_quota=k)
    recall_tutor = DistillConfig(exposure_bce=0, tutor=1.0, tutor_alpha=cfg.recall_tutor_alpha, prerank_quota=n, rank_quota=m)
    here = exp.run_dir / f"round{r}"
    served = lists["train"]  # recall's top-n with the current recall tower
    every_positive = cfg.self_positives == "all"
    with_positives = stage_data(recall, n, keep_positives=True, splits=("train",), name="with_positives")["train"] if every_positive else served
    if "recall" in cfg.trained:  # recall's lists, from the tower as the round starts
        recall_served = stage_data(recall, n, keep_positives=False, catalog_negatives=cfg.catalog_negatives, seed=exp.train.seed * 100 + r, splits=("train",), name="recall_served")["train"]

    if "rank" in cfg.trained:
        chooser = stage_data.scores(prerank, with_positives, "prerank_of_with_positives")

        def ranker_lists(lst: ListBatch) -> ListBatch:  # the pre-ranker's top-m (and, with every_positive, each positive)
            return top_of(lst, chooser(lst), m, also=(lst.label > 0) & lst.mask if every_positive else None)

        fit_phase(rank, with_positives, lambda lst: list_tensors(ranker_lists(lst), rank), self_loss, exp, here / "rank_self", cfg.self_epochs)
    if "prerank" in cfg.trained:
        fit_phase(prerank, with_positives, lambda lst: list_tensors(lst, prerank), self_loss, exp, here / "prerank_self", cfg.self_epochs)
    if "recall" in cfg.trained and cfg.recall_self == "retrieval":
        fit_retrieval(recall, stage_data, joint.recall_exp, exp, here / "recall_self", cfg.self_epochs, cfg.recall_lr)
    elif "recall" in cfg.trained:
        recall_self = stage_data(recall, n, keep_positives=every_positive, catalog_negatives=cfg.catalog_negatives, seed=exp.train.seed * 100 + r, splits=("train",), name="recall_self")["train"] if every_positive else recall_served
        fit_phase(recall, recall_self, lambda lst: list_tensors(lst, recall), self_loss, exp, here / "recall_self", cfg.self_epochs, cfg.recall_lr)
    if "prerank" in cfg.trained:
        tutor = stage_data.scores(rank, served, "rank_of_served")
        fit_phase(prerank, served, lambda lst: list_tensors(lst, prerank, tutor(lst)), pre_tutor, exp, here / "prerank_tutor", cfg.tutor_epochs)
    if "recall" in cfg.trained:
        recall_tutor_scores = stage_data.scores(prerank, recall_served, "prerank_of_recall_served")  # the pre-ranker as it now is
        fit_phase(recall, recall_served, lambda lst: list_tensors(lst, recall, recall_tutor_scores(lst)), recall_tutor, exp, here / "recall_tutor", cfg.tutor_epochs, cfg.recall_lr)


def lcron(joint: JointRun) -> None:
    """LCRON: recall and the pre-ranker (those of ``cascade.trained``) as one network on the
    warm-up recall's lists plus catalog draws, against the frozen ranker's top-k, in
    ``run_dir/lcron``."""
    exp, cfg, stage_data = joint.exp, joint.cfg, joint.stage_data
    n, m, k = cfg.recall_quota, cfg.prerank_quota, cfg.rank_quota
    train = stage_data(joint.recall, n, catalog_negatives=cfg.catalog_negatives, seed=exp.train.seed, splits=("train",), name="lcron")["train"]
    stacked = StackedStages(joint.recall, joint.prerank)
    stages = {"recall": joint.recall, "prerank": joint.prerank}
    kept = [name for name in stages if name not in cfg.trained]
    frozen = [stages[name] for name in kept]
    for model in frozen:
        model.requires_grad_(False)
    loss = LcronLoss((cfg.lcron_recall_quota, m), k, cfg.tau)
    trainer = Trainer(stacked, replace(exp.train, epochs=cfg.lcron_epochs, batch_size=cfg.lists_per_batch), exp.run_dir / "lcron", loss=loss, unit="lists")
    trainer.log(f"lcron: recall + pre-ranker{''.join(f' ({name} frozen)' for name in kept)} on {len(train):,} lists of {train.list_size}{' (streamed)' if joint.streamed else ''}, against {cfg.rank}'s top-{k}")

    def step(b: Tensors) -> torch.Tensor:
        keep_norm_statistics(stacked)
        for model in frozen:
            model.eval()  # a frozen stage scores as it serves: no dropout
        return loss(stacked(b.user, b.items), b)

    teacher = stage_data.scores(joint.rank, train, "rank_of_lcron")
    trainer.fit(as_training(train, lambda lst: stacked.pack(lst, teacher(lst))), step, None, resolved_config=exp.to_dict())


def warm_up(exp: ExperimentConfig, context) -> JointRun:
    """The cascade's warm-up stages, each ``context.named`` and trained with its own config on
    this experiment's device when it has no run (the recall experiment of its own config file,
    not mapped), over the recall's logs streamed as this experiment says."""
    cfg: CascadeConfig = exp.cascade
    recall_config = Path(cfg.recall["config"])
    (recall_exp,) = load_config(recall_config, cfg.recall["experiment"])
    if recall_exp.task != "recall":
        raise ConfigError(f"{exp.where}.cascade.recall: experiment '{recall_exp.name}' of {recall_config} is not a recall task")
    data = replace(recall_exp.data, stream=exp.data.stream)  # the recall's logs, streamed as this experiment says
    ds, streamed = task_logs(data)
    world = World.load(data.dir) if (Path(data.dir) / WORLD_FILE).exists() else None
    on_device = lambda e: replace(e, train=replace(e.train, device=exp.train.device))  # noqa: E731
    recall = load_trained(on_device(recall_exp), ds, context.models, lambda e: context.train(e, recall_config))
    stage_exps = [context.named(load_config(context.config, name)[0]) for name in (cfg.prerank, cfg.rank)]
    stage_trend = trend_spec(*stage_exps)  # the stages' item trend, computed on every regenerated list
    stage_ds = with_trend_fields(ds, stage_trend)
    prerank, rank = (load_trained(on_device(e), stage_ds, context.models, context.train) for e in stage_exps)
    for model in (recall, prerank, rank):
        model.to(exp.train.device)
    stage_data = StageData(ds, stage_trend, data.dir if streamed else None, exp.run_dir / "stage_data")
    if streamed:
        print(f"{exp.name}: {data.dir} streams: each round's stage data is written under {stage_data.spill} a row group at a time", flush=True)
    return JointRun(exp, recall_exp, stage_exps, recall, prerank, rank, stage_data, streamed, world)


def train_cascade(exp: ExperimentConfig, context) -> dict:
    """Run ``exp.cascade``'s method from the warm-up stages (``warm_up``); report the cascade on
    valid and test before training and after each round. Saves the stages (``save_stages``) and
    writes ``results.json`` in ``exp.run_dir``."""
    joint = warm_up(exp, context)
    cfg = joint.cfg
    lists = joint.report("start")
    if cfg.method == "rankflow":
        for r in range(1, cfg.rounds + 1):
            start = time.perf_counter()
            rankflow_round(joint, r, lists)
            joint.seconds[f"round{r}"] = time.perf_counter() - start
            lists = joint.report(f"round {r}")  # the next round's stage data, from the updated recall tower
    elif cfg.method == "lcron":
        start = time.perf_counter()
        lcron(joint)
        joint.seconds["lcron"] = time.perf_counter() - start
        joint.report("lcron")
    joint.stage_data.clear()
    worse = got_worse(joint.rounds)
    if worse:
        print(f"warning: {exp.name} {worse}; its warm-up stages are better kept", flush=True)
    save_stages(exp, {"recall": (Path(cfg.recall["config"]), joint.recall_exp.name, joint.recall), "prerank": (context.config, cfg.prerank, joint.prerank), "rank": (context.config, cfg.rank, joint.rank)})
    result = {"experiment": exp.name, "method": cfg.method, "stages": {"recall": joint.recall_exp.name, "prerank": cfg.prerank, "rank": cfg.rank}, "cascade": exp.to_dict()["cascade"], "rounds": joint.rounds, "test": joint.rounds[-1]["test"], "seconds": joint.seconds, "world_size": world_size() if data_parallel() else 1}
    write_results(exp.run_dir, result)  # last: the mark of a complete run
    return result


def run(exp: ExperimentConfig, context) -> dict:
    """``task: cascade`` (``cascade.tasks.TASKS``)."""
    return train_cascade(exp, context)


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
