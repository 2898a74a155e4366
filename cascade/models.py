"""The model zoo as the rest of the package sees it: the registry, building a model for a data
set, loading a trained one, and scoring lists with it.

``MODELS`` is the explicit registry of pre-rankers; ``cascade.cli`` adds the teachers to it (the
core never imports ``teachers/``). A model is any module with ``user_slots``, ``item_slots`` and
``forward(user (B, Wu), items (B, N, Wi)) -> (B, N)`` logits.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from cascade.blend import BLEND, Blend
from cascade.config import ConfigError, ExperimentConfig, load_config
from cascade.data.lists import ListBatch
from cascade.data.store import Dataset, memory_bytes
from cascade.saved import finished
from cascade.towers.cold import COLD
from cascade.towers.dat import DAT
from cascade.towers.dssm import DSSM
from cascade.towers.embedding import HISTORY, Embeddings, Slot, pack_items, pack_user
from cascade.towers.hit import HIT
from cascade.towers.inttower import IntTower
from cascade.towers.poly import MVKE, PolyEncoder
from cascade.towers.senet import SENetTwoTower
from cascade.towers.tarq import TARQ
from cascade.train import Tensors

MODELS: dict[str, Callable[..., nn.Module]] = {"dssm": DSSM, "senet": SENetTwoTower, "dat": DAT, "inttower": IntTower, "hit": HIT, "poly": PolyEncoder, "mvke": MVKE, "tarq": TARQ, "cold": COLD}


def build_model(exp: ExperimentConfig, ds: Dataset, models: dict[str, Callable[..., nn.Module]] = MODELS) -> nn.Module:
    if exp.model.name == BLEND:
        return build_blend(exp, ds, models)
    if exp.model.name not in models:
        raise ConfigError(f"{exp.where}.model.name: unknown model '{exp.model.name}' (have: {', '.join(models)})")
    spec = ds.schema.features
    drop = set(exp.model.drop_fields)
    unknown = sorted(drop - set(spec.names) - {HISTORY})
    if unknown:
        raise ConfigError(f"{exp.where}.model.drop_fields: unknown field '{unknown[0]}' (have: {', '.join(spec.names)}, {HISTORY})")
    user = tuple(f for f in spec.side("user") if f.name not in drop)
    item = tuple(f for f in spec.side("item") if f.name not in drop)
    history_len = 0 if HISTORY in drop else ds.schema.history_max
    _check_embedding_memory(spec.fields, exp.model.embedding_dim, exp.where)
    embeddings = Embeddings(spec, exp.model.embedding_dim, history_fields(exp, ds))
    try:
        return models[exp.model.name](user, item, embeddings, history_len=history_len, **exp.model.params)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{exp.where}.model: {exp.model.name} with params {exp.model.params}: {e}") from None


def history_fields(exp: ExperimentConfig, ds: Dataset) -> dict[str, np.ndarray]:
    """``model.history_fields`` as ``Embeddings`` takes them: each field's id of every item id
    (0 for ids the items table lacks), from the items table."""
    usable = [f.name for f in ds.schema.features.in_table("items") if not f.multi and f.name != "item_id"]
    out = {}
    for name in exp.model.history_fields:
        if name not in usable:
            raise ConfigError(f"{exp.where}.model.history_fields: '{name}' is not a single-valued field of the items table (have: {', '.join(usable) or 'none'})")
        out[name] = np.zeros(ds.schema.features["item_id"].vocab + 1, np.int64)
        out[name][ds.items["item_id"]] = ds.items[name]
    return out


def blend_parts(exp: ExperimentConfig, ds: Dataset) -> dict[str, ExperimentConfig | None]:
    """A blend's parts by name: an experiment of its config file, or None for an item field."""
    parts = exp.model.params.get("parts")
    if not isinstance(parts, list) or len(parts) < 2 or not all(isinstance(p, str) for p in parts) or len(set(parts)) < len(parts):
        raise ConfigError(f"{exp.where}.model.params.parts: expected a list of two or more distinct names (experiments of this file or item fields), got {parts!r}")
    extra = sorted(set(exp.model.params) - {"parts"})
    if extra:
        raise ConfigError(f"{exp.where}.model.params: unknown key '{extra[0]}' (a blend has 'parts'; its weights are chosen on validation)")
    experiments = {e.name: e for e in load_config(exp.source)} if exp.source else {}
    fields = {f.name for f in ds.schema.features.side("item") if not f.multi}
    out = {}
    for name in parts:
        if name in experiments and name != exp.name:
            out[name] = experiments[name]
        elif name in fields:
            out[name] = None
        else:
            raise ConfigError(f"{exp.where}.model.params.parts: '{name}' is neither another experiment of {exp.source} nor an item field of {exp.data.dir} (fields: {', '.join(sorted(fields))})")
    return out


def build_blend(exp: ExperimentConfig, ds: Dataset, models: dict[str, Callable[..., nn.Module]]) -> Blend:
    """The blend of ``exp`` with its parts' architectures (their weights and the blend's are
    loaded after); its weights start at the first part alone."""
    parts = blend_parts(exp, ds)
    built = {name: None if e is None else build_model(e, ds, models) for name, e in parts.items()}
    fields = {name: Slot(name, 0, 1, name) for name, e in parts.items() if e is None}
    return Blend(built, [1.0] + [0.0] * (len(parts) - 1), fields)


TRAINING_COPIES = 4  # weights, gradients and Adam's two moments


def _check_embedding_memory(spec_fields, dim: int, where: str) -> None:
    """Refuse embedding tables that cannot be trained in this machine's memory, naming the
    largest field and the bytes, before anything is allocated."""
    sizes = {f.name: (f.vocab + 1) * dim * 4 * TRAINING_COPIES for f in spec_fields}
    limit = memory_bytes()
    if sum(sizes.values()) > limit:
        name = max(sizes, key=sizes.get)
        raise ConfigError(f"{where}.model.embedding_dim: {dim} x the vocabularies needs {sum(sizes.values()) / 2**30:,.1f} GiB to train (weights, gradients, Adam; '{name}' alone {sizes[name] / 2**30:,.1f} GiB for {sizes[name] // (dim * 4 * TRAINING_COPIES) - 1:,} ids); this machine has {limit / 2**30:,.1f} GiB")


def load_trained(exp: ExperimentConfig, ds: Dataset, models: dict[str, Callable[..., nn.Module]], train: Callable) -> nn.Module:
    """The frozen model of ``exp`` (a teacher, a recall tower): trained first (by ``train``)
    unless its run folder already holds ``best.pt`` and ``results.json``."""
    if not (finished(exp.run_dir) and (exp.run_dir / "best.pt").exists()):
        train(exp)
    torch.manual_seed(exp.train.seed)
    model = build_model(exp, ds, models)
    model.load_state_dict(torch.load(exp.run_dir / "best.pt", weights_only=True, map_location="cpu"))
    return model.eval()


def training_forward(model: nn.Module, batch: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, N) of ``batch`` and the model's own regulariser () from one forward pass: its
    ``regularised`` where it has one (DAT's mimic, HIT's generation, IntTower's CIR), else 0.
    A task adds the regulariser to its own loss (BCE on exposures, a distillation mix)."""
    own = getattr(model, "regularised", None)
    if own is None:
        return model(batch.user, batch.items), batch.label.new_zeros(())
    return own(batch.user, batch.items, batch.label, batch.mask)


@torch.no_grad()
def predict(model: nn.Module, data: Tensors, batch_size: int = 8192) -> np.ndarray:
    """Logits (R, N) of ``model`` on ``data``, computed on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(b.user, b.items).cpu() for b in data.to(device).batches(batch_size)]).numpy()


def list_tensors(lists: ListBatch, model: nn.Module, teacher: np.ndarray | None = None) -> Tensors:
    """A ListBatch packed for ``model``: user (B, Wu), items (B, N, Wi), label, mask, stage and
    the teacher's logits (B, N)."""
    return Tensors(
        user=torch.from_numpy(pack_user(lists, model.user_slots)),
        items=torch.from_numpy(pack_items(lists, model.item_slots)),
        label=torch.from_numpy(lists.label),
        mask=torch.from_numpy(lists.mask),
        teacher=None if teacher is None else torch.from_numpy(teacher.astype(np.float32)),
        stage=torch.from_numpy(lists.stage.astype(np.int64)),
    )


def score_lists(model: nn.Module, lists: ListBatch, lists_per_batch: int = 64) -> np.ndarray:
    """The model's logits (B, N) for every candidate of ``lists`` (padding: 0)."""
    return np.where(lists.mask, predict(model, list_tensors(lists, model), lists_per_batch), 0.0).astype(np.float32)
