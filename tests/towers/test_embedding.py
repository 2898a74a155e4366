import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade.features import Field, FeatureSpec
from cascade.towers.embedding import HISTORY, Embeddings, layout, pack_items, pack_user

SPEC = FeatureSpec((Field("user_id", "user", 5), Field("item_id", "item", 9), Field("tags", "item", 4, multi=True, max_len=3)))


def test_layout_places_fields_then_history():
    slots = layout(SPEC.side("item"), history_len=4)
    assert [(s.name, s.start, s.width, s.table) for s in slots] == [("item_id", 0, 1, "item_id"), ("tags", 1, 3, "tags"), (HISTORY, 4, 4, "item_id")]


def test_multi_valued_fields_average_their_non_zero_ids():
    emb = Embeddings(SPEC, 2)
    with torch.no_grad():
        emb.tables["tags"].weight[:] = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    slots = layout(SPEC.side("item"))
    x = torch.tensor([[1, 1, 3, 0], [1, 0, 0, 0], [1, 4, 0, 0]])
    out = emb(x, slots)[:, 1]
    # row 0: mean of ids 1 and 3 = ((1 + 5) / 2, (2 + 6) / 2) = (3, 4); row 1: no ids -> 0; row 2: id 4
    torch.testing.assert_close(out, torch.tensor([[3.0, 4.0], [0.0, 0.0], [7.0, 8.0]]))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_padding_never_changes_a_pooled_embedding(seed):
    rng = np.random.default_rng(seed)
    emb = Embeddings(SPEC, 4)
    hist = rng.integers(1, 10, (6, 5)) * (rng.random((6, 5)) < 0.7)
    slots_short = layout((), history_len=5)
    slots_long = layout((), history_len=9)
    wide = np.concatenate([hist, np.zeros((6, 4), np.int64)], axis=1)
    # moving zeros around (padding anywhere) and adding more padding changes nothing
    shuffled = np.take_along_axis(wide, np.argsort(rng.random(wide.shape), axis=1), 1)
    a = emb(torch.from_numpy(hist), slots_short)
    b = emb(torch.from_numpy(shuffled), slots_long)
    torch.testing.assert_close(a, b)


def test_padding_rows_get_no_gradient():
    emb = Embeddings(SPEC, 3)
    emb(torch.tensor([[1, 2, 0, 0]]), layout(SPEC.side("item"))).sum().backward()
    assert emb.tables["tags"].weight.grad[0].abs().sum() == 0
    assert emb.tables["tags"].weight.grad[2].abs().sum() > 0


def test_pack_follows_the_layout(small_world):
    from cascade.data.lists import build_lists

    ds, _ = small_world
    lists = build_lists(ds, "test")
    user_slots = layout(ds.schema.features.side("user"), ds.schema.history_max)
    item_slots = layout(ds.schema.features.side("item"))
    u, it = pack_user(lists, user_slots), pack_items(lists, item_slots)
    np.testing.assert_array_equal(u[:, 0], ds.requests["user_id"][lists.request_id - 1])
    np.testing.assert_array_equal(u[:, -ds.schema.history_max :], lists.history)
    tags = next(s for s in item_slots if s.name == "tags")
    np.testing.assert_array_equal(it[:, :, tags.start : tags.start + tags.width], lists.item["tags"])


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_training_and_eval_pool_the_same_and_train_the_same(seed):
    # training pools multi-valued fields with embedding_bag, eval (and ONNX) with a plain gather:
    # the pre-ranker served must be the one trained, and its gradients those of the plain sum
    rng = np.random.default_rng(seed)
    emb = Embeddings(SPEC, 4)
    slots = layout(SPEC.side("item"), history_len=6)
    x = torch.from_numpy(np.concatenate([rng.integers(1, 10, (5, 1)), rng.integers(0, 5, (5, 3)), rng.integers(0, 10, (5, 6))], axis=1))
    weights = torch.from_numpy(rng.normal(size=(5, 3, 4))).float()
    grads = []
    for training in (True, False):
        emb.zero_grad()
        out = emb.train(training)(x, slots)
        (out * weights).sum().backward()
        grads.append((out.detach(), emb.tables["item_id"].weight.grad.clone(), emb.tables["tags"].weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


SPEC_CAT = FeatureSpec((Field("user_id", "user", 5), Field("item_id", "item", 4), Field("category", "item", 2)))
CATEGORY_OF = np.array([0, 2, 1, 2, 0])  # item ids 1..4 -> categories 2, 1, 2, none


def test_history_fields_add_each_history_items_field_embeddings():
    emb = Embeddings(SPEC_CAT, 2, {"category": CATEGORY_OF})
    with torch.no_grad():
        emb.tables["item_id"].weight[:] = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [3.0, 0.0]])
        emb.tables["category"].weight[:] = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    # item 1: (1, 0) + category 2 (0, 10) = (1, 10); item 2: (0, 1) + (10, 0) = (10, 1); item 4: no category, (3, 0)
    torch.testing.assert_close(emb.items(torch.tensor([1, 2, 4, 0])), torch.tensor([[1.0, 10.0], [10.0, 1.0], [3.0, 0.0], [0.0, 0.0]]))
    # the pooled history is their mean, trained (embedding_bag) and evaluated (gather) alike:
    # history (1, 2, pad): ((1 + 10) / 2, (10 + 1) / 2) = (5.5, 5.5)
    slots = layout((), history_len=3)
    want = torch.tensor([[5.5, 5.5]])
    for training in (True, False):
        emb.train(training)
        torch.testing.assert_close(emb(torch.tensor([[1, 2, 0]]), slots)[:, 0], want)
    assert not any(k.startswith("history_") for k in emb.state_dict())  # rebuilt from the logs, never saved
