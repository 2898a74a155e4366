"""The ``cascade`` command.

    cascade data synth --out DIR [--users N --items N --requests N --seed S]
    cascade data check DIR
    cascade data movielens --src DIR --out DIR --protocol ctr|cascade [--seed S]
    cascade train CONFIG [--experiment NAME]
    cascade demo [--out DIR]

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


def _demo(args: argparse.Namespace) -> int:
    from cascade.data.summary import summarize
    from cascade.data.synth import WORLD_FILE, World, WorldConfig, generate

    start = time.perf_counter()
    ds, world = generate(WorldConfig())
    out = write_dataset(ds, args.out, {WORLD_FILE: world.to_bytes()})
    print(f"[1/2] generated the built-in synthetic world into {out} ({time.perf_counter() - start:.1f}s)")
    checked = read_dataset(out)
    print(f"[2/2] checked {out}: ok")
    print(summarize(checked, World.load(out)))
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

    demo = verbs.add_parser("demo", help="the main job on the built-in synthetic world")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.set_defaults(run=_demo)
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
