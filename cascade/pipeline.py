"""From an experiment config to data, a model and a trained run (what `cascade train` runs).

``MODELS`` is the explicit registry of pre-rankers; ``cascade.cli`` adds the teachers to it (the
core never imports ``teachers/``). A model is any module with ``user_slots``, ``item_slots`` and
``forward(user (B, Wu), items (B, N, Wi)) -> (B, N)`` logits.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from cascade import metrics as M
from cascade.config import ConfigError, DataConfig, ExperimentConfig, load_config
from cascade.data.lists import ListBatch, build_lists, pointwise_lists
from cascade.data.schema import EXPOSED
from cascade.data.store import Dataset, memory_bytes, read_dataset, write_atomic, write_dataset, write_text_atomic
from cascade.data.stream import SampleStream, fits_in_memory, in_memory_bytes
from cascade.data.trend import TREND_SCALES, ItemTrend, TrendSpec, trend_schema, with_trend
from cascade.distributed import rank_zero_first
from cascade.losses.dat import adaptive_mimic
from cascade.losses.hit import generation
from cascade.losses.inttower import contrastive_interaction
from cascade.losses.pointwise import bce
from cascade.saved import write_results
from cascade.recall import RecallStep, evaluate_recall, item_table, recall_output, streamed_training_data, training_pairs
from cascade.blend import BLEND, Blend, blend_weights, standardised
from cascade.models import MODELS, blend_parts, build_model, load_trained, predict, score_lists
from cascade.towers.dat import DAT
from cascade.towers.embedding import Slot, pack_items, pack_user
from cascade.towers.hit import HIT
from cascade.towers.inttower import IntTower
from cascade.train import StreamedTensors, Tensors, Trainer

def plain_forward(model: nn.Module, batch: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, N) of ``batch`` and the tower's own regulariser () (none: 0)."""
    return model(batch.user, batch.items), batch.label.new_zeros(())


def dat_forward(model: DAT, batch: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, N) and the weighted adaptive-mimic loss on the positives, one forward pass."""
    b, n, w = batch.items.shape
    p_u = model.user(batch.user)  # (B, 1, D)
    flat_items = batch.items.reshape(b * n, w)
    p_v = model.item(flat_items).reshape(b, n, 1, -1)
    logits = model.score(p_u, p_v)
    a_u = model.user.augmented(batch.user)
    a_v = model.item.augmented(flat_items).reshape(b, n, -1)
    return logits, model.mimic_weight * adaptive_mimic(a_u, a_v, p_u[:, 0], p_v[:, :, 0], batch.label, batch.mask)


def hit_forward(model: HIT, batch: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, N) and the weighted four generation terms (user and item tower, target and non-target)."""
    b, n, w = batch.items.shape
    u, p_u, gt_u, gn_u = model.user.parts(batch.user)
    v, p_v, gt_v, gn_v = model.item.parts(batch.items.reshape(b * n, w))
    logits = model.score(u, v.reshape(b, n, *v.shape[1:]))
    expand = lambda x: x.unsqueeze(1).expand(b, n, x.shape[-1])  # noqa: E731  user side to (B, N, P)
    per_item = lambda x: x.reshape(b, n, -1)  # noqa: E731
    gen = generation(expand(gt_u), expand(gn_u), per_item(p_v), batch.label, batch.mask)
    gen = gen + generation(per_item(gt_v), per_item(gn_v), expand(p_u), batch.label, batch.mask)
    return logits, model.generation_weight * gen


def inttower_forward(model: IntTower, batch: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, N) and, when ``model.cir_weight > 0``, the weighted CIR regulariser on the positive pairs."""
    if model.cir_weight == 0:
        return plain_forward(model, batch)
    b, n, w = batch.items.shape
    layers, u_last = model.user.layer_heads(batch.user)
    v, v_last = model.item.encode(batch.items.reshape(b * n, w))
    logits = model.layer_score(layers, v.reshape(b, n, *v.shape[1:]))
    user_rows = u_last.repeat_interleave(n, dim=0)  # (B * N, D): one row per (user, item) pair
    valid = batch.mask.reshape(-1)
    cir = contrastive_interaction(user_rows[valid], v_last[valid], batch.label.reshape(-1)[valid], model.cir_temperature)
    return logits, model.cir_weight * cir


# The forward pass of each tower that trains with a regulariser of its own (added to whatever the
# task's loss is: BCE on exposures, or a distillation mix; the label is the real positives).
TOWER_FORWARDS: dict[str, Callable[[nn.Module, Tensors], tuple[torch.Tensor, torch.Tensor]]] = {"dat": dat_forward, "hit": hit_forward, "inttower": inttower_forward}


def tower_forward(model_name: str) -> Callable[[nn.Module, Tensors], tuple[torch.Tensor, torch.Tensor]]:
    return TOWER_FORWARDS.get(model_name, plain_forward)


def pointwise_step(model_name: str) -> Callable[[nn.Module, Tensors], torch.Tensor]:
    """The pointwise training loss of ``model_name``: BCE on its logits plus its regulariser."""
    forward = tower_forward(model_name)

    def step(model: nn.Module, batch: Tensors) -> torch.Tensor:
        logits, regulariser = forward(model, batch)
        return bce(logits, batch.label, batch.mask) + regulariser

    return step


def prepare_data(cfg: DataConfig, candidates: bool = True) -> Dataset:
    """Read ``cfg.dir``; when it is missing, make it from the configured source first (in a
    data-parallel run, rank 0 makes it while the others wait). ``candidates=False`` reads every
    table but the candidates (for a run that streams them)."""
    with rank_zero_first():
        make_data(cfg)
    if candidates and cfg.stream == "auto" and not fits_in_memory(cfg.dir):
        # a LightGBM model, and the making of a recall_output data set, read their logs whole,
        # even logs a torch run would stream: say so before the machine runs out, not after
        need = in_memory_bytes(cfg.dir)
        print(f"warning: {cfg.dir}: this step reads every candidate into memory, about {need / 2**30:,.1f} GiB against this machine's {memory_bytes() / 2**30:,.1f} GiB; data.stream streams torch training, evaluation and export, not a LightGBM model or the making of a recall_output data set", file=sys.stderr)
    ds = read_dataset(cfg.dir, candidates=candidates)
    if cfg.kind == "recall_output":  # a directory made earlier must hold the trend the config asks for
        want, protocol = recall_trend_spec(cfg.recall), ds.schema.protocol
        have = TrendSpec(tuple(protocol.get("item_trend_days", ())), protocol.get("item_trend_scale", "count"))
        if want != have:
            raise ConfigError(f"data.recall: {cfg.dir} holds the item trend {list(have.days)} on the '{have.scale}' scale, the config asks for {list(want.days)} on '{want.scale}'; name another data.dir (or delete it to rebuild)")
    return ds


def make_data(cfg: DataConfig) -> None:
    """Write ``cfg.dir`` from the configured source unless it exists."""
    out = Path(cfg.dir)
    if not out.exists():
        if cfg.kind == "synth":
            from cascade.data.synth import WORLD_FILE, WorldConfig, generate

            ds, world = generate(WorldConfig(**cfg.synth))
            write_dataset(ds, out, {WORLD_FILE: world.to_bytes()})
        elif cfg.kind == "movielens":
            from cascade.data.movielens import convert

            if cfg.src is None:
                raise ConfigError("data.src: the MovieLens-1M folder is required for kind 'movielens'")
            ds, _ = convert(cfg.src, cfg.protocol)
            write_dataset(ds, out)
        elif cfg.kind == "recall_output":
            write_dataset(frozen_recall_output(cfg.recall), out)
        else:
            raise ConfigError(f"data.dir: {out} does not exist (kind '{cfg.kind}' cannot make it)")


def frozen_recall_output(spec: dict) -> Dataset:
    """``flow.recall_output`` of the recall experiment ``spec`` names ({config, experiment, n,
    folds}), trained first unless its run folder holds ``best.pt`` and ``results.json``.

    ``folds`` > 1 cross-fits the training lists: the training requests are split into that many
    seeded folds and each fold's lists come from a copy of the recall experiment trained without
    it (its fold as validation), so the lists a ranker trains on look like the ones it serves: a
    recall tower retrieves the positives it was trained on far more often (on MovieLens-1M 26.5
    rated items per training list against 2.1 per test list). Valid and test lists come from the
    recall trained on every training request, as before.

    ``trend_days`` (a list of windows in days) adds each candidate's item trend (``cascade.data.trend``:
    the item's exposures in the logs in that window before the request) as item fields, on
    ``trend_scale`` (``count``, the default, or ``list``: its percentile in its list)."""

    missing = sorted({"config", "experiment"} - set(spec))
    if missing:
        raise ConfigError(f"data.recall: '{missing[0]}' is required for kind 'recall_output'")
    trend = recall_trend_spec(spec)
    (exp,) = load_config(spec["config"], spec["experiment"])
    if exp.task != "recall":
        raise ConfigError(f"data.recall: experiment '{exp.name}' of {spec['config']} is not a recall task")
    ds = prepare_data(exp.data)
    n, folds = int(spec.get("n", 200)), int(spec.get("folds", 1))
    out = recall_output(ds, load_trained(exp, ds, MODELS, train_recall), n)
    if folds > 1:
        out = cross_fitted(exp, ds, out, n, folds)
    return with_trend(out, ItemTrend.from_dataset(ds), trend) if trend else out


def recall_trend_spec(spec: dict) -> TrendSpec:
    """``data.recall``'s ``trend_days`` and ``trend_scale``, checked."""
    days = spec.get("trend_days", [])
    if not isinstance(days, list) or not all(isinstance(d, (int, float)) and not isinstance(d, bool) and d > 0 for d in days):
        raise ConfigError(f"data.recall.trend_days: expected a list of positive numbers of days, got {days!r}")
    scale = spec.get("trend_scale", "count")
    if scale not in TREND_SCALES:
        raise ConfigError(f"data.recall.trend_scale: expected one of {', '.join(TREND_SCALES)}, got {scale!r}")
    return TrendSpec(tuple(days), scale)


def trend_spec(*exps: ExperimentConfig) -> TrendSpec:
    """The item trend the experiments' stage data carry: every window once, on their one scale;
    what a catalog must compute for their models at request time."""
    specs = {e.name: recall_trend_spec(e.data.recall) for e in exps}
    scales = {name: s.scale for name, s in specs.items() if s}
    if len(set(scales.values())) > 1:
        raise ConfigError("data.recall.trend_scale: one cascade's stages must share it, got " + ", ".join(f"'{n}' {s}" for n, s in scales.items()))
    return TrendSpec(tuple(sorted({d for s in specs.values() for d in s.days})), next(iter(scales.values()), "count"))


def with_trend_fields(ds: Dataset, spec: TrendSpec) -> Dataset:
    """``ds`` whose schema has the trend fields of ``spec``: what a model trained on a recall
    output with that item trend is built from (only the schema; no values are computed)."""
    return replace(ds, schema=trend_schema(ds.schema, spec)) if spec else ds


def cross_fitted(exp: ExperimentConfig, ds: Dataset, out: Dataset, n: int, folds: int) -> Dataset:
    """``out`` with each training request's list retrieved by a copy of recall experiment ``exp``
    trained without its fold (``frozen_recall_output``)."""
    req, cand = ds.requests, out.candidates
    train_rows = np.flatnonzero(req["split"] == "train")
    fold = np.full(len(req["request_id"]), -1)  # a training request's fold; -1 for valid and test
    fold[np.random.default_rng(exp.train.seed).permutation(train_rows)] = np.arange(len(train_rows)) % folds
    pieces = [{k: v[~np.isin(cand["request_id"], req["request_id"][train_rows])] for k, v in cand.items()}]
    for f in range(folds):
        # the fold's requests become the copy's validation; valid and test its (unused) test
        split = np.where(fold == f, "valid", np.where(req["split"] == "train", "train", "test"))
        fold_dir = Path(exp.data.dir).parent / f"{Path(exp.data.dir).name}_fold{f + 1}of{folds}"
        if not (fold_dir / "schema.json").exists():
            schema = replace(ds.schema, temporal=False)  # a random fold split does not follow time
            write_dataset(replace(ds, schema=schema, requests={**req, "split": split}), fold_dir)
        fold_exp = replace(exp, name=f"{exp.name}_fold{f + 1}of{folds}", data=replace(exp.data, kind="logs", dir=str(fold_dir)))
        fold_ds = read_dataset(fold_dir)
        fold_out = recall_output(fold_ds, load_trained(fold_exp, fold_ds, MODELS, train_recall), n).candidates
        rows = np.isin(fold_out["request_id"], req["request_id"][fold == f])
        pieces.append({k: v[rows] for k, v in fold_out.items()})
    merged = {k: np.concatenate([p[k] for p in pieces]) for k in cand}
    order = np.argsort(merged["request_id"], kind="stable")  # each list keeps its retrieval order
    return replace(out, candidates={k: v[order] for k, v in merged.items()})


def exposures(ds: Dataset, split: str, model: nn.Module) -> tuple[ListBatch, Tensors]:
    """The logged exposures of a split, one sample per list (N = 1), packed for ``model``."""
    return packed(pointwise_lists(ds, split, min_stage=EXPOSED), model)


def packed(flat: ListBatch, model: nn.Module) -> tuple[ListBatch, Tensors]:
    """Samples (N = 1) and the same packed for ``model``: user, items, label and mask."""
    tensors = Tensors(
        user=torch.from_numpy(pack_user(flat, model.user_slots)),
        items=torch.from_numpy(pack_items(flat, model.item_slots)),
        label=torch.from_numpy(flat.label),
        mask=torch.from_numpy(flat.mask),
    )
    return flat, tensors


def streamed_metrics(model: nn.Module, stream: SampleStream, pack: Callable[[ListBatch], Tensors]) -> dict[str, float]:
    """``pointwise_metrics`` of ``model`` over a stream's samples, scored a row group at a time."""
    logits, labels, requests = [], [], []
    for flat in (f for f in stream.groups() if len(f)):
        logits.append(predict(model, pack(flat)))
        labels.append(flat.label)
        requests.append(flat.request_id)
    return pointwise_metrics(np.concatenate(logits), np.concatenate(labels), np.concatenate(requests))


def pointwise_metrics(logits: np.ndarray, label: np.ndarray, request_id: np.ndarray) -> dict[str, float]:
    """logits, label (n, 1), request_id (n,) -> AUC, LogLoss, GAUC (and the groups GAUC dropped)."""
    y = label[:, 0]
    s = logits[:, 0].astype(np.float64)
    gauc, dropped = M.gauc(y, s, request_id)
    return {"auc": M.auc(y, s), "logloss": M.logloss(y, 1 / (1 + np.exp(-s))), "gauc": gauc, "gauc_dropped": int(dropped)}


def streams(cfg: DataConfig) -> bool:
    """Whether a pointwise, distill, recall or cascade run on ``cfg`` streams its candidates (``data.stream``)."""
    if cfg.stream == "auto":
        with rank_zero_first():
            make_data(cfg)
        return not fits_in_memory(cfg.dir)
    return cfg.stream == "always"


def train_pointwise(exp: ExperimentConfig, models: dict[str, Callable[..., nn.Module]] = MODELS) -> dict:
    """Train a pre-ranker with BCE on logged exposures; early-stop on validation; score test.
    A streamed run (``data.stream``) reads the exposures a row group at a time, and scores the
    valid and test ones a row group at a time too (only logits, labels and request ids kept)."""
    streamed = streams(exp.data)
    ds = prepare_data(exp.data, candidates=not streamed)
    torch.manual_seed(exp.train.seed)
    model = build_model(exp, ds, models)
    pack = lambda flat: packed(flat, model)[1]  # noqa: E731
    if streamed:
        stream = lambda split: SampleStream.open(exp.data.dir, split, EXPOSED, ds)  # noqa: E731
        train, held_out = StreamedTensors(stream("train"), pack), {s: stream(s) for s in ("valid", "test")}
        score = lambda split: streamed_metrics(model, held_out[split], pack)  # noqa: E731
    else:
        _, train = exposures(ds, "train", model)
        held_out = {s: pointwise_lists(ds, s, min_stage=EXPOSED) for s in ("valid", "test")}
        score = lambda split: pointwise_metrics(predict(model, pack(held_out[split])), held_out[split].label, held_out[split].request_id)  # noqa: E731
    trainer, step = Trainer(model, exp.train, exp.run_dir), pointwise_step(exp.model.name)
    trainer.log(f"{exp.name}: {exp.model.name} on {exp.data.dir}{' (streamed)' if streamed else ''}: train {len(train):,} valid {len(held_out['valid']):,} test {len(held_out['test']):,} samples; {sum(p.numel() for p in model.parameters()):,} parameters")
    best = trainer.fit(train, step_loss=lambda b: step(model, b), evaluate=lambda: score("valid"), resolved_config=exp.to_dict())
    result = {"experiment": exp.name, "model": exp.model.name, "parameters": sum(p.numel() for p in model.parameters()), "best_epoch": best.get("epoch"), "valid": {k: best[k] for k in ("auc", "logloss", "gauc")}, "test": score("test"), "seconds_per_epoch": best.get("seconds"), "train_samples_per_s": best.get("samples_per_s"), **trainer.parallel}
    write_results(exp.run_dir, result)  # last: the mark of a complete run
    trainer.log(f"test: {json.dumps(result['test'])}")
    return result


def train_blend(exp: ExperimentConfig, models: dict[str, Callable[..., nn.Module]], train_part: Callable) -> dict:
    """Choose a blend's weights (``cascade.blend``) on the validation lists of its data, never on
    test: each model part trained first (``train_part``) if its run folder has none, every part
    scored and standardised per list, the weights by ``blend_weights`` on ``train.monitor``
    (Recall@k or NDCG@k of the logged positives). Writes ``best.pt`` (the blend with its parts'
    weights) and ``results.json``: the weights, and the blend beside each part alone on valid and
    test."""
    if exp.model.name != BLEND:
        raise ConfigError(f"{exp.where}.model.name: a 'task: blend' experiment's model is '{BLEND}', got '{exp.model.name}'")
    if exp.data.stream == "always":
        raise ConfigError(f"{exp.where}.data.stream: a blend reads its validation and test lists whole; set stream: auto or never")
    ds = prepare_data(exp.data)
    parts = blend_parts(exp, ds)
    loaded = {name: None if e is None else load_trained(e, ds, models, train_part) for name, e in parts.items()}
    lists = {split: build_lists(ds, split) for split in ("valid", "test")}
    metric, k = exp.train.monitor.split("@")
    quality = {"recall": M.recall_at_k, "ndcg": M.ndcg_at_k}[metric]
    figures = lambda scores, lst: {f"recall@{k}": quality_of(M.recall_at_k, scores, lst, int(k)), f"ndcg@{k}": quality_of(M.ndcg_at_k, scores, lst, int(k))}  # noqa: E731
    z = {}
    for split, lst in lists.items():
        raw = [lst.item[name].astype(np.float32) if m is None else score_lists(m, lst) for name, m in loaded.items()]
        z[split] = [standardised(torch.from_numpy(r), torch.from_numpy(lst.mask)).numpy() for r in raw]
    weights = blend_weights(z["valid"], lambda s: quality_of(quality, s, lists["valid"], int(k)))
    fields = {name: Slot(name, 0, 1, name) for name, m in loaded.items() if m is None}
    blend = Blend(loaded, weights, fields)
    exp.run_dir.mkdir(parents=True, exist_ok=True)
    state = {key: v.cpu() for key, v in blend.state_dict().items()}
    write_atomic(exp.run_dir / "best.pt", lambda f: torch.save(state, f))
    result = {"experiment": exp.name, "task": "blend", "model": BLEND, "weights": dict(zip(loaded, weights))}
    for split, lst in lists.items():
        blended = score_lists(blend, lst)
        result[split] = figures(blended, lst)
        result[f"{split}_parts"] = {name: figures(part, lst) for name, part in zip(loaded, z[split])}
    write_results(exp.run_dir, result)  # last: the mark of a complete run
    print(f"{exp.name}: " + " + ".join(f"{w:g} z({name})" for name, w in result["weights"].items()) + f" (on valid {exp.train.monitor}); test " + " ".join(f"{key} {v:.4f}" for key, v in result["test"].items()) + "; alone: " + "; ".join(f"{name} " + " ".join(f"{v:.4f}" for v in f.values()) for name, f in result["test_parts"].items()), flush=True)
    return result


def quality_of(metric: Callable, scores: np.ndarray, lists: ListBatch, k: int) -> float:
    """A list metric (``metrics.recall_at_k``, ``ndcg_at_k``) of ``scores`` against the lists'
    logged positives, as one number."""
    return float(metric(scores, lists.label, k, lists.mask))


def train_recall(exp: ExperimentConfig, models: dict[str, Callable[..., nn.Module]] = MODELS) -> dict:
    """Train a retrieval two-tower with sampled softmax; early-stop on validation Recall@k of the
    catalog retrieval (``train.monitor``, e.g. ``recall@200``); score test. A streamed run
    (``data.stream``) reads the candidates a row group at a time and keeps only the positives
    and the training pairs (``recall.streamed_training_data``)."""
    streamed = streams(exp.data)
    ds = prepare_data(exp.data, candidates=not streamed)
    torch.manual_seed(exp.train.seed)
    model = build_model(exp, ds, models)
    try:
        table = item_table(ds, model.item_slots)
    except ValueError as e:
        raise ConfigError(f"{exp.where}.model.drop_fields: {e}") from None
    if streamed:
        ds, train = streamed_training_data(ds, exp.data.dir, model, table, exp.recall)
    else:
        train = training_pairs(ds, model, "train", table, exp.recall)
    step = RecallStep(exp.recall, model, table, ds.items["item_id"], train)
    trainer = Trainer(model, exp.train, exp.run_dir)
    trainer.log(f"{exp.name}: recall with {exp.model.name} on {exp.data.dir}{' (streamed)' if streamed else ''}: {len(train):,} training pairs, {len(ds.items['item_id']):,} items")
    best = trainer.fit(train, step_loss=lambda b: step(model, b), evaluate=lambda: evaluate_recall(model, ds, "valid"), resolved_config=exp.to_dict())
    result = {"experiment": exp.name, "model": exp.model.name, "task": "recall", "best_epoch": best.get("epoch"), "valid": {k: v for k, v in best.items() if k.startswith("recall@")}, "test": evaluate_recall(model, ds, "test"), "seconds_per_epoch": best.get("seconds"), **trainer.parallel}
    write_results(exp.run_dir, result)  # last: the mark of a complete run
    trainer.log(f"test: {json.dumps(result['test'])}")
    return result

