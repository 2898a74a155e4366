"""The export bundle: one directory per trained cascade, written whole or not at all, verified
file by file on load.

```
BUNDLE/
  manifest.json        format, stages (model, quota, inputs, score), index, libraries, source
                       runs, sha256 of every other file
  schema.json          the data set's schema (fields, vocabularies, history length)
  catalog.npz          every item's items-table fields by id (row 0 = padding)
  recall/user.onnx     the recall tower's user side
  recall/index.faiss   its item vectors for the whole catalog; recall/item_ids.npy maps rows to ids
  prerank/user.onnx    the pre-ranker's user tower; prerank/item.onnx its item tower
  prerank/items.npy    the item side cached for the whole catalog (max id + 1, Hv, D), by id
  prerank/score.onnx   the score head, where the score is not a plain dot (MaxSim)
  rank/model.onnx      a neural ranker whole, or rank/model.txt (LightGBM's own model file)
  online/events.npy    where a stage reads the item trend: the logged exposures before the test
                       split, as sorted event keys (``cascade.data.trend.event_keys``); the
                       manifest's ``online`` holds the trend's definition (``OnlineFeatures``)
```

A pre-ranker whose item tower reads the trend has no cached item side: its item tower runs on the
candidates at request time (``item_vectors: "live"``).

``write_bundle`` builds it from trained stages; ``verify_bundle`` refuses a missing, extra or
altered file, naming it (``BundleError``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from torch import nn

from cascade.cascade import Catalog
from cascade.data.lists import ListBatch
from cascade.data.schema import SCHEMA_FILE
from cascade.data.store import Dataset, replacing_directory
from cascade.eval_data import EvalData
from cascade.data.trend import ItemTrend, TrendSpec, trend_field_name
from cascade.recall import item_table, item_vectors
from export.online import OnlineFeatures
from export.onnx import export_ranker, export_tower, export_two_tower, flat_items, item_inputs, session, user_inputs

FORMAT = "cascade-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CATALOG = "catalog.npz"
EVENTS = "online/events.npy"
INDEXES = ("flat", "ivf", "hnsw", "ivfpq")


class BundleError(ValueError):
    """A bundle that cannot be used, naming the file and what is wrong with it."""


@dataclass(frozen=True)
class IndexSpec:
    """The faiss index over the recall tower's item vectors (inner product): ``flat`` exact;
    ``ivf`` (nlist, nprobe), ``hnsw`` (hnsw_m, ef_search), ``ivfpq`` (nlist, nprobe, pq_m) for
    large catalogs. ``refine`` (ivfpq only; 0: none): the PQ search returns refine x k items,
    re-scored on 8-bit scalar-quantised vectors (faiss ``Refine(SQ8)``), for PQ codes lose more
    of the order than the inverted lists do (benchmarks/results/faiss_scale.md)."""

    kind: str = "flat"
    nlist: int = 1024
    nprobe: int = 128  # of 1024 lists: 0.96 of the exact top-1000 over 100k items (serving.md)
    hnsw_m: int = 32
    ef_search: int = 2000  # faiss HNSW wants it well above k: ef 1000 keeps 0.90 of a top-1000, 2000 0.96
    pq_m: int = 16
    refine: int = 0

    def __post_init__(self) -> None:
        if self.kind not in INDEXES:
            raise ValueError(f"index '{self.kind}' is not one of {', '.join(INDEXES)}")
        if self.refine < 0 or (self.refine and self.kind != "ivfpq"):
            raise ValueError(f"refine {self.refine}: only an ivfpq index is refined, by a whole factor >= 1 (0: none)")

    def factory(self, n_items: int) -> str:
        nlist = max(1, min(self.nlist, n_items // 39))  # faiss wants >= 39 training points a centroid
        bits = int(max(1, min(8, np.log2(max(n_items // 39, 2)))))  # PQ codebooks of <= 2^bits centroids, same rule
        return {"flat": "Flat", "ivf": f"IVF{nlist},Flat", "hnsw": f"HNSW{self.hnsw_m}", "ivfpq": f"IVF{nlist},PQ{self.pq_m}x{bits}"}[self.kind] + (",Refine(SQ8)" if self.refine else "")

    def search_parameters(self) -> dict[str, int]:
        refine = {"k_factor_rf": self.refine} if self.refine else {}
        return {"ivf": {"nprobe": self.nprobe}, "ivfpq": {"nprobe": self.nprobe, **refine}, "hnsw": {"efSearch": self.ef_search}}.get(self.kind, {})


@dataclass
class StageModel:
    """A trained stage to export: ``model`` is a torch module, or for a LightGBM ranker the path
    of its ``model.txt`` with its ``params``; ``source`` says where it came from."""

    name: str
    model_name: str
    model: nn.Module | Path
    quota: int
    source: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("cascade", "torch", "numpy", "onnx", "onnxruntime", "faiss-cpu", "lightgbm"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _slots(slots) -> list[dict[str, Any]]:
    return [{"name": s.name, "width": s.width} for s in slots]


def _check_catalog_fields(stage: StageModel, names: set[str]) -> None:
    slots = getattr(stage.model, "item_slots", ())
    missing = [s.name for s in slots if s.name not in names]
    if missing:
        raise BundleError(f"stage '{stage.name}': item field '{missing[0]}' is stored per candidate, so a served item picked from the catalog has no value for it")


def build_index(vectors: np.ndarray, spec: IndexSpec) -> faiss.Index:
    """vectors (I, D) -> the faiss index ``spec`` describes, trained (on a sample faiss draws:
    at most 256 points a centroid) and filled; its search parameters are ``set_search``'s."""
    index = faiss.index_factory(vectors.shape[1], spec.factory(len(vectors)), faiss.METRIC_INNER_PRODUCT)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if not index.is_trained:
        index.train(x)
    index.add(x)
    return index


def set_search(index: faiss.Index, params: dict[str, int]) -> faiss.Index:
    """``index`` searching with ``params`` (``IndexSpec.search_parameters``: nprobe, efSearch)."""
    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)
    return index


def _write_index(vectors: np.ndarray, spec: IndexSpec, path: Path) -> None:
    faiss.write_index(build_index(vectors, spec), str(path))


def _quantize(path: Path) -> None:
    """int8 dynamic quantisation of the graph's weights, in place."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_suffix(".int8.onnx")
    quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8)
    tmp.replace(path)


def online_definition(data: EvalData, trend: TrendSpec) -> tuple[OnlineFeatures, ItemTrend]:
    """The online features of stages trained on ``trend``, and the snapshot a bundle carries: the
    logs' exposures strictly before the first test request (the test split is what a replay, or
    live traffic, adds)."""
    req = data.ds.requests
    test_ts = req["ts"][req["split"] == "test"]
    until = int(test_ts.min()) if len(test_ts) else int(req["ts"].max()) + 1
    return OnlineFeatures(trend, until), data.trend().before(until)


def write_bundle(data: EvalData, recall: StageModel, prerank: StageModel, rank: StageModel, out: str | Path, index: IndexSpec = IndexSpec(), *, quantize: bool = False, source: dict[str, Any] | None = None, trend: TrendSpec = TrendSpec()) -> Path:
    """Export the three stages over the catalog of the logs ``data`` (read whole or streamed) into
    the bundle ``out`` (whole or not at all). ``quantize``: int8 dynamic quantisation of the
    pre-ranker's and ranker's graphs. ``trend``: the item trend the stages were trained with,
    served as an online feature."""
    if not recall.quota > prerank.quota > rank.quota > 0:
        raise BundleError(f"quotas must shrink: recall {recall.quota}, prerank {prerank.quota}, rank {rank.quota}")
    ds = data.ds
    catalog = Catalog.from_dataset(ds, trend, data.trend() if trend else None)
    names = set(catalog.by_id) | {trend_field_name(d) for d in trend.days}
    for stage in (recall, prerank, rank):
        _check_catalog_fields(stage, names)
    if trend and isinstance(rank.model, Path):
        raise BundleError("rank: a LightGBM ranker cannot read the item trend in a bundle yet")
    # three real test requests as the example inputs the graphs are traced with
    requests = data.first("test", 3)
    example = catalog.attach(requests, np.resize(catalog.item_ids, (len(requests), 4)))
    out = Path(out)
    stages = []
    with replacing_directory(out) as tmp:
        (tmp / SCHEMA_FILE).write_text(ds.schema.to_json())
        np.savez(tmp / CATALOG, **catalog.rows())
        online = None
        if trend:
            definition, snapshot = online_definition(data, trend)
            (tmp / EVENTS).parent.mkdir()
            np.save(tmp / EVENTS, snapshot.keys)
            online = definition.to_json() | {"events": EVENTS, "snapshot_events": int(len(snapshot.keys))}
        stages.append(_write_recall(recall, ds, example, tmp / "recall", index))
        stages.append(write_prerank(prerank, catalog, example, tmp / "prerank", quantize))
        stages.append(_write_rank(rank, example, tmp / "rank", quantize))
        files = {str(p.relative_to(tmp)): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dataset": ds.schema.name,
            "items": int(len(catalog.item_ids)),
            "stages": stages,
            "online": online,
            "quantized": quantize,
            "libraries": library_versions(),
            "source": source or {},
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


@torch.no_grad()
def _write_recall(stage: StageModel, ds: Dataset, example: ListBatch, out: Path, spec: IndexSpec) -> dict:
    model = stage.model.eval()
    out.mkdir()
    export_tower(model.user, model.user_slots, user_inputs(example, model.user_slots), out / "user.onnx")
    ids = ds.items["item_id"]
    vectors = item_vectors(model, item_table(ds, model.item_slots)[torch.from_numpy(ids)])
    _write_index(vectors, spec, out / "index.faiss")
    np.save(out / "item_ids.npy", ids.astype(np.int64))
    return {"name": "recall", "kind": "retrieval", "model": stage.model_name, "quota": stage.quota, "user_inputs": _slots(model.user_slots), "index": {"kind": spec.kind, "factory": spec.factory(len(ids)), "search": spec.search_parameters()}, "source": stage.source}


@torch.no_grad()
def write_prerank(stage: StageModel, catalog: Catalog, example: ListBatch, out: Path, quantize: bool) -> dict:
    model = stage.model.eval()
    if not hasattr(model, "dot_scale"):  # no towers (COLD, a DIN): the whole model runs on every candidate, as a ranker does
        return _write_rank(stage, example, out, quantize, name="prerank")
    files = export_two_tower(model, example, out)
    if quantize:
        for name in ("user", "item"):
            _quantize(out / files[name])
    score = {"kind": "dot", "scale": float(model.dot_scale)} if model.dot_scale is not None else {"kind": "graph", "file": "score.onnx"}
    described = {"name": "prerank", "kind": "two_tower", "model": stage.model_name, "quota": stage.quota, "user_inputs": _slots(model.user_slots), "item_inputs": _slots(model.item_slots), "score": score, "source": stage.source}
    if set(s.name for s in model.item_slots) - set(catalog.by_id):
        # the item tower reads a per-request feature (the trend): no item side to cache
        return described | {"item_vectors": "live", "item_file": files["item"]}
    # the item side of the whole catalog, computed by the exported item tower itself
    item_s = session(out / files["item"])
    ids = np.arange(len(catalog.by_id["item_id"]))
    rows = []
    for a in range(0, len(ids), 4096):
        part = catalog.attach(example.take(np.zeros(1, int)), ids[None, a : a + 4096])
        rows.append(item_s.run(None, flat_items(item_inputs(part, model.item_slots)))[0])
    cache = np.concatenate(rows)
    cache[0] = 0.0  # id 0 is padding
    np.save(out / "items.npy", cache.astype(np.float32))
    return described | {"item_vectors": list(cache.shape[1:])}


def _write_rank(stage: StageModel, example: ListBatch, out: Path, quantize: bool, name: str = "rank") -> dict:
    """A whole model (or a LightGBM file) as the stage ``name``: ``model.onnx`` under ``out``."""
    out.mkdir()
    if isinstance(stage.model, Path):  # LightGBM ships as its own model file
        shutil.copyfile(stage.model, out / "model.txt")
        return {"name": "rank", "kind": "lightgbm", "model": stage.model_name, "quota": stage.quota, "params": stage.params, "source": stage.source}
    model = stage.model.eval()
    export_ranker(model, example, out / "model.onnx")
    if quantize:
        _quantize(out / "model.onnx")
    blend = {"blend": model.describe()} if hasattr(model, "describe") else {}  # a blend's weights by part
    return {"name": name, "kind": "onnx", "model": stage.model_name, "quota": stage.quota, "user_inputs": _slots(model.user_slots), "item_inputs": _slots(model.item_slots), "list_dependent": bool(getattr(model, "list_dependent", False)), "source": stage.source} | blend


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of the bundle at ``directory`` as written (no file checked against it:
    ``verify_bundle`` does that); ``BundleError`` naming it when it is missing or not ours."""
    root = Path(directory)
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle directory")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise BundleError(f"{root / MANIFEST}: missing (not a bundle made by `cascade export`)") from None
    except (OSError, ValueError) as e:
        raise BundleError(f"{root / MANIFEST}: unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{root / MANIFEST}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{root / MANIFEST}: format_version {manifest.get('format_version')!r}, this cascade reads {FORMAT_VERSION}")
    return manifest


def verify_bundle(directory: str | Path) -> dict[str, Any]:
    """The manifest of the bundle at ``directory``, once every file is there, unaltered, and
    nothing else is; ``BundleError`` naming the first file that is not."""
    root = Path(directory)
    manifest = read_manifest(root)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{root / MANIFEST}: no 'files' table")
    present = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} - {MANIFEST}
    for name in sorted(set(files) - present):
        raise BundleError(f"{root / name}: missing (listed in the manifest)")
    for name in sorted(present - set(files)):
        raise BundleError(f"{root / name}: not in the manifest (an extra file)")
    for name, digest in sorted(files.items()):
        if sha256(root / name) != digest:
            raise BundleError(f"{root / name}: altered (sha256 differs from the manifest)")
    return manifest
