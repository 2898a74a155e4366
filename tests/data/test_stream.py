import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from cascade.data import store
from cascade.data.lists import build_lists, pointwise_lists
from cascade.data.schema import EXPOSED
from cascade.data.store import DataError, write_dataset
from cascade.data.stream import ListStream, SampleStream, in_memory_bytes

from tests.conftest import ROWS_PER_GROUP


def _keys(flat) -> np.ndarray:
    """(request_id, item_id) of each sample, sorted: the multiset of samples."""
    keys = np.stack([flat.request_id, flat.item["item_id"][:, 0]], axis=1)
    return keys[np.lexsort(keys.T[::-1])]


def test_row_groups_are_whole_requests_filled_greedily(grouped_dir, small_world):
    f = pq.ParquetFile(grouped_dir / "candidates.parquet")
    groups = [f.read_row_group(g, columns=["request_id"])["request_id"].to_numpy() for g in range(f.num_row_groups)]
    assert sum(map(len, groups)) == len(small_world[0].candidates["request_id"])
    ids = np.concatenate(groups)
    assert np.all(ids[1:] >= ids[:-1])  # sorted by request
    assert all(g[-1] < h[0] for g, h in zip(groups, groups[1:]))  # no request cut in two
    assert all(len(g) <= ROWS_PER_GROUP for g in groups)
    # full: the next group's first request would not have fitted
    assert all(len(g) + np.sum(h == h[0]) > ROWS_PER_GROUP for g, h in zip(groups, groups[1:]))


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(1, 30), min_size=0, max_size=40), size=st.integers(1, 60))
def test_request_cuts_keep_requests_whole(lengths, size):
    rid = np.repeat(np.arange(len(lengths)), lengths)
    cuts = store.request_cuts(rid, size)
    bounds = [0] + [b for _, b in cuts]
    assert [a for a, _ in cuts] == bounds[:-1] and bounds[-1] == len(rid)  # contiguous, covering every row
    for a, b in cuts:
        assert a == 0 or rid[a] != rid[a - 1]  # starts at a request's first row
        assert b - a <= size or len(np.unique(rid[a:b])) == 1  # longer only for one long request


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_the_stream_holds_exactly_the_in_memory_samples(grouped_dir, small_world, split):
    ds = small_world[0]
    memory = pointwise_lists(ds, split, min_stage=EXPOSED)
    streamed = SampleStream.open(grouped_dir, split, EXPOSED).collect()
    assert len(SampleStream.open(grouped_dir, split, EXPOSED)) == len(memory) > 0
    np.testing.assert_array_equal(_keys(streamed), _keys(memory))
    # and each sample carries the same fields: match them up by (request, item)
    order_s = np.lexsort((streamed.item["item_id"][:, 0], streamed.request_id))
    order_m = np.lexsort((memory.item["item_id"][:, 0], memory.request_id))
    for name in memory.item:
        np.testing.assert_array_equal(streamed.item[name][order_s], memory.item[name][order_m], err_msg=name)
    for name in memory.user:
        np.testing.assert_array_equal(streamed.user[name][order_s], memory.user[name][order_m], err_msg=name)
    np.testing.assert_array_equal(streamed.history[order_s], memory.history[order_m])
    np.testing.assert_array_equal(streamed.label[order_s], memory.label[order_m])


@settings(max_examples=15, deadline=None)
@given(batch_size=st.integers(1, 700), buffer=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_an_epoch_gives_every_sample_once_in_full_batches(grouped_dir, batch_size, buffer, seed):
    stream = SampleStream.open(grouped_dir, "train", EXPOSED)
    batches = list(stream.batches(batch_size, seed, buffer=buffer))
    assert all(len(b) == batch_size for b in batches[:-1]) and 0 < len(batches[-1]) <= batch_size
    assert len(batches) == stream.steps(batch_size)
    np.testing.assert_array_equal(_keys(_cat(batches)), _keys(stream.collect()))


def test_the_order_is_seeded(grouped_dir):
    stream = SampleStream.open(grouped_dir, "train", EXPOSED)
    first = lambda seed: next(stream.batches(64, seed)).request_id  # noqa: E731
    np.testing.assert_array_equal(first(1), first(1))
    assert not np.array_equal(first(1), first(2))


@pytest.mark.parametrize("world", [2, 3])
def test_shards_read_disjoint_row_groups_and_take_equal_steps(grouped_dir, world):
    stream = SampleStream.open(grouped_dir, "train", EXPOSED)
    counts = stream.counts()
    # worked out: shard r owns row groups r, r + world, ...; every shard stops at the fewest full batches
    steps = min(int(counts[r::world].sum()) // 50 for r in range(world))
    shards = [list(stream.batches(50, seed=4, shard=(r, world))) for r in range(world)]
    assert [len(s) for s in shards] == [steps] * world and steps > 0
    assert all(len(b) == 50 for s in shards for b in s)
    keys = [set(map(tuple, _keys(_cat(s)))) for s in shards]
    for a in range(world):
        for b in range(a + 1, world):
            assert not keys[a] & keys[b]


def test_a_bad_value_anywhere_names_the_file_row_column_and_value(grouped_dir, small_world, tmp_path):
    import shutil

    bad = shutil.copytree(grouped_dir, tmp_path / "bad")
    table = pq.read_table(bad / "candidates.parquet")
    label = table.column("label").to_numpy().copy()
    label[2500] = 2.0  # in the third row group (rows 2,000-2,999): its row 500
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(label))
    pq.write_table(table, bad / "candidates.parquet", row_group_size=ROWS_PER_GROUP)
    req = small_world[0].requests
    other = next(s for s in ("train", "valid", "test") if s != req["split"][req["request_id"] == table.column("request_id")[2500].as_py()][0])
    with pytest.raises(DataError) as err:
        SampleStream.open(bad, other, EXPOSED).collect()  # found even in another split's stream
    assert "candidates.parquet: column 'label', row 2500: label is not 0 or 1 (value 2.0)" in str(err.value)


def _by_request(lists):
    return lists.take(np.argsort(lists.request_id))


def _assert_same_lists(streamed, memory):
    assert streamed.list_size == memory.list_size and len(streamed) == len(memory) > 0
    streamed, memory = _by_request(streamed), _by_request(memory)
    np.testing.assert_array_equal(streamed.request_id, memory.request_id)
    for side in ("item", "user"):
        for name, values in getattr(memory, side).items():
            np.testing.assert_array_equal(getattr(streamed, side)[name], values, err_msg=f"{side} {name}")
    for name in ("history", "label", "stage", "mask", "ts"):
        np.testing.assert_array_equal(getattr(streamed, name), getattr(memory, name), err_msg=name)


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_the_list_stream_holds_exactly_the_in_memory_lists(grouped_dir, small_world, split):
    stream = ListStream.open(grouped_dir, split)
    _assert_same_lists(stream.collect(), build_lists(small_world[0], split))
    assert len(stream) == len(build_lists(small_world[0], split))


def test_the_list_stream_keeps_requests_with_enough_history(grouped_dir, small_world):
    memory = build_lists(small_world[0], "train")
    lengths = (memory.history > 0).sum(axis=1)
    k = int(np.median(lengths))  # about half the lists have fewer
    kept = memory.take(np.flatnonzero(lengths >= k))
    assert 0 < len(kept) < len(memory)
    streamed = ListStream.open(grouped_dir, "train", min_history=k)
    assert len(streamed) == len(kept)
    batches = list(streamed.batches(16, seed=3))
    assert all(len(b) == 16 for b in batches[:-1]) and len(batches) == streamed.steps(16)
    _assert_same_lists(_cat(batches), kept.take_columns(np.broadcast_to(np.arange(streamed.list_size), (len(kept), streamed.list_size))))


def test_a_request_cut_by_a_row_group_is_named(grouped_dir, small_world, tmp_path):
    import shutil

    cut = shutil.copytree(grouped_dir, tmp_path / "cut")
    table = pq.read_table(cut / "candidates.parquet")
    pq.write_table(table, cut / "candidates.parquet", row_group_size=150)  # a file written elsewhere
    request = table.column("request_id")[150].as_py()
    assert request == table.column("request_id")[149].as_py()  # worked out: the first request spans rows 0-199
    req = small_world[0].requests
    with pytest.raises(DataError) as err:
        len(ListStream.open(cut, req["split"][req["request_id"] == request][0]))
    assert f"request {request} spans row groups 0 and 1" in str(err.value)


def test_in_memory_bytes_worked_by_hand(grouped_dir, small_world):
    ds = small_world[0]
    spec = ds.schema.features
    assert not spec.in_table("candidates")  # the synthetic world stores no per-candidate field
    # a table row: request_id and item_id (8 + 8), stage 1, label 4 -> 21 bytes; a list cell: 8 bytes
    # per item-field column, label 4, stage 1, mask 1; build_lists' index arrays: 6 x 8 = 48 bytes
    width = sum(f.max_len if f.multi else 1 for f in spec.in_table("items"))
    assert in_memory_bytes(grouped_dir) == len(ds.candidates["request_id"]) * (21 + 8 * width + 6 + 48)


def _cat(batches):
    from cascade.data.lists import concat_lists

    return concat_lists(batches)
