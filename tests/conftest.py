from contextlib import contextmanager
from pathlib import Path

import pytest

from cascade.cli import main

from cascade.data import store
from cascade.data.store import write_dataset
from cascade.data.synth import WORLD_FILE, WorldConfig, generate

SMALL = WorldConfig(users=120, items=600, requests=400, history_max=20, quotas=(60, 20, 8, 4), seed=7)

# the base block of the task tests' configs (tests/tasks/): a 300-request world, a small DSSM
# student, a DIN teacher; DATA and OUT are replaced by each test's folders
SMALL_DISTILL_BASE = """  data: {kind: synth, dir: DATA, synth: {users: 60, items: 400, requests: 300, history_max: 10, quotas: [40, 10, 4, 2], seed: 3}}
  model: {embedding_dim: 8, name: dssm, params: {hidden: [16, 8], dropout: 0.0}}
  train: {epochs: 2, batch_size: 64, seed: 1, lr: 0.01, monitor: teacher_recall@4@10}
  out: OUT
  task: distill
  distill: {teacher: din, prerank_quota: 10, rank_quota: 4, lists_per_batch: 16}
"""
ML1M = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-1m"


@pytest.fixture(scope="session")
def small_world():
    """(dataset, world) of a small synthetic world."""
    return generate(SMALL)


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory, small_world):
    """A valid log directory of the small world (read-only: copy it before corrupting)."""
    ds, world = small_world
    return write_dataset(ds, tmp_path_factory.mktemp("world") / "small", {WORLD_FILE: world.to_bytes()})


ROWS_PER_GROUP = 1000  # the small world's 24,000 candidates in 24 row groups


@pytest.fixture(scope="session")
def grouped_dir(small_world, tmp_path_factory):
    """The small world written with small candidate row groups (read-only)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store, "CANDIDATE_ROW_GROUP", ROWS_PER_GROUP)
        return write_dataset(small_world[0], tmp_path_factory.mktemp("grouped") / "logs")


@pytest.fixture(scope="session")
def ml1m_dir():
    if not (ML1M / "ratings.dat").exists():
        pytest.skip(f"MovieLens-1M not found at {ML1M} (the shared copy sits beside the repo)")
    return ML1M


# A tiny trained cascade (recall -> DSSM pre-ranker -> DIN ranker, and a LightGBM ranker), shared by
# the export, serving, evaluation and job tests.
CONFIG = """
base:
  data: {kind: synth, dir: DATA, synth: {users: 60, items: 400, requests: 300, history_max: 10, quotas: [40, 10, 4, 2], seed: 3}}
  model: {embedding_dim: 8}
  train: {epochs: 2, batch_size: 64, seed: 1, lr: 0.01, monitor: teacher_recall@4@10}
  out: OUT
  task: distill
  distill: {teacher: din, prerank_quota: 10, rank_quota: 4, lists_per_batch: 16}
  cascade: {recall: {config: CONFIG, experiment: recall}, recall_quota: 40, prerank_quota: 10, rank_quota: 4, lcron_recall_quota: 20}
experiments:
  recall:
    task: recall
    model: {name: dssm, params: {hidden: [16, 8], dropout: 0.0}}
    train: {monitor: recall@50}
  din:
    model: {name: din, params: {attention_hidden: [8], hidden: [16], dropout: 0.0}}
    train: {monitor: recall@4}
    distill: {teacher: null, exposure_bce: 0, rankflow_bce: 1}
  gbdt:
    model: {name: gbdt, params: {n_estimators: 20, num_leaves: 7, min_data_in_leaf: 5}}
    distill: {teacher: null, exposure_bce: 0, rankflow_bce: 1}
  inttower:
    model: {name: inttower, params: {hidden: [16, 8], heads: 2, head_dim: 4, dropout: 0.0}}
  tarq:
    model: {name: tarq, params: {hidden: [16, 8], levels: 2, codes: 8, attention_hidden: [8], dropout: 0.0}}
  cold:
    model: {name: cold, params: {hidden: [16, 8], dropout: 0.0}}
  poly:
    model: {name: poly, params: {hidden: [16, 8], dropout: 0.0, codes: 4}}
  mvke:
    model: {name: mvke, params: {hidden: [16, 8], dropout: 0.0, kernels: 3}}
  exposure:
    model: {name: dssm, params: {hidden: [16, 8], dropout: 0.0}}
  frozen: {task: cascade, cascade: {method: frozen, prerank: exposure}}
"""


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(config path, runs folder) after training the 'frozen' cascade and its stages."""
    root = tmp_path_factory.mktemp("cascade")
    path = root / "c.yaml"
    path.write_text(CONFIG.replace("DATA", str(root / "data")).replace("OUT", str(root / "runs")).replace("CONFIG", str(path)))
    assert main(["train", str(path), "--experiment", "frozen"]) == 0
    return path, root / "runs"


@pytest.fixture(scope="session")
def bundle(trained, tmp_path_factory):
    """The frozen cascade exported with `cascade export RUN_DIR` (read-only: copy before tampering)."""
    _, runs = trained
    out = tmp_path_factory.mktemp("bundles") / "frozen"
    assert main(["export", str(runs / "frozen"), "--out", str(out)]) == 0
    return out


@contextmanager
def one_thread():
    """Torch on one intra-op thread, as a streamed step is on 2 cores (``train.reader_core``
    leaves its reading thread the other): a matmul summed over another number of threads rounds
    differently, which a comparison of streamed and in-memory weights at 1e-5 would see."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_in_memory_and_streamed(config: Path, command: str, in_memory: str, streamed: str) -> dict[str, dict]:
    """`cascade COMMAND CONFIG` for experiment ``in_memory`` then ``streamed`` (their runs under
    ``runs`` beside CONFIG); checks that only the second says it streamed and that both end with
    the same weights up to float rounding (every test calling this trains on one batch an epoch:
    the same rows in another order). Their results.json, by experiment name."""
    import json

    import torch

    runs = {name: config.parent / "runs" / name for name in (in_memory, streamed)}
    with one_thread():
        for name in runs:
            assert main([command, str(config), "--experiment", name]) == 0
    assert "(streamed)" in (runs[streamed] / "log.txt").read_text() and "(streamed)" not in (runs[in_memory] / "log.txt").read_text()
    weights = {name: torch.load(run / "best.pt", weights_only=True) for name, run in runs.items()}
    for key, value in weights[in_memory].items():
        torch.testing.assert_close(weights[streamed][key], value, atol=1e-5, rtol=1e-4, msg=key)
    return {name: json.loads((run / "results.json").read_text()) for name, run in runs.items()}


class RedisServer:
    """A real ``redis-server`` on a free localhost port, its append-only file fsynced on every
    write (what `cascade serve --store` requires), in ``directory``; ``kill`` is SIGKILL and
    ``start`` brings it back from that file."""

    def __init__(self, directory: Path):
        import shutil
        import socket

        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed (Debian: apt-get install redis-server; .ci/run installs it)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir, self.proc = directory, None
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        import subprocess
        import time

        import redis

        args = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "yes"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError("redis-server did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def flush(self) -> None:
        import redis

        redis.Redis.from_url(self.url).flushall()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.proc.terminate()
    server.proc.wait(timeout=10)
