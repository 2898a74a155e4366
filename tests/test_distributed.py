"""Data-parallel training under torchrun: 2 CPU processes (gloo) against one process on the same
global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cascade.train import read_checkpoint

CONFIG = """
base:
  data: {kind: synth, dir: data/world, synth: {users: 60, items: 400, requests: 300, history_max: 10, quotas: [40, 10, 4, 2], seed: 3}}
  model: {embedding_dim: 8}
  train: {epochs: 3, batch_size: 64, seed: 1, lr: 0.01}
  out: OUT
experiments:
  exposure:
    task: pointwise
    model: {name: dssm, params: {hidden: [16, 8], dropout: 0.0}}
"""


def cascade(cwd: Path, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launch, "-m", "cascade.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def epochs(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The same pointwise DSSM trained by 2 processes (first, so the group also makes the data
    set) and by 1; and by 2 processes for 2 epochs, then resumed to 3."""
    root = tmp_path_factory.mktemp("ddp")
    for name in ("ddp", "single", "resumed"):
        (root / f"{name}.yaml").write_text(CONFIG.replace("OUT", name))
    cascade(root, "train", "ddp.yaml", nproc=2)
    cascade(root, "train", "single.yaml")
    cascade(root, "train", "resumed.yaml", "--epochs", "2", nproc=2)
    cascade(root, "train", "resumed.yaml", nproc=2)
    # the same world written in row groups of 1,000 candidates (12,000 in all), streamed by 2 processes
    from cascade.data import store
    from cascade.data.synth import WorldConfig, generate

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store, "CANDIDATE_ROW_GROUP", 1000)
        store.write_dataset(generate(WorldConfig(users=60, items=400, requests=300, history_max=10, quotas=(40, 10, 4, 2), seed=3))[0], root / "data" / "grouped")
    (root / "streamed.yaml").write_text(CONFIG.replace("OUT", "streamed").replace("dir: data/world", "dir: data/grouped, stream: always"))
    cascade(root, "train", "streamed.yaml", nproc=2)
    return root


def test_two_processes_train_the_weights_and_metrics_of_one_on_the_same_global_batch(runs):
    ddp, single = read_checkpoint(runs / "ddp/exposure/last.pt"), read_checkpoint(runs / "single/exposure/last.pt")
    # Gradients are averaged over two halves instead of summed over one batch, and the batch
    # norm's sums are all-reduced: the same arithmetic in another order, so rounding only. After
    # 3 epochs of Adam (lr 0.01, 24 steps) that stays under 1e-4 (1.1e-5 measured).
    for key, value in single["model"].items():
        assert torch.allclose(ddp["model"][key].float(), value.float(), atol=1e-4), key
    for a, b in zip(epochs(runs / "ddp/exposure"), epochs(runs / "single/exposure"), strict=True):
        for metric in ("train_loss", "auc", "logloss", "gauc"):
            assert a[metric] == pytest.approx(b[metric], abs=1e-5), (a["epoch"], metric)
    result = json.loads((runs / "ddp/exposure/results.json").read_text())
    assert json.loads((runs / "single/exposure/results.json").read_text())["test"] == pytest.approx(result["test"], abs=1e-5)


def test_results_record_the_world_size_and_each_ranks_share(runs):
    # 480 training rows, global batches of 64: 7 full ones (32 rows a rank) and one of 32 (16 a
    # rank) = 240 rows a rank per epoch, 720 over 3 epochs; one process trains all 1,440
    ddp = json.loads((runs / "ddp/exposure/results.json").read_text())
    assert (ddp["world_size"], ddp["samples_per_rank"]) == (2, [720, 720])
    single = json.loads((runs / "single/exposure/results.json").read_text())
    assert (single["world_size"], single["samples_per_rank"]) == (1, [1440])


def test_rank_zero_alone_writes(runs):
    run = runs / "ddp/exposure"
    assert [row["epoch"] for row in epochs(run)] == [1, 2, 3]  # one row per epoch, not one per rank
    log = (run / "log.txt").read_text()
    assert log.count("epoch 1 ") == 1 and log.count("test: ") == 1


def test_a_resumed_data_parallel_run_continues_on_every_rank(runs):
    run = runs / "resumed/exposure"
    assert "resumed from" in (run / "log.txt").read_text()
    resumed, straight = read_checkpoint(run / "last.pt"), read_checkpoint(runs / "ddp/exposure/last.pt")
    for key, value in straight["model"].items():  # 2 epochs + 1 resumed = 3 epochs in one go
        assert torch.equal(resumed["model"][key], value), key
    assert json.loads((run / "results.json").read_text())["samples_per_rank"] == [720, 720]


def test_two_processes_stream_disjoint_row_groups_in_equal_steps(runs):
    from cascade.data.schema import EXPOSED
    from cascade.data.stream import SampleStream

    counts = SampleStream.open(runs / "data" / "grouped", "train", EXPOSED).counts()
    # each rank reads row groups r, r + 2, ... and makes batches of 64 / 2 = 32 of its own rows;
    # both take the fewer full batches: 3 epochs x steps x 32 rows each
    steps = min(int(counts[r::2].sum()) // 32 for r in (0, 1))
    result = json.loads((runs / "streamed/exposure/results.json").read_text())
    assert (result["world_size"], result["samples_per_rank"]) == (2, [3 * steps * 32] * 2) and steps > 0
    assert "(streamed)" in (runs / "streamed/exposure/log.txt").read_text()
    assert 0.3 < result["test"]["auc"] <= 1.0


CASCADE_CONFIG = """
base:
  data: {kind: synth, dir: data/grouped, synth: {users: 60, items: 400, requests: 300, history_max: 10, quotas: [40, 10, 4, 2], seed: 3}}
  model: {embedding_dim: 8, name: dssm, params: {hidden: [16, 8], dropout: 0.0}}
  train: {epochs: 1, batch_size: 64, seed: 1, lr: 0.01, monitor: teacher_recall@4@10}
  out: OUT
  task: distill
  distill: {teacher: din, prerank_quota: 10, rank_quota: 4, lists_per_batch: 16}
  cascade: {recall: {config: CONFIG, experiment: recall}, recall_quota: 40, prerank_quota: 10, rank_quota: 4, lcron_recall_quota: 20, rounds: 1, self_epochs: 1, tutor_epochs: 1, catalog_negatives: 0, lists_per_batch: 16}
experiments:
  recall: {task: recall, train: {monitor: recall@50}}
  din:
    model: {name: din, params: {attention_hidden: [8], hidden: [16], dropout: 0.0}}
    train: {monitor: recall@4}
    distill: {teacher: null, exposure_bce: 0, rankflow_bce: 1}
  exposure: {}
  rankflow: {task: cascade, data: {stream: always}, cascade: {method: rankflow, prerank: exposure}}
"""


def test_a_streamed_cascade_under_two_processes_shares_the_stage_data_rank_zero_writes(runs):
    # Rank 0 writes each round's stage data a row group at a time; both ranks read it and train
    # each phase on their own row groups. Its starting report (the warm-up stages over the stage
    # data, before any phase trains) is the one process's; every phase trained on both ranks.
    root = runs / "joint"
    root.mkdir()
    (root / "data").symlink_to(runs / "data")  # the world in row groups of 1,000 candidates
    for name in ("ddp", "single"):
        path = root / f"{name}.yaml"
        path.write_text(CASCADE_CONFIG.replace("OUT", name).replace("CONFIG", str(path)))
    cascade(root, "train", "ddp.yaml", "--experiment", "rankflow", nproc=2)
    shutil.copytree(root / "ddp", root / "single", ignore=shutil.ignore_patterns("rankflow"))  # the same warm-up stages
    cascade(root, "train", "single.yaml", "--experiment", "rankflow")
    ddp, single = (json.loads((root / name / "rankflow" / "results.json").read_text()) for name in ("ddp", "single"))
    assert (ddp["world_size"], single["world_size"]) == (2, 1)
    assert ddp["rounds"][0]["after"] == "start" and ddp["rounds"][0]["test"] == pytest.approx(single["rounds"][0]["test"], abs=1e-9, nan_ok=True)
    phases = sorted(p.name for p in (root / "ddp" / "rankflow" / "round1").iterdir())
    assert "prerank_tutor" in phases and "prerank_self" in phases
    for phase in phases:
        rows = read_checkpoint(root / "ddp" / "rankflow" / "round1" / phase / "last.pt")["state"]["rows_per_rank"]
        assert len(rows) == 2 and rows[0] == rows[1] > 0, phase  # the same steps on both ranks
        assert "(streamed)" in (root / "ddp" / "rankflow" / "round1" / phase / "log.txt").read_text()
    assert not (root / "ddp" / "rankflow" / "stage_data").exists()
