"""The ``cascade`` command.

    cascade data synth --out DIR [--users N --items N --requests N --seed S]
    cascade data check DIR
    cascade data movielens --src DIR --out DIR --protocol ctr|cascade [--seed S]
    cascade train CONFIG [--experiment NAME]
    cascade distill CONFIG [--experiment NAME]
    cascade export RUN_DIR --out BUNDLE [--index flat|ivf|hnsw|ivfpq ...] [--quantize]
    cascade export --recall CFG:EXP --prerank CFG:EXP --rank CFG:EXP [--quotas 200,50,10] --out BUNDLE
    cascade serve BUNDLE [--host 127.0.0.1 --port 8000 --threads 1]
    cascade eval RUN_DIR [RUN_DIR ...] [--out runs/report]
    cascade run CONFIG

Exit status: 0 on success, 2 on bad input (each problem printed on stderr, nothing written).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from cascade.data.store import DataError, read_dataset, write_dataset

BAD_INPUT = 2


def _synth(args: argparse.Namespace) -> int:
    from cascade.data.summary import summarize
    from cascade.data.synth import WORLD_FILE, WorldConfig, generate

    try:
        cfg = WorldConfig(users=args.users, items=args.items, requests=args.requests, seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    start = time.perf_counter()
    ds, world = generate(cfg)
    out = write_dataset(ds, args.out, {WORLD_FILE: world.to_bytes()})
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    print(summarize(ds, world))
    return 0


def _check(args: argparse.Namespace) -> int:
    from cascade.data.summary import summarize

    ds = read_dataset(args.dir)
    print(f"{args.dir}: ok")
    print(summarize(ds))
    return 0


def _movielens(args: argparse.Namespace) -> int:
    from cascade.data.movielens import convert

    ds, report = convert(args.src, args.protocol, seed=args.seed)
    out = write_dataset(ds, args.out)
    print(f"wrote {out}")
    print(report)
    return 0


def _run(args: argparse.Namespace) -> int:
    from cascade.config import ConfigError
    from cascade.job import run_job
    from export.bundle import BundleError

    try:
        run_job(args.config)
    except (ConfigError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    return 0


def _train(args: argparse.Namespace) -> int:
    from cascade.config import ConfigError, load_config
    from cascade.joint import train_experiment
    from cascade.models import MODELS
    from teachers import BOOSTED, TEACHERS

    try:
        experiments = load_config(args.config, args.experiment)
        if args.verb == "distill":
            experiments = [e for e in experiments if e.task == "distill"]
            if not experiments:
                raise ConfigError(f"{args.config}: no experiment with 'task: distill'")
        for exp in experiments:
            result = train_experiment(exp, args.config, {**MODELS, **TEACHERS}, BOOSTED)
            shown = " ".join(f"{k} {v:.4f}" for k, v in result["test"].items() if k in ("auc", "logloss", "oracle_ratio", "joint_recall") or k.startswith(("recall@", "teacher_recall@")))
            print(f"{exp.name}: test {shown} -> {exp.run_dir}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    return 0


def _export(args: argparse.Namespace) -> int:
    from cascade.config import ConfigError
    from export.bundle import BundleError, IndexSpec, write_bundle
    from export.runtime import CascadeService
    from export.stages import from_named, from_run, parity, torch_cascade

    named = {role: getattr(args, role) for role in ("recall", "prerank", "rank")}
    try:
        if (args.run_dir is None) == all(v is None for v in named.values()):
            raise BundleError("give RUN_DIR (a 'task: cascade' run) or all of --recall, --prerank and --rank")
        if args.run_dir is None and any(v is None for v in named.values()):
            missing = next(role for role, v in named.items() if v is None)
            raise BundleError(f"--{missing} is required when the stages are named")
        try:
            index = IndexSpec(args.index, args.nlist, args.nprobe, args.hnsw_m, args.ef_search, args.pq_m)
            quotas = tuple(int(q) for q in args.quotas.split(","))
            if len(quotas) != 3:
                raise ValueError(f"--quotas: expected three numbers (recall,prerank,rank), got '{args.quotas}'")
        except ValueError as e:
            raise BundleError(str(e)) from None
        start = time.perf_counter()
        ds, stages = from_run(args.run_dir) if args.run_dir is not None else from_named(named, quotas)
        source = {"run_dir": str(args.run_dir)} if args.run_dir is not None else {"stages": named}
        out = write_bundle(ds, *stages, args.out, index, args.quantize, source)
        print(f"wrote {out} in {time.perf_counter() - start:.1f}s: " + ", ".join(f"{s.name} {s.model_name} top-{s.quota}" for s in stages))
        service = CascadeService(out)
        if not isinstance(stages[2].model, Path):
            report = parity(service, torch_cascade(ds, stages), ds)
            print("parity against torch on " + " ".join(f"{k} {v:.6g}" for k, v in report.items()))
    except (BundleError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    return 0


def _eval(args: argparse.Namespace) -> int:
    from cascade.config import ConfigError
    from cascade.job import evaluate_path
    from cascade.report import tables, write_report
    from export.bundle import BundleError

    out = args.out
    if out.exists() and any(out.iterdir()) and not (out / "metrics.json").exists():
        print(f"error: --out {out} holds files that are not a cascade report; choose another directory", file=sys.stderr)
        return BAD_INPUT
    try:
        entries = [evaluate_path(p, args.seed) for p in args.paths]
    except (ValueError, ConfigError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    write_report(entries, out)
    first = next(iter(tables(entries).values()))
    print(_text_table(first))
    for e in entries:
        for note in e["notes"]:
            print(f"note: {e['label']}: {note}")
    print(f"report: {(out / 'report.html').resolve()}")
    return 0


def _text_table(t: dict) -> str:
    widths = [max(len(r[i]) for r in [t["header"]] + t["rows"]) for i in range(len(t["header"]))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(t["header"])] + [line(r) for r in t["rows"]])


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from export.bundle import BundleError
    from export.runtime import CascadeService
    from export.serve import make_app

    try:
        service = CascadeService(args.bundle, threads=args.threads)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    print(f"serving {args.bundle} on http://{args.host}:{args.port} (POST /recommend, GET /health, GET /metrics)")
    uvicorn.run(make_app(service), host=args.host, port=args.port, log_level="warning")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascade", description="Multi-stage recommendation cascades.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    data = verbs.add_parser("data", help="make, convert and check cascade log directories")
    data_verbs = data.add_subparsers(dest="data_verb", required=True)

    synth = data_verbs.add_parser("synth", help="generate a synthetic cascade world with its truth oracle")
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--users", type=int, default=2000)
    synth.add_argument("--items", type=int, default=5000)
    synth.add_argument("--requests", type=int, default=20000)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(run=_synth)

    check = data_verbs.add_parser("check", help="validate a log directory; exit 2 listing every problem")
    check.add_argument("dir", type=Path)
    check.set_defaults(run=_check)

    ml = data_verbs.add_parser("movielens", help="convert MovieLens-1M (users.dat, movies.dat, ratings.dat)")
    ml.add_argument("--src", required=True, type=Path)
    ml.add_argument("--out", required=True, type=Path)
    ml.add_argument("--protocol", required=True, choices=["ctr", "cascade"])
    ml.add_argument("--seed", type=int, default=2024)
    ml.set_defaults(run=_movielens)

    train = verbs.add_parser("train", help="train the experiments a YAML config names")
    train.add_argument("config", type=Path)
    train.add_argument("--experiment", help="only this experiment of the config")
    train.set_defaults(run=_train)

    distill = verbs.add_parser("distill", help="train the pre-rankers of a config's 'task: distill' experiments from their teacher")
    distill.add_argument("config", type=Path)
    distill.add_argument("--experiment", help="only this experiment of the config")
    distill.set_defaults(run=_train)

    export = verbs.add_parser("export", help="export a trained cascade to a bundle: ONNX towers, cached item side, faiss index, manifest")
    export.add_argument("run_dir", nargs="?", type=Path, help="a finished 'task: cascade' run")
    export.add_argument("--out", required=True, type=Path)
    for role in ("recall", "prerank", "rank"):
        export.add_argument(f"--{role}", metavar="CONFIG:EXPERIMENT", help=f"the {role} stage's trained run (instead of RUN_DIR)")
    export.add_argument("--quotas", default="200,50,10", help="recall,prerank,rank quotas with named stages")
    export.add_argument("--index", default="flat", help="faiss index over the recall item vectors: flat (exact) | ivf | hnsw | ivfpq")
    export.add_argument("--nlist", type=int, default=1024)
    export.add_argument("--nprobe", type=int, default=128)
    export.add_argument("--hnsw-m", type=int, default=32)
    export.add_argument("--ef-search", type=int, default=2000)
    export.add_argument("--pq-m", type=int, default=16)
    export.add_argument("--quantize", action="store_true", help="int8 dynamic quantisation of the pre-ranker and ranker graphs")
    export.set_defaults(run=_export)

    serve = verbs.add_parser("serve", help="serve a bundle over HTTP JSON")
    serve.add_argument("bundle", type=Path)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--threads", type=int, default=1, help="onnxruntime threads per session")
    serve.set_defaults(run=_serve)

    ev = verbs.add_parser("eval", help="evaluate cascades offline: per-stage quality, recall-vs-rank consistency, baselines, cost; writes metrics.json, report.md, report.html")
    ev.add_argument("paths", nargs="+", type=Path, metavar="RUN_DIR", help="'task: cascade' runs or bundles; runs of one experiment over seeds become mean ± std")
    ev.add_argument("--out", type=Path, default=Path("runs/report"), help="report directory (default: runs/report)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the random pre-ranker baseline")
    ev.set_defaults(run=_eval)

    job = verbs.add_parser("run", help="the whole job for a config: data, train, distill, the cascades, export, eval (finished steps are kept)", epilog="example: cascade run configs/quickstart.yaml  (what `make demo` runs)")
    job.add_argument("config", type=Path)
    job.set_defaults(run=_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except DataError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{len(e.problems)} problem(s); nothing written", file=sys.stderr)
        return BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
