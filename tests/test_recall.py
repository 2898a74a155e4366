import numpy as np
import pytest
import torch

from cascade.data.lists import pointwise_lists
from cascade.data.synth import WorldConfig, generate
from cascade.config import RecallConfig
from cascade.recall import ItemIndex, RecallStep, evaluate_recall, item_table, training_pairs
from cascade.towers.dssm import DSSM
from cascade.towers.embedding import Embeddings
from cascade.train import TrainConfig, Trainer


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
