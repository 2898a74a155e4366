from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade.config import ConfigError
from cascade.data.lists import build_lists
from cascade.data.schema import EXPOSED
from cascade.data.store import validate
from cascade.data.trend import DAY, TREND_BUCKETS, ItemTrend, TrendSpec, bucket, list_percentile, trend_field_name, with_trend
from cascade.prepare import trend_spec
from cascade.tasks.recall import frozen_recall_output


def test_counts_take_the_window_before_the_request_and_never_the_request_itself():
    # item 5 exposed at 100, 200, 300 and DAY + 150; item 2 at 150.
    trend = ItemTrend.from_events(np.array([5, 5, 5, 2, 5]), np.array([100, 200, DAY + 150, 150, 300]))
    t = DAY + 200  # one day back is [200, DAY + 200): item 5 at 200, 300, DAY + 150 -> 3; item 2 at 150 -> 0
    np.testing.assert_array_equal(trend.counts(np.array([[5, 2, 7]]), np.array([t]), 1), [[3, 0, 0]])
    # at t = DAY + 150 the event at DAY + 150 is the request's own time: not counted; the window
    # [150, DAY + 150) holds 200 and 300 of item 5 and 150 of item 2
    np.testing.assert_array_equal(trend.counts(np.array([[5, 2]]), np.array([DAY + 150]), 1), [[2, 1]])
    # two days back from DAY + 200 reaches 0: all four of item 5's events
    np.testing.assert_array_equal(trend.counts(np.array([[5]]), np.array([t]), 2), [[4]])
    with pytest.raises(ValueError, match="positive days"):
        trend.counts(np.array([[5]]), np.array([t]), 0)


def test_buckets_are_log2_of_one_plus_the_count():
    # 1 + floor(log2(1 + c)): c = 0 -> 1, 1 -> 2, 2 -> 2 (log2 3 = 1.58), 3 -> 3, 7 -> 4, 8 -> 4, a million -> capped
    np.testing.assert_array_equal(bucket(np.array([0, 1, 2, 3, 7, 8, 10**6])), [1, 2, 2, 3, 4, 4, TREND_BUCKETS])


def test_list_percentile_is_the_share_of_the_list_counted_strictly_less():
    # list 7: counts 0, 0, 5, 3 -> strictly less: 0, 0, 3, 2 of 4 -> 1 + floor(16 * share): 1, 1, 13, 9
    # list 2: counts 4, 4 -> 0 of 2 less -> 1, 1 (a tie is one id, the lowest)
    # list 9: one candidate -> 1; the top id is capped at 16 only for shares >= 15/16
    counts = np.array([0, 4, 0, 5, 4, 3, 8])
    group = np.array([7, 2, 7, 7, 2, 7, 9])
    np.testing.assert_array_equal(list_percentile(counts, group), [1, 1, 1, 13, 1, 9, 1])
    # 17 distinct counts in one list: the largest has 16 of 17 below it -> 1 + floor(16 * 16 / 17) = 16
    assert list_percentile(np.arange(17), np.zeros(17, int))[-1] == TREND_BUCKETS


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 50)), min_size=1, max_size=60), st.randoms(use_true_random=False))
def test_list_percentile_is_within_bounds_ordered_and_blind_to_the_lists_order(rows, rnd):
    group = np.array([r[0] for r in rows])
    counts = np.array([r[1] for r in rows])
    ids = list_percentile(counts, group)
    assert ((ids >= 1) & (ids <= TREND_BUCKETS)).all()
    perm = np.array(rnd.sample(range(len(rows)), len(rows)))
    np.testing.assert_array_equal(list_percentile(counts[perm], group[perm]), ids[perm])
    for g in np.unique(group):
        mine = group == g
        order = np.argsort(counts[mine], kind="stable")
        assert (np.diff(ids[mine][order]) >= 0).all()  # a larger count never gets a lower id
        assert ids[mine].min() == 1  # the least counted of a list is always at the bottom


def test_a_trend_scale_must_be_known_and_shared_by_a_cascades_stages():
    from cascade.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig

    def exp(name, recall):
        return ExperimentConfig(name=name, data=DataConfig(recall=recall), model=ModelConfig(), train=TrainConfig())

    with pytest.raises(ValueError, match="trend scale must be one of count, list, got 'log'"):
        TrendSpec((1,), "log")
    with pytest.raises(ConfigError, match=r"data.recall.trend_scale: expected one of count, list, got 'rank'"):
        frozen_recall_output({"config": "unused.yaml", "experiment": "x", "trend_days": [1], "trend_scale": "rank"})
    pre, rank, plain = exp("pre", {"trend_days": [7, 1], "trend_scale": "list"}), exp("rank", {"trend_days": [30]}), exp("plain", {})
    assert trend_spec(pre, plain) == TrendSpec((1, 7), "list")
    with pytest.raises(ConfigError, match="one cascade's stages must share it, got 'pre' list, 'rank' count"):
        trend_spec(pre, rank)


events = st.lists(st.tuples(st.integers(1, 6), st.integers(0, 10 * DAY)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(events, st.lists(st.tuples(st.integers(1, 7), st.integers(0, 11 * DAY)), min_size=1, max_size=8), st.sampled_from([0.5, 1, 3, 30]))
def test_counts_match_brute_force_and_ignore_anything_at_or_after_the_request(events, queries, days):
    item = np.array([e[0] for e in events], np.int64)
    ts = np.array([e[1] for e in events], np.int64)
    q_item = np.array([[q[0]] for q in queries])
    q_ts = np.array([q[1] for q in queries])
    got = ItemTrend.from_events(item, ts).counts(q_item, q_ts, days)
    want = [[int(((item == i) & (ts < t) & (ts >= t - int(days * DAY))).sum())] for (i,), t in zip(q_item, q_ts)]
    np.testing.assert_array_equal(got, want)
    # events at or after every request's time change nothing (causal)
    late = ItemTrend.from_events(np.concatenate([item, q_item[:, 0]]), np.concatenate([ts, q_ts.max() + np.arange(len(q_ts)) % 2]))
    np.testing.assert_array_equal(late.counts(q_item, q_ts, days), got)


def test_with_trend_adds_valid_per_candidate_item_fields_the_lists_carry(small_world):
    ds, _ = small_world
    out = with_trend(ds, ItemTrend.from_dataset(ds), TrendSpec((1, 7.5)))
    names = [trend_field_name(1), trend_field_name(7.5)]
    assert names == ["item_trend_1d", "item_trend_7.5d"]
    assert [out.schema.features[n].table for n in names] == ["candidates", "candidates"]
    assert out.schema.protocol["item_trend_days"] == [1, 7.5]
    assert out.schema.protocol["item_trend_scale"] == "count"
    assert validate(out) == []
    lists = build_lists(out, "test")
    b = int(np.argmax(lists.mask.sum(1)))
    # the first candidate of a test list, recounted by hand from the exposures before its request
    req = {k: v[ds.requests["request_id"] == lists.request_id[b]][0] for k, v in ds.requests.items()}
    item = lists.item["item_id"][b, 0]
    exposed = ds.candidates["stage"] == EXPOSED
    when = ds.requests["ts"][np.searchsorted(ds.requests["request_id"], ds.candidates["request_id"][exposed])]
    mine = ds.candidates["item_id"][exposed] == item
    count = int((mine & (when < req["ts"]) & (when >= req["ts"] - int(7.5 * DAY))).sum())
    assert lists.item["item_trend_7.5d"][b, 0] == bucket(np.array([count]))[0]
    with pytest.raises(ValueError, match="already in the schema"):
        with_trend(out, ItemTrend.from_dataset(ds), TrendSpec((1,)))


def test_trend_needs_temporal_logs(small_world):
    ds, _ = small_world
    with pytest.raises(ValueError, match="not temporal"):
        ItemTrend.from_dataset(replace(ds, schema=replace(ds.schema, temporal=False)))


@pytest.mark.parametrize("days", [7, [0], ["7"], [True], [-1.5]])
def test_trend_days_must_be_a_list_of_positive_days(days):
    with pytest.raises(ConfigError, match=r"data.recall.trend_days: expected a list of positive numbers of days"):
        frozen_recall_output({"config": "unused.yaml", "experiment": "x", "trend_days": days})


def test_a_recall_output_made_earlier_must_hold_the_trend_the_config_asks_for(small_world, tmp_path):
    # the directory is read, not rebuilt, when it exists: one made on the count scale (or without
    # the trend) must not be trained on as if it held the list scale
    from cascade.config import DataConfig
    from cascade.data.store import write_dataset
    from cascade.prepare import prepare_data

    ds, _ = small_world
    write_dataset(with_trend(ds, ItemTrend.from_dataset(ds), TrendSpec((1, 7))), tmp_path / "counted")
    asked = lambda scale, days=[1, 7]: DataConfig(kind="recall_output", dir=str(tmp_path / "counted"), recall={"trend_days": days, "trend_scale": scale})  # noqa: E731
    assert prepare_data(asked("count"), candidates=False).schema.protocol["item_trend_scale"] == "count"
    with pytest.raises(ConfigError, match=r"holds the item trend \[1, 7\] on the 'count' scale, the config asks for \[1, 7\] on 'list'"):
        prepare_data(asked("list"), candidates=False)
    with pytest.raises(ConfigError, match=r"the config asks for \[30\] on 'count'"):
        prepare_data(asked("count", [30]), candidates=False)


@settings(max_examples=60, deadline=None)
@given(events, st.lists(st.integers(0, 11 * DAY), max_size=12), st.sampled_from([0.5, 1, 3, 30]), st.permutations([2, 7, 1, 5, 3]))
def test_catalog_counts_equal_the_per_item_counts_whatever_the_order_of_the_requests(events, queries, days, catalog):
    # the sweep (counts at the earliest ts, then a running sum of the events entering and leaving
    # the window) must give what the searched ``counts`` give cell by cell; item 7 is never exposed,
    # items 4 and 6 are exposed but not in the catalog
    trend = ItemTrend.from_events(np.array([e[0] for e in events], np.int64), np.array([e[1] for e in events], np.int64))
    q_ts = np.array(queries, np.int64)
    cat = np.array(catalog)
    want = trend.counts(np.broadcast_to(cat, (len(q_ts), len(cat))), q_ts, days)
    np.testing.assert_array_equal(trend.catalog_counts(cat, q_ts, days), want)
