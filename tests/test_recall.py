import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cascade.cli import main
from cascade import recall
from cascade.data.lists import pointwise_lists
from cascade.data.synth import WorldConfig, generate
from cascade.config import RecallConfig
from cascade.data.store import read_dataset
from cascade.recall import ItemIndex, RecallStep, evaluate_recall, item_table, streamed_training_data, training_pairs
from cascade.towers.dssm import DSSM
from cascade.towers.embedding import Embeddings
from cascade.train import TrainConfig, Trainer
from tests.conftest import run_in_memory_and_streamed


def _model(ds):
    torch.manual_seed(0)
    spec = ds.schema.features
    return DSSM(spec.side("user"), spec.side("item"), Embeddings(spec, 16), history_len=ds.schema.history_max, hidden=(32, 16), dropout=0.0, temperature=0.1)


def test_hard_negatives_come_from_the_requests_cut_items(small_world):
    ds, _ = small_world
    m = _model(ds)
    pairs = training_pairs(ds, m, "train", item_table(ds, m.item_slots), RecallConfig(hard_negatives=3))
    ids = pairs.items[:, :, 0].numpy()  # item_id is the first item column
    flat = pointwise_lists(ds, "train")
    request_of_pair = flat.request_id[flat.label[:, 0] > 0]  # the pairs' row order
    cand = ds.candidates
    for row in range(0, len(ids), 41):
        pos, hard = ids[row, 0], ids[row, 1:][pairs.mask[row, 1:].numpy()]
        mine = cand["request_id"] == request_of_pair[row]
        assert pos in cand["item_id"][mine & (cand["label"] > 0)]
        cut = set(cand["item_id"][mine & (cand["stage"] <= 1)].tolist())
        assert len(hard) == 3 and set(hard.tolist()) <= cut and pos not in hard


def test_index_search_is_brute_force_top_k_minus_excluded():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    ids = np.arange(101, 151)
    index = ItemIndex(ids, vectors)
    users = rng.normal(size=(4, 8)).astype(np.float32)
    exclude = np.array([[0, 0], [101, 102], [0, 0], [150, 0]])
    got = index.search(users, 5, exclude)
    for r in range(4):
        scores = vectors @ users[r]
        order = ids[np.argsort(-scores)]
        want = [i for i in order if i not in exclude[r]][:5]
        assert got[r].tolist() == want


def test_a_few_epochs_beat_the_untrained_tower(tmp_path):
    # its own world: enough clicks (about 3,000 requests x 4 exposures x 0.19) to learn from
    ds, _ = generate(WorldConfig(users=200, items=400, requests=3000, history_max=20, quotas=(60, 20, 8, 4), seed=3))
    m = _model(ds)
    table = item_table(ds, m.item_slots)
    before = evaluate_recall(m, ds, "test", ks=(20,))["recall@20"]
    cfg = RecallConfig(temperature=0.1, popularity_negatives=64, hard_negatives=2)
    pairs = training_pairs(ds, m, "train", table, cfg)
    step = RecallStep(cfg, m, table, ds.items["item_id"], pairs)
    Trainer(m, TrainConfig(epochs=6, batch_size=128, lr=0.01, patience=6, monitor="recall@20"), tmp_path).fit(pairs, lambda b: step(m, b), lambda: evaluate_recall(m, ds, "valid", ks=(20,)))
    after = evaluate_recall(m, ds, "test", ks=(20,))["recall@20"]
    # 20 of 400 items retrieved at random would recall about 0.05
    assert after > before + 0.05 and after > 0.1


@pytest.mark.parametrize("at_once", [1, 7, 64])
def test_recall_evaluated_in_parts_is_the_whole_mean(small_world, monkeypatch, at_once):
    # a mean over the requests with a positive: parts of any size add up to it (a part with no
    # positive adds nothing: the small world's train split has 320 requests, 129 with a positive)
    from cascade import metrics as M
    from cascade.data.lists import build_lists
    from cascade.recall import TowerRetriever, positives_only

    ds, _ = small_world
    m = _model(ds).eval()
    lists = build_lists(positives_only(ds), "train")
    retrieved, _ = TowerRetriever(m, ds)(lists, 200)
    whole = {f"recall@{k}": M.retrieval_recall(retrieved[:, :k], lists.positive_ids) for k in (50, 200)}
    assert 0 < whole["recall@50"] < whole["recall@200"] < 1
    monkeypatch.setattr(recall, "EVAL_REQUESTS", at_once)
    assert evaluate_recall(m, ds, "train", ks=(50, 200)) == pytest.approx(whole, abs=1e-12)


def test_request_weighted_pairs_weigh_every_request_the_same(small_world):
    ds, _ = small_world
    m = _model(ds)
    table = item_table(ds, m.item_slots)
    plain = training_pairs(ds, m, "train", table, RecallConfig())
    pairs = training_pairs(ds, m, "train", table, RecallConfig(pair_weight="request"))
    assert plain.weight is None and len(pairs) == len(plain)
    flat = pointwise_lists(ds, "train")
    request_of_pair = flat.request_id[flat.label[:, 0] > 0]  # the pairs' row order
    # a request with p positives gives p pairs of weight mean_p / p: each request sums to mean_p,
    # and the weights average 1 (sum = requests x mean_p = pairs)
    requests, per_request = np.unique(request_of_pair, return_counts=True)
    sums = np.bincount(np.searchsorted(requests, request_of_pair), weights=pairs.weight.numpy())
    assert per_request.min() < per_request.max()  # the world's requests differ, so this could fail
    assert sums == pytest.approx(np.full(len(requests), per_request.mean()), rel=1e-5)
    assert pairs.weight.mean().item() == pytest.approx(1.0, rel=1e-5)


def test_unknown_pair_weight_is_refused():
    with pytest.raises(ValueError, match="pair_weight: 'requests'"):
        RecallConfig(pair_weight="requests")


def _rows(pairs) -> np.ndarray:
    """Each pair as one row (user columns, item ids, mask, weight), sorted: the multiset of pairs."""
    cols = [pairs.user.numpy(), pairs.items[:, :, 0].numpy(), pairs.mask.numpy(), pairs.weight.numpy()[:, None]]
    rows = np.concatenate([c.astype(np.float64) for c in cols], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


def test_streamed_recall_data_is_the_in_memory_pairs_and_positives(grouped_dir, small_world):
    ds, _ = small_world
    m = _model(ds).eval()
    table = item_table(ds, m.item_slots)
    cfg = RecallConfig(pair_weight="request")
    streamed_ds, streamed = streamed_training_data(read_dataset(grouped_dir, candidates=False), grouped_dir, m, table, cfg)
    memory = training_pairs(ds, m, "train", table, cfg)
    # the same pairs with the same request weights (normalised over every row group's requests)
    np.testing.assert_array_equal(_rows(streamed), _rows(memory))
    # the held-out positives and their requests, every field, and nothing else: what evaluate_recall reads
    c, req = ds.candidates, ds.requests
    held_out = np.isin(req["split"], ("valid", "test"))
    positive = (c["label"] > 0) & np.isin(c["request_id"], req["request_id"][held_out])
    kept = streamed_ds.candidates
    assert np.all(kept["label"] > 0) and len(kept["label"]) == positive.sum() > 0
    want = np.stack([c["request_id"][positive], c["item_id"][positive]])
    got = np.stack([kept["request_id"], kept["item_id"]])
    np.testing.assert_array_equal(got[:, np.lexsort(got[::-1])], want[:, np.lexsort(want[::-1])])
    rows = np.flatnonzero(np.isin(req["request_id"], c["request_id"][positive]))
    assert 0 < len(rows) == len(streamed_ds.requests["request_id"]) < held_out.sum()
    order = np.argsort(streamed_ds.requests["request_id"])
    assert set(streamed_ds.requests) == set(req)
    for name, values in req.items():
        np.testing.assert_array_equal(streamed_ds.requests[name][order], values[rows], err_msg=name)
    for split in ("valid", "test"):
        assert evaluate_recall(m, streamed_ds, split) == evaluate_recall(m, ds, split)


def test_streamed_hard_negatives_are_cut_items_of_the_pairs_request(grouped_dir, small_world):
    ds, _ = small_world
    m = _model(ds)
    table = item_table(ds, m.item_slots)
    cfg = RecallConfig(hard_negatives=3)
    _, streamed = streamed_training_data(read_dataset(grouped_dir, candidates=False), grouped_dir, m, table, cfg)
    memory = training_pairs(ds, m, "train", table, cfg)
    # drawn per row group, so other items, but as many: min(3, the request's cut items) per pair
    assert streamed.mask.sum().item() == memory.mask.sum().item()
    c = ds.candidates
    train = np.isin(c["request_id"], ds.requests["request_id"][ds.requests["split"] == "train"])
    cut_with = {}  # positive item -> the cut items of the train requests where it is positive
    for r in np.unique(c["request_id"][train & (c["label"] > 0)]):
        mine = c["request_id"] == r
        for p in c["item_id"][mine & (c["label"] > 0)]:
            cut_with.setdefault(int(p), set()).update(c["item_id"][mine & (c["stage"] <= 1)].tolist())
    ids = streamed.items[:, :, 0].numpy()
    for row in range(len(ids)):
        pos, hard = ids[row, 0], ids[row, 1:][streamed.mask[row, 1:].numpy()]
        assert len(set(hard.tolist())) == len(hard) and set(hard.tolist()) <= cut_with[int(pos)] and pos not in hard


RUN_CONFIG = """
base:
  data: {kind: synth, dir: DATA, synth: {users: 60, items: 400, requests: 300, history_max: 10, quotas: [40, 10, 4, 2], seed: 3}}
  model: {embedding_dim: 8, name: dssm, params: {hidden: [16, 8], dropout: 0.0}}
  train: {epochs: 3, batch_size: 100000, seed: 1, lr: 0.01, monitor: recall@50}
  out: OUT
  task: recall
  recall: {popularity_negatives: 32}
experiments:
  never: {data: {stream: never}}
  always: {data: {stream: always}}
"""


def test_a_streamed_recall_run_learns_what_the_in_memory_one_learns(tmp_path, monkeypatch):
    from cascade.data import store

    monkeypatch.setattr(store, "CANDIDATE_ROW_GROUP", 1000)  # 300 lists of 40 in 12 row groups
    path = tmp_path / "c.yaml"
    path.write_text(RUN_CONFIG.replace("DATA", str(tmp_path / "data")).replace("OUT", str(tmp_path / "runs")))
    # one batch of every pair per epoch: the same pairs in another order, so the same in-batch
    # softmax, popularity draws and Adam steps up to float rounding
    results = run_in_memory_and_streamed(path, "train", "never", "always")
    assert pq.ParquetFile(tmp_path / "data" / "candidates.parquet").metadata.num_row_groups == 12
    for split in ("valid", "test"):
        assert results["always"][split] == pytest.approx(results["never"][split], abs=1e-9)


def test_a_model_without_a_plain_dot_is_refused_as_recall(tmp_path, capsys):
    config = tmp_path / "r.yaml"
    config.write_text(f"""
base:
  data: {{kind: synth, dir: {tmp_path / 'data'}, synth: {{users: 60, items: 400, requests: 300, history_max: 10, quotas: [40, 10, 4, 2], seed: 3}}}}
  train: {{epochs: 1, monitor: recall@50}}
  out: {tmp_path / 'runs'}
  task: recall
experiments:
  r: {{model: {{name: poly, params: {{hidden: [16, 8], dropout: 0.0}}}}}}
""")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "model.name: 'poly' cannot be a recall model" in err and "(recall: dssm, senet, dat)" in err
    assert not (tmp_path / "runs" / "r" / "best.pt").exists()
