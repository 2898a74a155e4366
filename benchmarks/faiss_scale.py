"""Recall over catalogs of millions: the export's faiss indexes (``export.bundle.build_index``)
against exact search, on synthetic item vectors.

    python benchmarks/faiss_scale.py [--sizes 1000000 10000000] [--queries 500] [--k 200] [--indexes ivfpq ivfpq_refine ivf hnsw]

Item and query vectors (dim 64, unit length) come from one mixture of 2,000 Gaussian clusters, so
the catalog has the clumped structure trained item towers give (uniform random vectors would
make every inverted list equally likely and flatter the IVF indexes). Per catalog size and index:
build seconds (train + add), bytes per item (the serialized index over the catalog), Recall@k
against the exact top-k of ``IndexFlatIP`` (the share of the exact top-k the index returns),
and single-query latency p50 / p99 over ``--queries`` queries, one at a time, faiss on one
thread (a serving process answers one request per core). HNSW builds only up to
``--hnsw-max`` items (its build is the slow part on 2 cores; the table says which sizes ran).

Writes benchmarks/results/faiss_scale.{md,json}; with ``--indexes`` it measures only those
groups and keeps the stored rows of the others (a row is replaced by one of the same catalog
size, index and search parameters).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from export.bundle import IndexSpec, build_index, set_search
from provenance import write_results

DIM, CLUSTERS = 64, 2000
INDEX_GROUPS = ["ivfpq", "ivfpq_refine", "ivf", "hnsw"]
RESULTS = Path(__file__).resolve().parent / "results"


def vectors(n: int, seed: int, centers: np.ndarray, chunk: int = 1_000_000) -> np.ndarray:
    """(n, DIM) unit vectors: a random center plus noise, drawn in chunks (10M x 64 is 2.5 GB)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), np.float32)
    for a in range(0, n, chunk):
        m = min(chunk, n - a)
        x = centers[rng.integers(0, len(centers), m)] + 0.35 * rng.standard_normal((m, DIM), dtype=np.float32)
        out[a : a + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """found, exact (Q, k) ids -> mean share of each exact top-k found."""
    return float(np.mean([len(np.intersect1d(f, e)) / len(e) for f, e in zip(found, exact)]))


def measure(items: np.ndarray, queries: np.ndarray, exact: np.ndarray, specs: list[IndexSpec], k: int, threads: int) -> list[dict]:
    """One row per spec; ``specs`` share one index (the same factory) and differ in search
    parameters only, so it is built once and each row reports that build."""
    faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    index = build_index(items, specs[0])
    build = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.faiss"
        faiss.write_index(index, str(path))
        size = path.stat().st_size
    faiss.omp_set_num_threads(1)
    rows = []
    for spec in specs:
        set_search(index, spec.search_parameters())
        found, times = [], []
        for q in queries:
            t = time.perf_counter()
            _, ids = index.search(q[None], k)
            times.append(time.perf_counter() - t)
            found.append(ids[0])
        ms = np.array(times) * 1000
        rows.append({"index": spec.factory(len(items)), "params": spec.search_parameters(), "build_s": build, "build_threads": threads, "bytes_per_item": size / len(items), f"recall@{k}": recall_at_k(np.array(found), exact), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--hnsw-max", type=int, default=1_000_000)
    parser.add_argument("--indexes", nargs="+", default=INDEX_GROUPS, choices=INDEX_GROUPS, help="measure only these; the table keeps the stored rows of the others")
    args = parser.parse_args()
    threads = faiss.omp_get_max_threads()
    centers = np.random.default_rng(0).standard_normal((CLUSTERS, DIM)).astype(np.float32)
    stored = RESULTS / "faiss_scale.json"
    rows = json.loads(stored.read_text())["rows"] if stored.exists() else []
    for n in args.sizes:
        items = vectors(n, 1, centers)
        queries = vectors(args.queries, 2, centers)
        faiss.omp_set_num_threads(threads)
        flat = faiss.IndexFlatIP(DIM)
        flat.add(items)
        start = time.perf_counter()
        _, exact = flat.search(queries, args.k)
        exact_s = time.perf_counter() - start
        # the exact search itself, one query at a time on one thread, as the baseline row
        faiss.omp_set_num_threads(1)
        times = []
        for q in queries[:50]:
            t = time.perf_counter()
            flat.search(q[None], args.k)
            times.append(time.perf_counter() - t)
        ms = np.array(times) * 1000
        exact_row = {"items": n, "index": "Flat (exact)", "params": {}, "build_s": 0.0, "bytes_per_item": DIM * 4 + 8, f"recall@{args.k}": 1.0, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}
        rows = with_row(rows, exact_row)
        print(f"{n:,} items: exact top-{args.k} of {args.queries} queries in {exact_s:.1f}s (batched); one query {exact_row['p50_ms']:.1f} ms", flush=True)
        del flat
        nlist = 1024 if n <= 1_000_000 else 4096
        indexes = {
            "ivfpq": [IndexSpec("ivfpq", nlist=nlist, nprobe=p, pq_m=16) for p in (16, 64)],
            "ivfpq_refine": [IndexSpec("ivfpq", nlist=nlist, nprobe=64, pq_m=16, refine=r) for r in (2, 4, 8)],
            "ivf": [IndexSpec("ivf", nlist=nlist, nprobe=64)],
            "hnsw": [IndexSpec("hnsw", hnsw_m=32, ef_search=400)] if n <= args.hnsw_max else [],
        }
        for group, specs in indexes.items():
            if group not in args.indexes or not specs:
                continue
            for row in measure(items, queries, exact, specs, args.k, threads):
                rows = with_row(rows, {"items": n, **row})
                print(f"{n:,} items {row['index']} {row['params']}: build {row['build_s']:.0f}s, {row['bytes_per_item']:.0f} B/item, Recall@{args.k} {row[f'recall@{args.k}']:.3f}, p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms", flush=True)
            write(rows, args)
        del items


def with_row(rows: list[dict], row: dict) -> list[dict]:
    """``rows`` with ``row`` in place of any stored one of the same catalog size, index and search."""
    key = lambda r: (r["items"], r["index"], r["params"])  # noqa: E731
    return [r for r in rows if key(r) != key(row)] + [row]


def build_cell(row: dict, cores: int) -> str:
    """Build seconds, with the threads where fewer than the machine's cores."""
    threads = row.get("build_threads", cores)
    return f"{row['build_s']:.0f}" + ("" if threads == cores else f" ({threads} thread{'s' if threads > 1 else ''})")


def write(rows: list[dict], args) -> None:
    k = args.k
    lines = [
        f"# faiss recall over large catalogs (synthetic item vectors, dim {DIM}, {CLUSTERS:,} clusters)",
        "",
        f"| items | index | search | build s | bytes / item | Recall@{k} vs exact | p50 ms | p99 ms |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    cores = os.cpu_count()
    kind = lambda r: 0 if r["index"].startswith("Flat") else 4 if r["index"].startswith("HNSW") else 3 if r["index"].endswith(",Flat") else 2 if "Refine" in r["index"] else 1  # noqa: E731
    for r in sorted(rows, key=lambda r: (r["items"], kind(r), sorted(r["params"].items()))):
        params = ", ".join(f"{a} {b}" for a, b in r["params"].items()) or "-"
        lines.append(f"| {r['items']:,} | {r['index']} | {params} | {build_cell(r, cores)} | {r['bytes_per_item']:.0f} | {r[f'recall@{k}']:.3f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    lines += [
        "",
        f"Recall@{k}: share of the exact inner-product top-{k} (IndexFlatIP) the index returns, mean over {args.queries} queries.",
        "Latency: one query at a time, faiss on one thread. Build: train + add on every core of this machine (rows of one index, e.g. two nprobe, share its build).",
        "Bytes / item: the serialized index over the catalog (the exact row: the float32 vector and its id).",
        "k_factor_rf: the refined index re-scores that many times k PQ candidates on 8-bit scalar-quantised vectors.",
        f"HNSW ran only up to {args.hnsw_max:,} items.",
    ]
    write_results("faiss_scale", lines, {"rows": rows, "dim": DIM, "clusters": CLUSTERS, "queries": args.queries, "k": k})


if __name__ == "__main__":
    main()
