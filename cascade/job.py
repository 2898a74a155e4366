"""`cascade run CONFIG`: the whole job for one config, step by step, resuming finished steps:
the logs -> every stage trained (``pointwise`` and ``recall`` tasks) -> distillation (``distill``)
-> the cascades (``cascade``) -> each cascade exported as a bundle (``RUN_DIR/bundle``) -> one
evaluation report over every cascade (``OUT/report``), ending with the comparison table.

Like the CLI, this sits above ``export`` and ``teachers`` in the import order.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cascade.config import ConfigError, ExperimentConfig, load_config
from cascade.tasks import TASKS
from cascade.report import METRICS_FILE, cell, opening, plain, read_entries, teacher_recall_name, text_table, without_empty_columns
from cascade.saved import RESULTS_FILE, STAGE_NAMES, STAGES_FILE, finished, read_results



@dataclass
class Step:
    name: str
    done: Callable[[], bool]
    do: Callable[[], object]


def _finished(exp: ExperimentConfig) -> bool:
    return finished(exp.run_dir) and (exp.task != "cascade" or (exp.run_dir / STAGES_FILE).exists())


def plan(config: Path) -> tuple[list[Step], list[ExperimentConfig], Path]:
    """The steps of ``config``'s job, its cascades and the report directory."""
    from cascade.tasks import train_experiment
    from cascade.models import MODELS
    from cascade.prepare import prepare_data
    from cascade.tasks.recall import frozen_recall_output
    from teachers import BOOSTED, TEACHERS

    exps = load_config(config)
    if not exps:
        raise ConfigError(f"{config}: no experiments")
    cascades = [e for e in exps if e.task == "cascade"]
    if not cascades:
        raise ConfigError(f"{config}: no 'task: cascade' experiment, so nothing to export or evaluate; `cascade train` trains single stages")
    models = {**MODELS, **TEACHERS}
    steps = [Step(f"data {exps[0].data.dir}", lambda: Path(exps[0].data.dir).exists(), lambda: prepare_data(exps[0].data, candidates=False, recall_output=frozen_recall_output))]  # made and its tables checked; each run reads the candidates its own way
    for task in TASKS:  # in their training order
        for exp in (e for e in exps if e.task == task):
            steps.append(Step(f"train {exp.name} (task: {task})", lambda exp=exp: _finished(exp), lambda exp=exp: train_experiment(exp, config, models, BOOSTED)))
    for exp in cascades:
        steps.append(Step(f"export {exp.name}", lambda exp=exp: exported(exp.run_dir), lambda exp=exp: export_run(exp.run_dir)))
    report = cascades[0].run_dir.parent / "report"

    def report_fresh() -> bool:
        made = report / METRICS_FILE
        return made.exists() and all(made.stat().st_mtime > (e.run_dir / RESULTS_FILE).stat().st_mtime for e in cascades if finished(e.run_dir))

    blends = [e.run_dir for e in exps if e.task == "blend"]  # each shown beside its parts
    steps.append(Step(f"eval -> {report}", report_fresh, lambda: evaluate_runs([e.run_dir for e in cascades] + blends, report)))
    return steps, cascades, report


def exported(run_dir: Path) -> bool:
    """The run's bundle is written, and replayed where it serves online features."""
    from export.bundle import MANIFEST, read_manifest

    if not (run_dir / "bundle" / MANIFEST).exists():
        return False
    return not read_manifest(run_dir / "bundle").get("online") or (run_dir / "replay.json").exists()


def export_run(run_dir: Path) -> Path:
    """``cascade export RUN_DIR --out RUN_DIR/bundle`` (exact faiss index), with the parity check;
    a bundle with online features is then served over HTTP and the whole test split replayed
    through it (``RUN_DIR/replay.json``)."""
    from export.bundle import IndexSpec, write_bundle
    from export.runtime import CascadeService
    from cascade.data.store import write_text_atomic
    from export.replay import replay_served, summary
    from export.stages import from_run, parity, torch_cascade

    data, stages, trend = from_run(run_dir)
    out = write_bundle(data, *stages, run_dir / "bundle", IndexSpec("flat"), source={"run_dir": str(Path(run_dir).resolve())}, trend=trend)
    reference = torch_cascade(data, stages, trend)
    report = parity(CascadeService(out), reference, data)
    print("  parity against torch: " + " ".join(f"{k} {v:.6g}" for k, v in report.items()), flush=True)
    if trend:  # its online features: the whole test split replayed through the served bundle
        replayed = replay_served(out, data, reference)
        print("  " + summary(replayed), flush=True)
        write_text_atomic(out.parent / "replay.json", json.dumps({k: v for k, v in replayed.items() if k != "per_request"}, indent=2) + "\n")
    return out


def evaluate_runs(paths: list[Path], out: Path, seed: int = 0) -> list[dict]:
    from cascade.report import write_report

    entries = [evaluate_path(p, seed) for p in paths]
    write_report(entries, out)
    return entries


LATENCY_REQUESTS = 200  # test requests served one at a time for the latency figures
UNTRAINED_REQUESTS = 1000  # about this many test requests, drawn at random, for the untrained cascade's reference row


def _stage_entry(path: Path) -> dict:
    """One stage's run: its own test figures, as it reported them (a blend's parts beside it)."""
    results = read_results(path)
    test = {k: v for k, v in results.get("test", {}).items() if isinstance(v, (int, float))}
    if not test:
        raise ValueError(f"{path}/{RESULTS_FILE}: no test figures (an unfinished run?)")
    parts = {name: {"test": figures} for name, figures in results.get("test_parts", {}).items()}  # a blend's parts alone
    return {"label": results.get("experiment", path.name), "path": str(path), "kind": "stage", "task": results.get("task", "pointwise"), "metrics": {"test": test} | ({"parts": parts} if parts else {}), "notes": []}


def _cascade_to_evaluate(path: Path, models: dict):
    """(the saved cascade, what serves it, what its latency is measured on, which that is, the
    entry's kind, its label) for a bundle of a cascade run or a cascade run itself (its bundle's
    onnxruntime latency when it was exported, else torch's)."""
    from cascade.evaluate import load_saved
    from export.runtime import CascadeService

    if (path / "manifest.json").exists():
        service = CascadeService(path)
        source = service.manifest.get("source", {}).get("run_dir")
        if source is None:
            raise ValueError(f"{path}: a bundle of named stages; evaluate their cascade run instead (it needs the logs)")
        saved = load_saved(source, models=models)
        if service.online is not None:
            service.catch_up(saved.data.trend())
        label = f"{path.parent.name if path.name == 'bundle' else path.name} (bundle)"
        return saved, service.cascade, service.cascade, "onnxruntime bundle", "bundle", label
    saved = load_saved(path, models=models)
    label = read_results(path)["experiment"] if finished(path) else path.name
    if not (path / "bundle" / "manifest.json").exists():
        served = saved.cascade()
        return saved, served, served, "torch", "run", label
    service = CascadeService(path / "bundle")
    if service.online is not None:
        service.catch_up(saved.data.trend())
    return saved, saved.cascade(), service.cascade, "onnxruntime bundle", "run", label


def evaluate_path(path: Path, seed: int = 0) -> dict:
    """One evaluated run or bundle (``cascade.report``'s entry): a bundle, a cascade run
    (``stages.json``) or one stage's run (``results.json``)."""
    from cascade.cascade import Catalog
    from cascade.evaluate import evaluate, flops_per_candidate, flow_figures, latency, load_saved, trained_as_probabilities
    from cascade.models import MODELS
    from cascade.tasks.cascade import got_worse
    from teachers import TEACHERS

    models = {**MODELS, **TEACHERS}
    if not path.is_dir():
        raise ValueError(f"{path}: no such directory")
    if not (path / "manifest.json").exists() and not (path / STAGES_FILE).exists():
        if finished(path):
            return _stage_entry(path)
        raise ValueError(f"{path}: neither a 'task: cascade' run ({STAGES_FILE}), a bundle (manifest.json) nor a trained stage ({RESULTS_FILE})")
    saved, served, served_latency, latency_of, kind, label = _cascade_to_evaluate(path, models)
    print(f"evaluating {label}: {path}", flush=True)
    if saved.data.streamed:
        print(f"  {saved.data.directory}: streamed (data.stream), read a row group at a time", flush=True)
    clock = [time.perf_counter()]

    def done(what: str) -> None:  # each phase's own duration
        now = time.perf_counter()
        print(f"  {what}: {now - clock[0]:.0f}s", flush=True)
        clock[0] = now

    metrics = evaluate(served, saved.data, saved.world, seed=seed)
    done(f"quality and baselines on {metrics['requests']:,} test requests")
    first = saved.data.first("test", LATENCY_REQUESTS)
    lists = Catalog.from_dataset(saved.ds, saved.trend, saved.data.trend() if saved.trend else None).add_trend(first)  # the trend fields the torch models read
    catalog = len(saved.ds.items["item_id"])
    p50, p95 = latency(served_latency, first)
    cost = {
        "flops_per_candidate": {role: flops_per_candidate(saved.models[role], lists, role, n) for role, n in (("recall", catalog), ("prerank", saved.quotas["recall"]), ("rank", saved.quotas["prerank"]))},
        "latency_ms": p50,
        "latency_p95_ms": p95,
        "latency_of": latency_of,
    }
    done(f"cost: FLOPs and latency ({latency_of})")
    pre = saved.exps["prerank"]
    teacher = pre.distill.teacher if pre.task == "distill" and pre.distill.guided else None
    entry = {
        "label": label, "path": str(path), "kind": kind, "metrics": metrics, "cost": cost, "notes": [],
        "prerank": {"experiment": pre.name, "distilled_from": teacher},
        "probabilities": {name: trained_as_probabilities(exp) for name, exp in saved.exps.items()},
    }
    if kind == "run":
        untrained = load_saved(path, untrained=True, models=models, data=saved.data)
        share = min(1.0, UNTRAINED_REQUESTS / metrics["requests"])
        entry["untrained"] = flow_figures(untrained.cascade(), untrained.data, untrained.world, share=share, seed=seed)
        done(f"the untrained cascade on {entry['untrained']['requests']:,} test requests")
        worse = got_worse(read_results(path).get("rounds", [])) if finished(path) else None
        if worse:
            entry["notes"].append(f"training {worse}")
    if saved.world is None:
        entry["notes"].append("no oracle ratio or stage blame: these need the synthetic world's truth")
    return entry


def run_job(config: Path) -> Path:
    """Every step of ``config``'s job not yet done; returns the report directory."""
    steps, cascades, report = plan(config)
    for i, step in enumerate(steps, 1):
        if step.done():
            print(f"[{i}/{len(steps)}] {step.name}: done before, kept", flush=True)
            continue
        print(f"[{i}/{len(steps)}] {step.name} ...", flush=True)
        start = time.perf_counter()
        step.do()
        print(f"[{i}/{len(steps)}] {step.name}: done in {time.perf_counter() - start:.0f}s", flush=True)
    print()
    print(summary(read_entries(report)))
    print(f"\nreport: {(report / 'report.html').resolve()}")
    return report


def summary(entries: list[dict]) -> str:
    """What ``cascade run`` and ``cascade eval`` print at the end: the verdict, then one row per cascade."""
    said, _ = opening(entries)
    return "\n".join([plain(s) for s in said] + ([""] if said else []) + [comparison(entries)])


def comparison(entries: list[dict]) -> str:
    """The job's closing table: one row per cascade."""
    entries = [e for e in entries if e["kind"] != "stage"]
    if not entries:
        return "(no cascade evaluated)"
    q = entries[0]["metrics"]["quotas"]
    tr = f"teacher_recall@{q['rank']}@{q['prerank']}"
    header = ["cascade", "joint recall", teacher_recall_name(entries[0]), "oracle ratio", "recall p50 ms", "pre-rank p50 ms", "rank p50 ms"]
    rows = []
    for e in entries:
        flow, lat = e["metrics"]["flow"], e["cost"]["latency_ms"]
        figures = [flow["joint_recall"], flow.get(tr, float("nan")), flow.get("oracle_ratio", float("nan"))]
        rows.append([e["label"]] + [cell([x]) for x in figures] + [cell([lat.get(s, math.nan)], 2) for s in STAGE_NAMES])
    of = entries[0]["cost"]["latency_of"]
    return text_table(without_empty_columns({"header": header, "rows": rows})) + f"\n(ms: p50 per request and stage, {of}; the terms are explained at the end of the report)"
