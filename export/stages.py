"""The trained stages `cascade export` takes: those a ``task: cascade`` run saved
(``stages.json``), or a recall, a pre-rank and a rank run named as ``CONFIG:EXPERIMENT``, with the
item trend their pre-ranker and ranker were trained on; and the parity of the served bundle
against the same cascade in torch."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cascade import evaluate
from cascade.cascade import Cascade
from cascade.config import ConfigError, DataConfig, ExperimentConfig, load_config
from cascade.data.store import Dataset
from cascade.eval_data import EvalData
from cascade.data.trend import TrendSpec
from cascade.prepare import streams, trend_spec, with_trend_fields
from cascade.models import MODELS, build_model
from cascade.saved import STAGE_NAMES, STAGES_FILE, SavedError, read_stages
from export.bundle import BundleError, StageModel
from teachers import TEACHERS

def _experiment(spec: str, where: str) -> ExperimentConfig:
    config, sep, name = spec.rpartition(":")
    if not sep or not config or not name:
        raise BundleError(f"{where}: expected CONFIG:EXPERIMENT, got '{spec}'")
    try:
        (exp,) = load_config(config, name)
    except ConfigError as e:
        raise BundleError(f"{where}: {e}") from None
    return exp


def _stage(role: str, exp: ExperimentConfig, ds: Dataset, quota: int, weights: Path | None = None) -> StageModel:
    """``ds``: the logs, with the trend fields in its schema where the stages read the trend."""
    source = {"config": str(exp.run_dir), "experiment": exp.name}
    if exp.model.name == "gbdt":
        if role != "rank":
            raise BundleError(f"--{role}: a LightGBM model can only be the rank stage")
        path = exp.run_dir / "model.txt"
        if not path.exists():
            raise BundleError(f"--rank: {path} is missing (train '{exp.name}' first)")
        return StageModel(role, "gbdt", path, quota, source | {"run": str(exp.run_dir)}, {k: v for k, v in exp.model.params.items() if k in ("objective",)} | {"drop_fields": list(exp.model.drop_fields)})
    weights = weights or exp.run_dir / "best.pt"
    if not weights.exists():
        raise BundleError(f"{role}: {weights} is missing (train '{exp.name}' first)")
    torch.manual_seed(exp.train.seed)
    try:
        model = build_model(exp, ds, {**MODELS, **TEACHERS})
    except ConfigError as e:
        raise BundleError(f"{role}: {e}") from None
    model.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"))
    if role == "recall" and not hasattr(model, "dot_scale"):  # a pre-ranker may be any model: without towers it scores each candidate whole
        raise BundleError(f"{role}: model '{exp.model.name}' is not a two-tower model (recall searches an index of item vectors)")
    return StageModel(role, exp.model.name, model.eval(), quota, source | {"weights": str(weights)})


def _data(cfg: DataConfig) -> EvalData:
    if not Path(cfg.dir).exists():
        raise BundleError(f"recall: its data directory {cfg.dir} is missing (train the cascade first)")
    return EvalData.read(cfg.dir, streams(cfg))


def from_run(run_dir: str | Path, quotas: tuple[int, int, int] | None = None) -> tuple[EvalData, list[StageModel], TrendSpec]:
    """The stages a ``task: cascade`` run saved, over the recall experiment's logs (read as the
    cascade's ``data.stream`` says: an export reads the catalog and a few test requests), with
    the run's quotas or ``quotas`` (recall, prerank, rank)."""
    try:
        saved = read_stages(run_dir)
    except SavedError as e:
        raise BundleError(f"{e} (RUN_DIR must be a finished 'task: cascade' run, or name the stages with --recall, --prerank and --rank)") from None
    path = Path(run_dir) / STAGES_FILE
    exps = {name: _experiment(f"{saved[name].config}:{saved[name].experiment}", f"{path}: {name}") for name in STAGE_NAMES}
    data = _data(replace(exps["recall"].data, stream=saved.data_stream))
    trend = _trend(exps)
    quotas = quotas or tuple(saved[name].quota for name in STAGE_NAMES)
    return data, [_stage(name, exps[name], _logs(data, name, trend), q, saved.weights(name)) for name, q in zip(STAGE_NAMES, quotas)], trend


def from_named(specs: dict[str, str], quotas: tuple[int, int, int]) -> tuple[EvalData, list[StageModel], TrendSpec]:
    """Stages named ``CONFIG:EXPERIMENT`` each, with their quotas (recall, prerank, rank)."""
    exps = {name: _experiment(specs[name], f"--{name}") for name in STAGE_NAMES}
    data = _data(exps["recall"].data)
    trend = _trend(exps)
    return data, [_stage(role, exps[role], _logs(data, role, trend), q) for role, q in zip(STAGE_NAMES, quotas)], trend


def _trend(exps: dict[str, ExperimentConfig]) -> TrendSpec:
    """The item trend the pre-ranker and ranker were trained on (what the bundle serves online)."""
    try:
        trend = trend_spec(exps["prerank"], exps["rank"])
    except ConfigError as e:
        raise BundleError(str(e)) from None
    if trend and exps["recall"].data.recall.get("trend_days"):
        raise BundleError(f"--recall: '{exps['recall'].name}' reads the item trend; recall retrieves from the whole catalog, which has none")
    return trend


def _logs(data: EvalData, role: str, trend: TrendSpec) -> Dataset:
    """The logs a stage's model is built from: the trend's fields in the schema past recall."""
    return data.ds if role == "recall" else with_trend_fields(data.ds, trend)


def torch_cascade(data: EvalData, stages: list[StageModel], trend: TrendSpec = TrendSpec()) -> Cascade:
    """The same cascade with its torch models (the reference the bundle is checked against), the
    item trend counted from every logged exposure."""
    if isinstance(stages[2].model, Path):
        raise BundleError("a LightGBM rank stage has no torch reference")
    return evaluate.torch_cascade(data.ds, {s.name: s.model for s in stages}, {s.name: s.quota for s in stages}, trend, data.trend() if trend else None)


def parity(service, reference: Cascade, data: EvalData, n: int = 256) -> dict[str, float]:
    """The bundle served against the torch cascade on the first ``n`` test requests: the share of
    requests whose recall set, pre-rank set and final top-k are the same, and the largest score
    gap of the final items. A bundle with online features first takes the logged exposures its
    snapshot lacks (the test split's), as a replay would post them: the counters' windows end
    strictly before each request's ts, so events past it change nothing."""
    requests = data.first("test", n)
    requests = requests.take_columns(np.zeros((len(requests), 0), int))
    if service.online is not None:
        service.catch_up(data.trend())
    want = reference.run(requests)
    got = service.cascade.run(requests)
    out = {"requests": len(requests)}
    for i, name in enumerate(STAGE_NAMES):
        w, g = want.stages[i], got.stages[i]
        ws = [set(r[k].tolist()) for r, k in zip(w.lists.item["item_id"], w.kept)]
        gs = [set(r[k].tolist()) for r, k in zip(g.lists.item["item_id"], g.kept)]
        out[f"same_{name}_survivors"] = float(np.mean([a == b for a, b in zip(ws, gs)]))
    same = want.items == got.items
    out["same_final_order"] = float(np.mean(same.all(axis=1)))
    out["max_final_score_gap"] = float(np.abs(np.where(same, want.scores - got.scores, 0)).max(initial=0.0))
    return out
