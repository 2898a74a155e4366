"""A run's logs: read from ``data.dir``, made first from the configured source when missing.

Three kinds make themselves (``synth``, ``movielens``); a ``recall_output`` data set is made by
running a trained recall tower over the catalog, which may mean training it first. That maker
lives with the recall task (``cascade.tasks.recall.frozen_recall_output``) and comes in as the
argument ``recall_output``, so a call that can train a model says so. Without it, a missing
``recall_output`` directory is an error naming it.

Also here: the item trend a config's stages read (``trend_spec``), which evaluation and export
need as much as training does.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

from cascade.config import ConfigError, DataConfig, ExperimentConfig
from cascade.data.store import Dataset, memory_bytes, read_dataset, write_dataset
from cascade.data.stream import fits_in_memory, in_memory_bytes
from cascade.data.trend import TREND_SCALES, TrendSpec, trend_schema
from cascade.distributed import rank_zero_first

RecallOutputMaker = Callable[[dict], Dataset]  # data.recall ({config, experiment, n, ...}) -> the recall output


def prepare_data(cfg: DataConfig, candidates: bool = True, recall_output: RecallOutputMaker | None = None) -> Dataset:
    """Read ``cfg.dir``; when it is missing, make it from the configured source first (in a
    data-parallel run, rank 0 makes it while the others wait; a recall output by
    ``recall_output``). ``candidates=False`` reads every table but the candidates (for a run
    that streams them)."""
    with rank_zero_first():
        make_data(cfg, recall_output)
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


def make_data(cfg: DataConfig, recall_output: RecallOutputMaker | None = None) -> None:
    """Write ``cfg.dir`` from the configured source unless it exists; a ``recall_output`` data
    set by ``recall_output`` (which may train the recall experiment it names)."""
    out = Path(cfg.dir)
    if not out.exists():
        if cfg.kind == "synth":
            from cascade.data.synth import WORLD_FILE, generate, world_config

            ds, world = generate(world_config(cfg.synth))
            write_dataset(ds, out, {WORLD_FILE: world.to_bytes()})
        elif cfg.kind == "movielens":
            from cascade.data.movielens import convert

            if cfg.src is None:
                raise ConfigError("data.src: the MovieLens-1M folder is required for kind 'movielens'")
            ds, _ = convert(cfg.src, cfg.protocol)
            write_dataset(ds, out)
        elif cfg.kind == "recall_output":
            if recall_output is None:
                raise ConfigError(f"data.dir: {out} does not exist; a 'recall_output' data set is made by training (`cascade train` or `cascade run` of its config)")
            write_dataset(recall_output(cfg.recall), out)
        else:
            raise ConfigError(f"data.dir: {out} does not exist (kind '{cfg.kind}' cannot make it)")


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


def streams(cfg: DataConfig, recall_output: RecallOutputMaker | None = None) -> bool:
    """Whether a pointwise, distill, recall or cascade run on ``cfg`` streams its candidates
    (``data.stream``); with ``auto`` the logs are made first (see ``make_data``) to be measured."""
    if cfg.stream == "auto":
        with rank_zero_first():
            make_data(cfg, recall_output)
        return not fits_in_memory(cfg.dir)
    return cfg.stream == "always"
