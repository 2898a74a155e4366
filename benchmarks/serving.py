"""Serving speed of an exported cascade on this machine, all in one run.

    python benchmarks/serving.py [--requests 1000] [--catalog 100000] [--quality-bundle DIR]

1. Each tower, torch eager against onnxruntime (both 1 thread), at batch 1, 64 and 1024
   (for the DIN ranker: one request with 1, 64 and 1024 candidates): p50 / p99 and the ratio.
2. Pre-rank scoring of one user against 1k and 10k cached items: the dot tower (gathered by id,
   the serving path, and as one contiguous matrix), and MaxSim at the published IntTower size
   (96 user heads x 32 item heads x 64) and at a small one, through the exported score head
   and through numpy; achieved GFLOP/s beside the fp32 matmul peak measured in the same run.
3. A full request on a synthetic catalog of ``--catalog`` items, recall 1000 -> pre-rank 200 ->
   rank 20, in process and over HTTP (`cascade serve` in a subprocess on 127.0.0.1) at
   concurrency 1 and 8, every loop bounded in count and time.
4. int8 dynamic quantisation: with ``--quality-bundle`` (a bundle of a trained cascade, e.g. the
   quickstart's), its quality change (AUC on test exposures, teacher Recall@10@50) beside the
   speed-up of its graphs.

Models in 1-3 are untrained at their serving sizes: speed does not depend on the weights.
Writes benchmarks/results/serving.{md,json}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from threadpoolctl import threadpool_limits

from cascade import metrics as M
from cascade.config import DataConfig, ExperimentConfig, ModelConfig
from cascade.data.lists import build_lists
from cascade.data.synth import WorldConfig, generate
from cascade.eval_data import EvalData
from cascade.models import MODELS, build_model
from cascade.towers.embedding import pack_items, pack_user
from cascade.train import TrainConfig
from export.bundle import IndexSpec, StageModel, write_bundle
from export.onnx import export_ranker, export_two_tower, flat_items, item_inputs, session, user_inputs
from export.runtime import CascadeService, TwoTowerScorer
from export.serve import start_subprocess, stop_subprocess
from export.stages import from_run
from teachers import TEACHERS

from provenance import ROOT, replace_section, write_results

FOREIGN_SECTIONS = ("## Online item features", "## Server under load", "## The compute ceiling")  # written by other benchmarks

SIZES = {
    "dssm": {"hidden": [300, 300, 128], "dropout": 0.0},
    "inttower": {"hidden": [300, 300, 128], "heads": 32, "head_dim": 64, "dropout": 0.0},
    "din": {"attention_hidden": [80, 40], "hidden": [200, 80], "dropout": 0.0},
}


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "n": len(ms)}


def timed(fn, n: int, budget_s: float = 20.0, warmup: int = 10) -> dict[str, float]:
    """Time ``fn()`` up to ``n`` times (fewer if ``budget_s`` runs out, at least 100)."""
    for _ in range(warmup):
        fn()
    out, start = [], time.perf_counter()
    while len(out) < n and (len(out) < 100 or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return percentiles(out)


def matmul_peak(threads: int) -> float:
    """fp32 GFLOP/s of a 1024-cubed matmul in torch at ``threads``."""
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    t = timed(lambda: a @ b, 30, warmup=3)
    return 2 * 1024**3 / (t["p50_ms"] / 1000) / 1e9


def model(ds, name: str, params: dict | None = None):
    exp = ExperimentConfig(name, DataConfig(), ModelConfig(name=name, embedding_dim=32, params=params or SIZES[name]), TrainConfig())
    torch.manual_seed(0)
    return build_model(exp, ds, {**MODELS, **TEACHERS}).eval()


def rows(lists, n: int):
    return lists.take(np.resize(np.arange(len(lists)), n))


def towers(ds, args, tmp: Path) -> list[dict]:
    """Section 1: torch eager vs onnxruntime per tower and batch."""
    torch.set_num_threads(1)
    lists = build_lists(ds, "test")
    out = []
    for name in ("dssm", "inttower"):
        m = model(ds, name)
        export_two_tower(m, lists.take(slice(0, 3)), tmp / name)
        all_items = flat_items(item_inputs(lists, m.item_slots))
        all_packed = torch.from_numpy(pack_items(lists, m.item_slots).reshape(-1, sum(slot.width for slot in m.item_slots)))
        for side in ("user", "item"):
            s = session(tmp / name / f"{side}.onnx")
            tower = getattr(m, side)
            for b in (1, 64, 1024):
                if side == "user":
                    sub = rows(lists, b)
                    feeds, packed = user_inputs(sub, m.user_slots), torch.from_numpy(pack_user(sub, m.user_slots))
                else:  # the first b candidates of the test lists
                    feeds = {k: v[:b] for k, v in all_items.items()}
                    packed = all_packed[:b]
                with torch.no_grad():
                    eager = timed(lambda: tower(packed), args.requests)
                onnx = timed(lambda: s.run(None, feeds), args.requests)
                out.append({"tower": f"{name} {side}", "batch": b, "torch": eager, "onnxruntime": onnx, "speedup": eager["p50_ms"] / onnx["p50_ms"]})
                print(f"  {name} {side} batch {b}: torch {eager['p50_ms']:.3f} ms, onnxruntime {onnx['p50_ms']:.3f} ms (x{out[-1]['speedup']:.2f})", flush=True)
    din = model(ds, "din")
    export_ranker(din, lists.take(slice(0, 3)), tmp / "din.onnx")
    s = session(tmp / "din.onnx")
    one = lists.take(slice(0, 1))
    for n in (1, 64, 1024):
        cand = one.take_columns(np.resize(np.arange(one.list_size), (1, n)))
        feeds = user_inputs(cand, din.user_slots) | item_inputs(cand, din.item_slots)
        user, items = torch.from_numpy(pack_user(cand, din.user_slots)), torch.from_numpy(pack_items(cand, din.item_slots))
        with torch.no_grad():
            eager = timed(lambda: din(user, items), args.requests)
        onnx = timed(lambda: s.run(None, feeds), args.requests)
        out.append({"tower": "din ranker (1 request)", "batch": n, "torch": eager, "onnxruntime": onnx, "speedup": eager["p50_ms"] / onnx["p50_ms"]})
        print(f"  din candidates {n}: torch {eager['p50_ms']:.3f} ms, onnxruntime {onnx['p50_ms']:.3f} ms (x{out[-1]['speedup']:.2f})", flush=True)
    return out


def scoring(ds, args, tmp: Path, threads: int) -> tuple[list[dict], float]:
    """Section 2: one user against N cached items."""
    peak = matmul_peak(threads)
    rng = np.random.default_rng(0)
    lists = build_lists(ds, "test")
    out = []
    for n in (1000, 10_000):
        # the dot tower (DSSM output 128): the serving path takes n candidates by id from the
        # cached side of a 100k catalog; the floor is the same n rows stored contiguously
        cache = rng.normal(size=(100_001, 1, 128)).astype(np.float32)
        ids = rng.choice(np.arange(1, 100_001), size=(1, n), replace=False)
        u = rng.normal(size=(1, 1, 128)).astype(np.float32)
        scorer = TwoTowerScorer.__new__(TwoTowerScorer)
        scorer.items, scorer.flat, scorer.head, scorer.scale = cache, cache[:, 0].copy(), None, 20.0
        block = cache[1 : n + 1, 0].copy()
        flops = 2 * n * 128
        for label, fn in (("dot, n of a 100k cached side by id (serving path)", lambda: scorer.score_vectors(u, ids)), ("dot, n cached rows contiguous", lambda: block @ u[0, 0])):
            t = timed(fn, args.requests)
            out.append({"score": label, "items": n, "heads": "1 x 1 x 128", **t, "gflops": flops / (t["p50_ms"] / 1000) / 1e9})
        for heads, (layers, hv, d) in (("published", (3, 32, 64)), ("small", (3, 4, 16))):
            m = model(ds, "inttower", {"hidden": [300, 300, 128], "heads": hv, "head_dim": d, "dropout": 0.0})
            export_two_tower(m, lists.take(slice(0, 3)), tmp / f"maxsim_{heads}")
            head = session(tmp / f"maxsim_{heads}" / "score.onnx", threads)
            hu = layers * hv
            uu = rng.normal(size=(1, hu, d)).astype(np.float32)
            vv = rng.normal(size=(1, n, hv, d)).astype(np.float32)
            flops = 2 * hu * hv * d * n
            flat = vv[0].reshape(n * hv, d)

            def numpy_maxsim():
                return (flat @ uu[0].T).reshape(n, hv, hu).max(axis=1).sum(axis=1)

            for label, fn in (("MaxSim, ONNX score head", lambda: head.run(None, {"u": uu, "v": vv})), ("MaxSim, numpy", numpy_maxsim)):
                t = timed(fn, args.requests, budget_s=30)
                out.append({"score": label, "items": n, "heads": f"{hu} x {hv} x {d}", **t, "gflops": flops / (t["p50_ms"] / 1000) / 1e9})
        for r in out[-6:]:
            print(f"  {r['score']} {r['heads']} vs {n}: p50 {r['p50_ms']:.3f} ms, {r['gflops']:.1f} GFLOP/s", flush=True)
    return out, peak


def catalog_bundles(args, tmp: Path) -> tuple[dict[str, Path], object, object]:
    """A synthetic world with ``--catalog`` items and an untrained cascade over it, exported with
    the exact index and with IVF (nlist 1024, nprobe 128)."""
    ds, world = generate(WorldConfig(users=2000, items=args.catalog, requests=4000, seed=0))
    stages = [StageModel("recall", "dssm", model(ds, "dssm", {"hidden": [256, 128], "dropout": 0.0}), 1000), StageModel("prerank", "dssm", model(ds, "dssm"), 200), StageModel("rank", "din", model(ds, "din"), 20)]
    bundles = {}
    for kind in ("flat", "ivf"):
        bundles[kind] = write_bundle(EvalData(ds), *stages, tmp / f"bundle_{kind}", IndexSpec(kind, nlist=1024, nprobe=128))
    return bundles, ds, world


def recall_indexes(world, args) -> list[dict]:
    """Each faiss index kind over the same item vectors: build seconds, bytes per item, one-query
    top-1000 latency and its overlap with the exact top-1000. The vectors are the synthetic
    world's true item latents and styles (clustered by category, as trained embeddings are),
    mapped to 128 dimensions by a fixed random projection; the queries its users' latents.
    (An untrained tower's vectors have no clusters, the worst case for IVF and HNSW.)"""
    rng = np.random.default_rng(0)
    d_item, d_style = world.item_vec.shape[1], world.item_style.shape[1]
    proj = (rng.normal(size=(d_item + d_style, 128)) / np.sqrt(d_item + d_style)).astype(np.float32)
    vectors = np.ascontiguousarray(np.hstack([world.item_vec, world.item_style]).astype(np.float32) @ proj)
    users = world.user_vec[:300].astype(np.float32)
    queries = np.ascontiguousarray(np.hstack([users, np.zeros((len(users), d_style), np.float32)]) @ proj)
    _, exact = faiss.knn(queries, vectors, 1000, faiss.METRIC_INNER_PRODUCT)
    out = []
    for spec in (IndexSpec("flat"), IndexSpec("ivf", nlist=1024, nprobe=32), IndexSpec("ivf", nlist=1024, nprobe=128), IndexSpec("hnsw", hnsw_m=32, ef_search=1000), IndexSpec("hnsw", hnsw_m=32, ef_search=2000), IndexSpec("ivfpq", nlist=1024, nprobe=128, pq_m=16)):
        start = time.perf_counter()
        index = faiss.index_factory(vectors.shape[1], spec.factory(len(vectors)), faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(vectors)
        index.add(vectors)
        build = time.perf_counter() - start
        for name, value in spec.search_parameters().items():
            faiss.ParameterSpace().set_index_parameter(index, name, value)
        _, got = index.search(queries, 1000)
        overlap = float(np.mean([len(set(a) & set(b)) / 1000 for a, b in zip(got, exact)]))
        i = iter(range(10**9))
        t = timed(lambda: index.search(queries[next(i) % len(queries)][None], 1000), args.requests)
        out.append({"index": spec.factory(len(vectors)) + "".join(f" {k} {v}" for k, v in spec.search_parameters().items()), "build_s": build, "bytes_per_item": len(faiss.serialize_index(index)) / len(vectors), "overlap@1000": overlap, **t})
        print(f"  {out[-1]['index']}: build {build:.1f} s, {out[-1]['bytes_per_item']:.0f} B/item, top-1000 p50 {t['p50_ms']:.2f} ms, overlap with exact {overlap:.3f}", flush=True)
    return out


def bodies(ds, n: int) -> list[dict]:
    lists = build_lists(ds, "test")
    out = []
    for row in range(len(lists)):
        h = lists.history[row]
        out.append({"user_id": int(lists.user["user_id"][row]), "segment": int(lists.user["segment"][row]), "history": h[h > 0].tolist()})
    return [out[i % len(out)] for i in range(n)]


def post_recommend(conn: http.client.HTTPConnection, body: str, reconnect) -> tuple[bool, http.client.HTTPConnection]:
    """POST ``body`` to /recommend on a keep-alive connection: (answered 200, the connection to
    use next: ``reconnect()``'s after a failure)."""
    try:
        conn.request("POST", "/recommend", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        return r.status == 200, conn
    except (OSError, http.client.HTTPException):
        conn.close()
        return False, reconnect()


def http_load(port: int, requests: list[dict], concurrency: int, budget_s: float) -> dict:
    """``requests`` POSTed by ``concurrency`` threads (keep-alive connections), stopping at the
    end of the list or after ``budget_s``."""
    lock, nxt, lat, errors = threading.Lock(), [0], [], [0]
    deadline = time.monotonic() + budget_s

    def connect() -> http.client.HTTPConnection:
        # TCP_NODELAY, as real clients set it: http.client sends the headers and the body in two
        # writes, and Nagle + delayed ACK would add ~40 ms to every request
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def worker():
        conn = connect()
        while time.monotonic() < deadline:
            with lock:
                if nxt[0] >= len(requests):
                    break
                body = json.dumps(requests[nxt[0]])
                nxt[0] += 1
            t = time.perf_counter()
            ok, conn = post_recommend(conn, body, connect)
            dt = time.perf_counter() - t
            with lock:
                lat.append(dt)
                errors[0] += not ok
        conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"concurrency": concurrency, **percentiles(lat), "requests_per_s": len(lat) / wall, "errors": errors[0]}


def start_server(bundle: Path, cwd: Path = ROOT, *more: str) -> tuple[subprocess.Popen, int]:
    """`cascade serve BUNDLE` from the tree at ``cwd`` (its own packages first on the path) on a
    free port, once it answers /health: (the process, its port)."""
    return start_subprocess(bundle, *more, cwd=cwd)


stop_server = stop_subprocess


def serve_and_load(bundle: Path, reqs: list[dict]) -> list[dict]:
    """`cascade serve BUNDLE` in a subprocess on a free port, loaded at concurrency 1 and 8."""
    server, port = start_server(bundle)
    try:
        runs = []
        for c in (1, 8):
            http_load(port, reqs[:50], c, 30)  # warm-up
            runs.append(http_load(port, reqs, c, 120))
            print(f"  {bundle.name} over HTTP, concurrency {c}: p50 {runs[-1]['p50_ms']:.2f} p99 {runs[-1]['p99_ms']:.2f} ms, {runs[-1]['requests_per_s']:.0f} req/s, errors {runs[-1]['errors']}", flush=True)
    finally:
        stop_server(server)
    return runs


def full_request(args, tmp: Path) -> dict:
    """Section 3."""
    bundles, ds, world = catalog_bundles(args, tmp)
    indexes = recall_indexes(world, args)
    reqs = bodies(ds, args.requests)
    out = {"catalog": args.catalog, "quotas": [1000, 200, 20], "indexes": indexes, "in_process": {}, "http": {}}
    for kind, bundle in bundles.items():
        service = CascadeService(bundle)
        for r in reqs[:20]:
            service.recommend(r)
        stages: dict[str, list[float]] = {}
        for r in reqs:
            t = time.perf_counter()
            got = service.recommend(r)
            stages.setdefault("total (wall)", []).append(time.perf_counter() - t)
            for k, ms in got["timings_ms"].items():
                stages.setdefault(k, []).append(ms / 1000)
        out["in_process"][kind] = {k: percentiles(v) for k, v in stages.items()}
        print(f"  {kind} in process: " + ", ".join(f"{k} p50 {v['p50_ms']:.2f} p99 {v['p99_ms']:.2f} ms" for k, v in out["in_process"][kind].items()), flush=True)
        out["http"][kind] = serve_and_load(bundle, reqs)
    return out


def quantized(args, tmp: Path) -> dict | None:
    """Section 4: a trained bundle against its int8 copy (re-exported from the same runs)."""
    if args.quality_bundle is None:
        return None
    src = Path(args.quality_bundle)
    manifest = json.loads((src / "manifest.json").read_text())
    run_dir = manifest["source"].get("run_dir")
    out = tmp / "int8"
    subprocess.run([sys.executable, "-m", "cascade.cli", "export", run_dir, "--out", str(out), "--quantize"], check=True, stdout=subprocess.DEVNULL)
    fp32, int8 = CascadeService(src), CascadeService(out)
    data, _, _ = from_run(run_dir)
    lists = build_lists(data.ds, "test")
    exposed = (lists.stage == 3) & lists.mask
    res = {"bundle": str(src), "run_dir": run_dir}
    teacher = fp32.cascade.stages[1].scorer(lists)
    for label, svc in (("fp32", fp32), ("int8", int8)):
        pre, rank = svc.cascade.stages[0].scorer(lists), svc.cascade.stages[1].scorer(lists)
        res[label] = {
            "prerank_auc": M.auc(lists.label[exposed], pre[exposed].astype(np.float64)),
            "rank_auc": M.auc(lists.label[exposed], rank[exposed].astype(np.float64)),
            "teacher_recall@10@50": M.teacher_recall_at_k_at_m(pre, teacher, 10, 50, lists.mask),
        }
        one = lists.take(slice(0, 1))
        res[label]["prerank_user_ms"] = timed(lambda: svc.cascade.stages[0].scorer(one), args.requests)["p50_ms"]
        res[label]["rank_200_ms"] = timed(lambda: svc.cascade.stages[1].scorer(one), args.requests)["p50_ms"]
        print(f"  {label}: {res[label]}", flush=True)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--catalog", type=int, default=100_000)
    parser.add_argument("--quality-bundle", help="a trained cascade's bundle, for the int8 quality check")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="serving-bench."))
    threadpool_limits(1, user_api="blas")  # every figure at one thread (the server sets the same)
    try:
        ds, _ = generate(WorldConfig(users=2000, items=5000, requests=3000, seed=0))
        print("[1/4] towers, torch eager vs onnxruntime", flush=True)
        tower_rows = towers(ds, args, tmp)
        print("[2/4] pre-rank scoring of one user", flush=True)
        score_rows, peak = scoring(ds, args, tmp, threads=1)
        print(f"  fp32 matmul peak (1 thread): {peak:.1f} GFLOP/s", flush=True)
        print(f"[3/4] a full request over {args.catalog:,} items", flush=True)
        full = full_request(args, tmp)
        print("[4/4] int8 quantisation", flush=True)
        quant = quantized(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(tower_rows, score_rows, peak, full, quant, args)


def report(tower_rows, score_rows, peak, full, quant, args) -> None:
    lines = ["# Serving speed", "", f"{os.cpu_count()} cores; onnxruntime sessions, torch and numpy's BLAS at 1 thread; p50 / p99 over up to {args.requests} calls (at least 100; fewer where a 20-30 s budget ran out: n).", ""]
    lines += ["## Towers: torch eager vs onnxruntime", "", "| tower | batch | torch p50 / p99 ms | onnxruntime p50 / p99 ms | speed-up (p50) | n |", "|---|---:|---:|---:|---:|---:|"]
    for r in tower_rows:
        lines.append(f"| {r['tower']} | {r['batch']} | {r['torch']['p50_ms']:.3f} / {r['torch']['p99_ms']:.3f} | {r['onnxruntime']['p50_ms']:.3f} / {r['onnxruntime']['p99_ms']:.3f} | x{r['speedup']:.2f} | {r['onnxruntime']['n']} |")
    lines += ["", f"## Pre-rank scoring of one user (fp32 matmul peak in this run, 1 thread: {peak:.1f} GFLOP/s)", "", "| score | heads (user x item x dim) | items | p50 ms | p99 ms | GFLOP/s | of peak |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in score_rows:
        lines.append(f"| {r['score']} | {r['heads']} | {r['items']:,} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['gflops']:.1f} | {r['gflops'] / peak:.0%} |")
    lines += ["", f"## Recall index over {full['catalog']:,} item vectors (the synthetic world's item latents projected to 128 dims, inner product), top-1000 of one query", "", "| index | build s | bytes / item | p50 ms | p99 ms | overlap with exact top-1000 |", "|---|---:|---:|---:|---:|---:|"]
    for r in full["indexes"]:
        lines.append(f"| {r['index']} | {r['build_s']:.1f} | {r['bytes_per_item']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['overlap@1000']:.3f} |")
    lines += ["", f"## A full request: {full['catalog']:,} items, recall 1000 -> pre-rank 200 -> rank 20", "", "| recall index | where | stage | p50 ms | p99 ms | n |", "|---|---|---|---:|---:|---:|"]
    for kind, stages in full["in_process"].items():
        for k, v in stages.items():
            lines.append(f"| {kind} | in process | {k} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | {v['n']} |")
    lines += ["", "| recall index | over HTTP | p50 ms | p99 ms | requests/s | errors | n |", "|---|---|---:|---:|---:|---:|---:|"]
    for kind, runs in full["http"].items():
        for h in runs:
            lines.append(f"| {kind} | concurrency {h['concurrency']} | {h['p50_ms']:.2f} | {h['p99_ms']:.2f} | {h['requests_per_s']:.0f} | {h['errors']} | {h['n']} |")
    if quant:
        lines += ["", f"## int8 dynamic quantisation ({quant['bundle']}, test split)", "", "| graphs | pre-rank AUC (exposures) | rank AUC (exposures) | teacher Recall@10@50 (vs fp32 ranker) | pre-rank of 1 request (200 candidates) ms | rank of 200 ms |", "|---|---:|---:|---:|---:|---:|"]
        for label in ("fp32", "int8"):
            q = quant[label]
            lines.append(f"| {label} | {q['prerank_auc']:.4f} | {q['rank_auc']:.4f} | {q['teacher_recall@10@50']:.4f} | {q['prerank_user_ms']:.3f} | {q['rank_200_ms']:.3f} |")
    md = ROOT / "benchmarks" / "results" / "serving.md"
    # the sections other benchmarks write here (online_features.py, server_load.py) stay
    kept = [("## " + part).split("\n", 1) for part in (md.read_text().split("\n## ")[1:] if md.exists() else [])]
    write_results("serving", lines, {"towers": tower_rows, "scoring": score_rows, "matmul_peak_gflops": peak, "full_request": full, "int8": quant})
    for title, body in kept:
        if title in FOREIGN_SECTIONS:
            replace_section(md, title, body.strip("\n").splitlines())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
