"""The ``cascade`` command.

    cascade data synth --out DIR [--users N --items N --requests N --seed S]
    cascade data check DIR
    cascade data movielens --src DIR --out DIR --protocol ctr|cascade [--seed S]
    cascade data import [--mapping YAML] [--events F --user C --item C --time C --label RULE ...] --out DIR
    cascade train CONFIG [--experiment NAME]
    torchrun --nproc-per-node 2 -m cascade.cli train CONFIG [--experiment NAME]   (data-parallel)
    cascade distill CONFIG [--experiment NAME]
    cascade export RUN_DIR --out BUNDLE [--quotas R,P,K] [--index flat|ivf|hnsw|ivfpq ...] [--quantize]
    cascade export --recall CFG:EXP --prerank CFG:EXP --rank CFG:EXP [--quotas 200,50,10] --out BUNDLE
    cascade serve BUNDLE [--host 127.0.0.1 --port 8000 --threads 1 --state DIR | --store redis://HOST:PORT, --workers N, --max-batch 256, --admin-token T]
    cascade eval RUN_DIR [RUN_DIR ...] [--out runs/report]
    cascade plan BUNDLE --budget-ms B [B ...] [--recall-quotas 100,200,400 --prerank-quotas 20,50,100]
    cascade run CONFIG

Exit status: 0 on success, 2 on bad input (each problem printed on stderr, nothing written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from cascade.data.store import DataError, check_output_dir, read_dataset, warnings, write_dataset
from cascade.saved import STAGE_NAMES
from cascade.tasks import tasks_help

BAD_INPUT = 2


def _synth(args: argparse.Namespace) -> int:
    from cascade.data.summary import summarize
    from cascade.data.synth import WORLD_FILE, WorldConfig, generate

    try:
        cfg = WorldConfig(users=args.users, items=args.items, requests=args.requests, seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    check_output_dir(args.out)
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
    for warning in warnings(ds):
        print(f"warning: {warning}")
    print(summarize(ds))
    return 0


def _movielens(args: argparse.Namespace) -> int:
    from cascade.data.movielens import convert

    check_output_dir(args.out)
    ds, report = convert(args.src, args.protocol, seed=args.seed)
    out = write_dataset(ds, args.out)
    print(f"wrote {out}")
    print(report)
    return 0


IMPORT_OPTIONS = ("events", "users", "items", "user", "item", "time", "label", "request", "stage", "name", "time_unit", "request_window", "history_max", "split", "valid", "test", "seed")


def _import(args: argparse.Namespace) -> int:
    from cascade.data.importer import ImportSpec, import_to
    from cascade.data.summary import summarize

    given = {k: getattr(args, k) for k in IMPORT_OPTIONS if getattr(args, k) is not None}
    for key in ("events", "users", "items"):  # command-line paths are relative to where it runs
        if key in given:
            given[key] = str(Path(given[key]).resolve())
    try:
        spec = ImportSpec.read(args.mapping, given) if args.mapping else ImportSpec.from_dict(given, "command line")
    except ValueError as e:  # a bad mapping or option (YamlError included)
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    start = time.perf_counter()
    ds, record = import_to(spec, args.out)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s")
    print("\n".join(f"  {k}: {v}" for k, v in record["counts"].items()))
    print(summarize(ds))
    for warning in warnings(ds):
        print(f"warning: {warning}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from cascade.config import ConfigError, command_line, load_config
    from cascade.job import run_job
    from cascade.train import RunError
    from export.bundle import BundleError

    try:
        with command_line(_overrides(args)):
            if args.restart:
                _restart(load_config(args.config))
            run_job(args.config)
    except (ConfigError, BundleError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    return 0


LEGEND = {
    "recall": "recall@k = share of a request's positives in the top-k",
    "teacher_recall": "teacher_recall@k@m = share of the teacher's top-k inside the model's top-m",
    "joint_recall": "share of the real positives surviving every quota of the cascade",
    "oracle_ratio": "true utility shown / best achievable (synthetic world)",
}


def _train(args: argparse.Namespace) -> int:
    from cascade.config import command_line

    with command_line(_overrides(args)):
        return _train_experiments(args)


def _train_experiments(args: argparse.Namespace) -> int:
    from cascade.distributed import init_from_env, is_writer

    init_from_env()  # under torchrun: join the group (every trainer then runs data-parallel)
    if not is_writer():  # one copy of the summary, rank 0's
        sys.stdout = open(os.devnull, "w")
    from cascade.config import ConfigError, load_config
    from cascade.tasks import train_experiment
    from cascade.models import MODELS
    from cascade.train import RunError
    from teachers import BOOSTED, TEACHERS

    try:
        experiments = load_config(args.config, args.experiment)
        if args.verb == "distill":
            experiments = [e for e in experiments if e.task == "distill"]
            if not experiments:
                raise ConfigError(f"{args.config}: no experiment with 'task: distill'")
        if args.restart:
            _restart(experiments)
        explained: set[str] = set()
        for exp in experiments:
            result = train_experiment(exp, args.config, {**MODELS, **TEACHERS}, BOOSTED)
            shown = " ".join(f"{k} {v:.4f}" for k, v in result["test"].items() if k in ("auc", "logloss", "oracle_ratio", "joint_recall") or k.startswith(("recall@", "teacher_recall@")))
            print(f"{exp.name}: test {shown} -> {exp.run_dir}")
            if exp.task == "cascade":
                print(f"  its final stages: {exp.run_dir / 'stages.json'} (read by `cascade export {exp.run_dir}` and `cascade eval {exp.run_dir}`)")
            explained |= {k.split("@")[0] for k in result["test"]}
        legend = {k: v for k, v in LEGEND.items() if k in explained}
        if legend:
            print("where " + "; ".join(f"{k}: {v}" for k, v in legend.items()))
    except (ConfigError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    return 0


def _export(args: argparse.Namespace) -> int:
    from cascade.config import ConfigError
    from export.bundle import BundleError, IndexSpec, write_bundle
    from export.runtime import CascadeService
    from export.stages import from_named, from_run, parity, torch_cascade

    named = {name: getattr(args, name) for name in STAGE_NAMES}
    try:
        if (args.run_dir is None) == all(v is None for v in named.values()):
            raise BundleError("give RUN_DIR (a 'task: cascade' run) or all of --recall, --prerank and --rank")
        if args.run_dir is None and any(v is None for v in named.values()):
            missing = next(role for role, v in named.items() if v is None)
            raise BundleError(f"--{missing} is required when the stages are named")
        try:
            index = IndexSpec(args.index, args.nlist, args.nprobe, args.hnsw_m, args.ef_search, args.pq_m, args.refine)
            quotas = _quotas(args.quotas) if args.quotas is not None else None
        except ValueError as e:
            raise BundleError(str(e)) from None
        start = time.perf_counter()
        data, stages, trend = from_run(args.run_dir, quotas) if args.run_dir is not None else from_named(named, quotas or (200, 50, 10))
        source = {"run_dir": str(args.run_dir.resolve())} if args.run_dir is not None else {"stages": named}
        out = write_bundle(data, *stages, args.out, index, quantize=args.quantize, source=source, trend=trend)
        online = f"; online item trend {list(trend.days)} days, '{trend.scale}' scale" if trend else ""
        print(f"wrote {out} in {time.perf_counter() - start:.1f}s: " + ", ".join(f"{s.name} {s.model_name} top-{s.quota}" for s in stages) + online)
        service = CascadeService(out)
        if not isinstance(stages[2].model, Path):
            report = parity(service, torch_cascade(data, stages, trend), data)
            print("parity against torch on " + " ".join(f"{k} {v:.6g}" for k, v in report.items()))
    except (BundleError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    return 0


def _quotas(text: str) -> tuple[int, int, int]:
    """'200,50,10' -> (recall, prerank, rank), each at least 1 and shrinking."""
    try:
        quotas = tuple(int(q) for q in text.split(","))
    except ValueError:
        quotas = ()
    if len(quotas) != 3:
        raise ValueError(f"--quotas: expected three whole numbers recall,prerank,rank (e.g. 200,50,10), got '{text}'")
    if not quotas[0] > quotas[1] > quotas[2] > 0:
        raise ValueError(f"--quotas: quotas must shrink from stage to stage (recall > prerank > rank >= 1), got '{text}'")
    return quotas


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got '{text}'") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers >= 1, got '{text}'")
    return values


def _plan(args: argparse.Namespace) -> int:
    from cascade.config import ConfigError
    from cascade.report import text_table
    from export.bundle import BundleError
    from export.plan import grid_table, plan, text

    try:
        start = time.perf_counter()
        result = plan(args.bundle, args.budget_ms, args.recall_quotas, args.prerank_quotas, args.requests, args.cost_requests, args.seed, lambda line: print(line, flush=True))
    except (BundleError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    print(f"joint recall / predicted p99 by quota ({time.perf_counter() - start:.0f}s):\n" + text_table(grid_table(result)))
    print(text(result))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "plan.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out / 'plan.json'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from cascade.config import ConfigError
    from cascade.job import evaluate_path, summary
    from cascade.report import tables, text_table, write_report
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
    for title, table in tables(entries).items():
        if title.startswith("Single"):
            print(f"{title}\n{text_table(table)}")
    if any(e["kind"] != "stage" for e in entries):
        print(summary(entries))
    for e in entries:
        for note in e["notes"]:
            print(f"note: {e['label']}: {note}")
    print(f"report: {(out / 'report.html').resolve()}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    settings = {"bundle": str(args.bundle), "threads": args.threads, "state": None if args.state is None else str(args.state), "store": args.store, "max_batch": args.max_batch, "admin_token": args.admin_token}
    if args.workers == 1:
        return _serve_one(args, settings)
    return _serve_workers(args, settings)


def _listen(args: argparse.Namespace):
    """The socket bound before the banner: a port in use is an error, not a promise."""
    import socket

    try:
        return socket.create_server((args.host, args.port), family=socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    except OSError as e:
        print(f"error: --host {args.host} --port {args.port}: cannot listen there: {e.strerror or e}", file=sys.stderr)
        return None


def _banner(args: argparse.Namespace, port: int, online_events: int | None) -> None:
    routes = "POST /recommend, GET /health, GET /metrics (Prometheus), GET /metrics.json, POST /admin/reload"
    if online_events is not None:
        routes += ", POST /events, GET /features"
        kept = f"journalled in {args.state or args.store}" if (args.state or args.store) else "kept in memory only, lost on restart (give --state DIR or --store redis://HOST:PORT)"
        print(f"online item trend: {online_events:,} events, new ones {kept}")
    workers = f", {args.workers} worker processes" if args.workers > 1 else ""
    print(f"serving {args.bundle} on http://{args.host}:{port}{workers} ({routes})", flush=True)


def _serve_one(args: argparse.Namespace, settings: dict) -> int:
    import uvicorn

    from export.bundle import BundleError
    from export.serve import ServerMetrics, limits_from, make_app, uvicorn_config
    from export.supervisor import service_from

    try:
        service = service_from(settings)
    except (BundleError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    sock = _listen(args)
    if sock is None:
        service.close()
        return BAD_INPUT
    _banner(args, sock.getsockname()[1], None if service.online is None else len(service.online.live))
    limits, metrics = limits_from(settings), ServerMetrics()
    uvicorn.Server(uvicorn_config(make_app(service, limits, metrics, settings), limits, metrics)).run(sockets=[sock])
    return 0


WORKER_READY_S = 120  # how long a worker may take to start serving


def _serve_workers(args: argparse.Namespace, settings: dict) -> int:
    """The parent of ``--workers``: it checks the bundle in a spawned process and holds none of
    it (``export.supervisor``), then runs uvicorn's supervisor over the workers."""
    import shutil

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from export.http import limits_from
    from export.supervisor import check, workers_settings

    error, online_events = check(settings)
    if error is None and online_events is not None and args.state is None and args.store is None:
        error = f"--workers {args.workers}: each worker would keep its own online counters unless they share a journal; give --state DIR or --store redis://HOST:PORT"
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return BAD_INPUT
    sock = _listen(args)
    if sock is None:
        return BAD_INPUT
    _banner(args, sock.getsockname()[1], online_events)
    shared = workers_settings(settings)  # each worker builds its own service from the settings file
    # a reload's new worker must answer within timeout_worker_healthcheck or uvicorn keeps the old
    # one and drops the reload (uvicorn's 5 s default: a worker imports torch and loads the bundle,
    # which takes longer than that on 2 busy cores)
    config = uvicorn.Config("export.serve:app_from_env", factory=True, workers=args.workers, http="export.http:GuardedHttpTools", timeout_keep_alive=limits_from(settings).idle_timeout_s, log_level="warning", timeout_worker_healthcheck=WORKER_READY_S)
    try:
        Multiprocess(config, sockets=[sock]).run()
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    return 0


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown beside every option that has one; descriptions and examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _overrides(args: argparse.Namespace) -> dict:
    """--epochs, --seed, --device, --out in config form: what ``config.command_line`` applies to
    every experiment this command loads."""
    train = {k: getattr(args, k) for k in ("epochs", "seed", "device") if getattr(args, k, None) is not None}
    out: dict = {"train": train} if train else {}
    if getattr(args, "out_root", None) is not None:
        out["out"] = str(args.out_root)
    return out


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got '{text}'") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0..65535, got {value}")
    return value


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _knobs() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    knobs = common.add_argument_group("overrides (for every experiment the command loads, the stages a cascade names included)")
    knobs.add_argument("--epochs", type=_at_least(1), help="train.epochs")
    knobs.add_argument("--seed", type=_at_least(0), help="train.seed")
    knobs.add_argument("--device", help="train.device (cpu, cuda, cuda:1, ...)")
    knobs.add_argument("--out", dest="out_root", type=Path, help="the runs root (each experiment trains in OUT/NAME)")
    common.add_argument("--restart", action="store_true", help="remove the named experiments' run folders and train them from the start (the stages they load are kept)")
    return common


def _restart(experiments) -> None:
    from cascade.train import clear_run

    for exp in experiments:
        if clear_run(exp.run_dir):
            print(f"--restart: removed {exp.run_dir}")


MODEL_LIST = "pre-rankers and recall: dssm, senet, dat, inttower, hit; pre-rankers: poly, mvke, tarq (needs the history), cold (no cache: scored whole per candidate); rankers: din, gbdt (LightGBM)"
TASKS = tasks_help() + "\n`cascade train` runs every task; `cascade distill` only the 'task: distill' experiments."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cascade",
        description="Multi-stage recommendation cascades: recall -> pre-rank -> rank, trained, distilled, exported and evaluated as one.",
        epilog="start with: cascade run configs/quickstart.yaml   (the whole job on the built-in synthetic world)\n" + f"models: {MODEL_LIST}",
        formatter_class=_Help,
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    knobs = _knobs()

    data = verbs.add_parser("data", help="make, convert and check cascade log directories", formatter_class=_Help)
    data_verbs = data.add_subparsers(dest="data_verb", required=True)

    synth = data_verbs.add_parser("synth", help="generate a synthetic cascade world with its truth oracle", formatter_class=_Help, epilog="example: cascade data synth --out runs/data/world --requests 5000")
    synth.add_argument("--out", required=True, type=Path, help="the log directory to write")
    synth.add_argument("--users", type=int, default=2000, help="users in the world")
    synth.add_argument("--items", type=int, default=5000, help="items in the catalog")
    synth.add_argument("--requests", type=int, default=20000, help="logged requests (train 80%%, valid 10%%, test 10%%, in time order)")
    synth.add_argument("--seed", type=int, default=0, help="the world's seed")
    synth.set_defaults(run=_synth)

    check = data_verbs.add_parser("check", help="validate a log directory; exit 2 listing every problem", formatter_class=_Help, epilog="example: cascade data check runs/data/quickstart_6k")
    check.add_argument("dir", type=Path, help="a log directory (schema.json + parquet tables)")
    check.set_defaults(run=_check)

    ml = data_verbs.add_parser("movielens", help="convert MovieLens-1M (users.dat, movies.dat, ratings.dat)", formatter_class=_Help, epilog="protocols: ctr = label rating > 3 (3 dropped), random split, one request per user and split (IntTower/HIT);\n  cascade = temporal: a request is one user's ratings on one UTC day, label rating >= 4\nexample: cascade data movielens --src ../shared/data/ml-1m --out runs/data/ml1m --protocol cascade")
    ml.add_argument("--src", required=True, type=Path, help="the folder with users.dat, movies.dat, ratings.dat")
    ml.add_argument("--out", required=True, type=Path, help="the log directory to write")
    ml.add_argument("--protocol", required=True, choices=["ctr", "cascade"], help="see below")
    ml.add_argument("--seed", type=int, default=2024, help="seed of the random split and sampled candidates")
    ml.set_defaults(run=_movielens)

    imp = data_verbs.add_parser(
        "import",
        help="turn your own logs (CSV or parquet: one row per user-item event) into a checked log directory",
        formatter_class=_Help,
        description="Events (and optional users and items tables) -> a cascade log directory: ids mapped to 1..V (vocabularies saved in OUT/vocab), requests, labels, history, splits, features. Give a mapping YAML (docs/reference.md: Your own logs), options, or both (options win).",
        epilog="example: cascade data import --events ratings.csv --user userId --item movieId --time timestamp --label 'rating >= 4' --out runs/data/mine\n"
        "         cascade data import --mapping my_logs.yaml --out runs/data/mine",
    )
    imp.add_argument("--mapping", type=Path, help="a YAML naming the files and columns (paths in it are relative to it)")
    imp.add_argument("--out", required=True, type=Path, help="the log directory to write (new, empty, or an older log directory)")
    files = imp.add_argument_group("files and columns (override the mapping)")
    files.add_argument("--events", help="the events file: CSV, or parquet (.parquet)")
    files.add_argument("--users", help="a users table (features keyed by the user column)")
    files.add_argument("--items", help="an items table (features keyed by the item column)")
    files.add_argument("--user", help="user id column")
    files.add_argument("--item", help="item id column")
    files.add_argument("--time", help="event time column")
    files.add_argument("--label", help="a 0/1 column, or a rule such as 'rating >= 4'")
    files.add_argument("--request", help="request id column (default: one user's events in one --request-window)")
    files.add_argument("--stage", help="logged stage column, codes 0 recalled .. 3 exposed (default: all exposed)")
    shape = imp.add_argument_group("requests and splits (override the mapping; defaults in brackets)")
    shape.add_argument("--name", help="the data set's name [imported]")
    shape.add_argument("--time-unit", choices=["s", "ms", "us", "iso"], help="unit of the time column [s]")
    shape.add_argument("--request-window", type=_at_least(1), help="seconds of one request without a request column [86400]")
    shape.add_argument("--history-max", type=_at_least(1), help="history length kept [50]")
    shape.add_argument("--split", choices=["time", "random"], help="time: by request time; random: seeded [time]")
    shape.add_argument("--valid", type=float, help="fraction of requests for validation [0.1]")
    shape.add_argument("--test", type=float, help="fraction of requests for test [0.1]")
    shape.add_argument("--seed", type=_at_least(0), help="seed of a random split [0]")
    imp.set_defaults(run=_import)

    train = verbs.add_parser("train", help="train the experiments of a YAML config (every task)", parents=[knobs], formatter_class=_Help, description="Train every experiment of CONFIG (or one), each in OUT/NAME: config.json, log.txt, metrics.jsonl, best.pt, last.pt, prev.pt, results.json. A stopped run resumes from last.pt (prev.pt if last.pt is damaged); with another config it is refused, naming the keys: --restart trains it from the start.", epilog=f"{TASKS}\nmodels: {MODEL_LIST}\nexample: cascade train configs/quickstart.yaml --experiment din --epochs 1")
    train.add_argument("config", type=Path, help="a YAML config (see configs/)")
    train.add_argument("--experiment", help="only this experiment of the config")
    train.set_defaults(run=_train)

    distill = verbs.add_parser("distill", help="train only a config's 'task: distill' experiments (pre-rankers from their teacher)", parents=[knobs], formatter_class=_Help, description="As `cascade train`, restricted to 'task: distill' experiments; a missing teacher is trained first.", epilog=f"{TASKS}\nexample: cascade distill benchmarks/configs/distill_synth.yaml --experiment listwise_kd")
    distill.add_argument("config", type=Path, help="a YAML config (see configs/)")
    distill.add_argument("--experiment", help="only this experiment of the config")
    distill.set_defaults(run=_train)

    export = verbs.add_parser("export", help="export a trained cascade to a bundle: ONNX towers, cached item side, faiss index, manifest", formatter_class=_Help, epilog="example: cascade export runs/quickstart/cascade_distilled --out runs/bundles/quickstart --index ivf")
    export.add_argument("run_dir", nargs="?", type=Path, help="a finished 'task: cascade' run")
    export.add_argument("--out", required=True, type=Path, help="the bundle directory to write (replaced whole)")
    for name in STAGE_NAMES:
        export.add_argument(f"--{name}", metavar="CONFIG:EXPERIMENT", help=f"the {name} stage's trained run (instead of RUN_DIR)")
    export.add_argument("--quotas", default=None, help="recall,prerank,rank quotas (default: the run's own; 200,50,10 with named stages), e.g. what `cascade plan` chose")
    export.add_argument("--index", default="flat", help="faiss index over the recall item vectors: flat (exact) | ivf | hnsw | ivfpq")
    export.add_argument("--nlist", type=int, default=1024, help="ivf/ivfpq: inverted lists")
    export.add_argument("--nprobe", type=int, default=128, help="ivf/ivfpq: lists searched per query")
    export.add_argument("--hnsw-m", type=int, default=32, help="hnsw: neighbours per node")
    export.add_argument("--ef-search", type=int, default=2000, help="hnsw: search breadth")
    export.add_argument("--pq-m", type=int, default=16, help="ivfpq: sub-quantisers")
    export.add_argument("--refine", type=int, default=0, help="ivfpq: re-score REFINE x k PQ candidates on 8-bit vectors (0: none)")
    export.add_argument("--quantize", action="store_true", help="int8 dynamic quantisation of the pre-ranker and ranker graphs")
    export.set_defaults(run=_export)

    serve = verbs.add_parser("serve", help="serve a bundle over HTTP JSON", formatter_class=_Help, epilog="example: cascade serve runs/quickstart/cascade_distilled/bundle --port 8000\n  curl -s localhost:8000/recommend -d '{\"user_id\": 7, \"history\": [12, 40]}'")
    serve.add_argument("bundle", type=Path, help="a bundle written by `cascade export`")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=_port, default=8000, help="port to listen on (0: any free port)")
    serve.add_argument("--threads", type=int, default=1, help="onnxruntime threads per session")
    serve.add_argument("--store", default=None, metavar="redis://HOST:PORT[/DB]", help="keep the online features' journal in Redis instead (shared by hosts; the Redis server must run with --appendonly yes --appendfsync always)")
    serve.add_argument("--workers", type=_at_least(1), default=1, help="server processes sharing the port; with online features they share the --state journal, each tailing it")
    serve.add_argument("--state", type=Path, default=None, help="directory of the online features' journal and snapshots (SQLite): events posted to /events are on disk before their 200 and survive a restart; without it they live in memory only")
    serve.add_argument("--max-batch", type=_at_least(1), default=256, help="requests in one {\"requests\": [...]} body, and in one cascade run of the dynamic batcher")
    serve.add_argument("--admin-token", default=None, help="POST /admin/reload then answers any client that sends 'Authorization: Bearer TOKEN' (without it: loopback clients only)")
    serve.set_defaults(run=_serve)

    ev = verbs.add_parser("eval", help="evaluate cascades offline: per-stage quality, recall-vs-rank consistency, baselines, cost; writes metrics.json, report.md, report.html", formatter_class=_Help, epilog="example: cascade eval runs/quickstart/cascade_independent runs/quickstart/cascade_distilled --out runs/report")
    ev.add_argument("paths", nargs="+", type=Path, metavar="RUN_DIR", help="'task: cascade' runs or bundles; runs of one experiment over seeds become mean ± std")
    ev.add_argument("--out", type=Path, default=Path("runs/report"), help="report directory")
    ev.add_argument("--seed", type=int, default=0, help="seed of the random pre-ranker baseline")
    ev.set_defaults(run=_eval)

    pl = verbs.add_parser("plan", help="choose recall's and pre-rank's quotas for the best joint recall within a p99 latency budget", formatter_class=_Help, description="Measure the bundle's per-stage cost curves (ms by candidates, one request at a time as the server runs them) and the run's joint recall at every recall x pre-rank quota of the grids (torch cascade, a sample of test requests); for each budget print the quotas with the highest joint recall whose predicted p99 fits, and the grid. The rank quota (what is shown) is kept.", epilog="example: cascade plan runs/quickstart/cascade_distilled/bundle --budget-ms 2 4\n  then: cascade export runs/quickstart/cascade_distilled --quotas 400,100,10 --out runs/bundles/planned")
    pl.add_argument("bundle", type=Path, help="a bundle `cascade export RUN_DIR` wrote (its run gives the quality)")
    pl.add_argument("--budget-ms", type=float, nargs="+", required=True, help="p99 budgets of the server's cascade time, in ms")
    pl.add_argument("--recall-quotas", type=_ints, default=None, help="recall quotas to try, e.g. 100,200,400 (default: a quarter to four times the bundle's)")
    pl.add_argument("--prerank-quotas", type=_ints, default=None, help="pre-rank quotas to try (default: twice the rank quota, and a half to four times the bundle's)")
    pl.add_argument("--requests", type=_at_least(1), default=2000, help="test requests the quality is measured on (a seeded sample)")
    pl.add_argument("--cost-requests", type=_at_least(20), default=500, help="test requests timed one at a time at each probed quota pair")
    pl.add_argument("--seed", type=int, default=0, help="seed of the sample")
    pl.add_argument("--out", type=Path, default=None, help="a directory to write plan.json to")
    pl.set_defaults(run=_plan)

    job = verbs.add_parser("run", help="the whole job for a config: data, train, distill, the cascades, export, eval (finished steps are kept)", parents=[knobs], formatter_class=_Help, description="Every step of CONFIG's job not yet done: the logs, each stage (pointwise, recall), distillation, the cascades, each cascade exported to RUN_DIR/bundle, and one report over every cascade in OUT/report. Finished steps are kept whatever the options: to train again with others, give another --out.", epilog="example: cascade run configs/quickstart.yaml  (what `make demo` runs)\n         cascade run configs/ml1m.yaml  (MovieLens-1M; needs ../shared/data/ml-1m)")
    job.add_argument("config", type=Path, help="a YAML config with at least one 'task: cascade' experiment")
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
