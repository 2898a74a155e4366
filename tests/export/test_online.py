"""The live item counters (export/online.py): the same counts as training's, durable events, one
journal several processes read, and nothing bad journalled."""

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade.data.trend import DAY, TS_OFFSET, ItemTrend, TrendSpec, event_keys
from export import online
from export.online import EventError, EventStore, LiveTrend, OnlineFeatures, RedisJournal, SqliteJournal, open_journal

DEFINITION = OnlineFeatures(TrendSpec((1, 7), "list"), events_until=10 * DAY)
KNOWN = np.array([False, True, True, True, False, True])  # items 1, 2, 3 and 5 are in the catalog


@pytest.fixture(params=["sqlite", "redis"])
def reopen(request, tmp_path):
    """A journal factory: each call opens the same durable state again (a restart, or another
    process); SQLite in a directory, or a real redis-server (flushed first)."""
    if request.param == "sqlite":
        return lambda: SqliteJournal(tmp_path / "state")
    server = request.getfixturevalue("redis_server")
    server.flush()
    return lambda: RedisJournal(server.url)


def event(item=1, ts=DAY, kind="exposure"):
    return {"item_id": item, "ts": ts, "kind": kind}


def test_window_counts_at_the_edges_of_the_key_range():
    # item 2 exposed at -TS_OFFSET (the earliest time a key holds) and at TS_OFFSET - 1 (the last)
    trend = ItemTrend.from_events(np.array([2, 2, 3]), np.array([-TS_OFFSET, TS_OFFSET - 1, 0]))
    # a request at the last second counts every event of item 2 before it over a window reaching
    # past the earliest time: the clipped bounds are the item's own first key and the next item's
    assert trend.counts(np.array([[2, 3]]), np.array([TS_OFFSET - 1]), 10**6).tolist() == [[1, 1]]
    assert trend.counts(np.array([[2]]), np.array([TS_OFFSET + 5]), 10**6).tolist() == [[2]]  # after the last key too
    with pytest.raises(ValueError, match="ts must be within"):
        event_keys(np.array([1]), np.array([TS_OFFSET]))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 6), st.integers(0, 20 * DAY)), max_size=80),
    st.lists(st.integers(1, 10), max_size=8),
    st.lists(st.tuples(st.integers(0, 7), st.integers(0, 21 * DAY)), min_size=1, max_size=12),
    st.sampled_from([1, 2.5, 7]),
)
def test_live_counts_equal_the_offline_counts_however_the_events_arrive(events, batches, queries, days):
    # The bundle's snapshot is the first part of the events, the rest arrive in batches; with the
    # delta folded into the base every 4 keys (MERGE_AT patched), both levels are exercised.
    item, ts = np.array([e[0] for e in events], np.int64), np.array([e[1] for e in events], np.int64)
    cut = len(events) // 2
    live = LiveTrend(event_keys(item[:cut], ts[:cut]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(online, "MERGE_AT", 4)
        at = cut
        for size in batches + [len(events)]:
            live.add(event_keys(item[at : at + size], ts[at : at + size]))
            at += size
    offline = ItemTrend.from_events(item, ts)
    q_item = np.array([[q[0] for q in queries]])
    q_ts = np.array([queries[0][1]])
    np.testing.assert_array_equal(live.counts(q_item, q_ts, days), offline.counts(q_item, q_ts, days))
    # every window in one search gives each window's own counts
    np.testing.assert_array_equal(live.windows(q_item, q_ts, (days, 30, 0.5)), np.stack([offline.counts(q_item, q_ts, d) for d in (days, 30, 0.5)]))
    np.testing.assert_array_equal(live.keys(), offline.keys)


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"events": [event(), event(item=4)]}, "events[1].item_id"),  # 4 is not in the catalog
        ({"events": [event(item=99)]}, "events[0].item_id"),
        ({"events": [event(ts="yesterday")]}, "events[0].ts"),
        ({"events": [event(ts=1.5)]}, "events[0].ts"),
        ({"events": [event(ts=None)]}, "events[0].ts"),
        ({"events": [event(kind="click")]}, "events[0].kind"),
        ({"events": [{"item_id": 1, "ts": 5}]}, "events[0].kind"),
        ({"events": [event() | {"user_id": 3}]}, "events[0].user_id"),
        ({"events": []}, "events"),
        ({"events": [event()], "more": 1}, "more"),
        ({"events": [event(ts=10**9 + 2 * DAY)]}, "events[0].ts"),  # far in the future of now = 1e9
        ({"events": [event()] * 10_001}, "events"),
        ([event()], "events"),
    ],
)
def test_a_bad_batch_names_its_field_and_nothing_reaches_the_journal(tmp_path, payload, field):
    store = EventStore(DEFINITION, np.zeros(0, np.int64), KNOWN, SqliteJournal(tmp_path))  # the check is the journal's caller's
    with pytest.raises(EventError) as e:
        store.parse_events(payload, now=10**9)
    assert e.value.field == field
    assert store.journal.last_seq() == 0 and len(store.live) == 0


def test_a_whole_float_ts_is_taken_as_whole_seconds(tmp_path):
    store = EventStore(DEFINITION, np.zeros(0, np.int64), KNOWN, None)
    keys = store.parse_events({"events": [event(ts=86400.0), event(item=5, ts=3)]}, now=10**9)
    np.testing.assert_array_equal(keys, event_keys(np.array([1, 5]), np.array([DAY, 3])))


def test_events_survive_a_restart_and_a_second_process_sees_them(reopen):
    base = event_keys(np.array([1, 2]), np.array([DAY, DAY]))
    first = EventStore(DEFINITION, base, KNOWN, reopen(), bundle="b1")
    first.append(first.parse_events({"events": [event(1, 2 * DAY), event(3, 2 * DAY + 5)]}))
    second = EventStore(DEFINITION, base, KNOWN, reopen(), bundle="b1")  # another worker, or a restart
    # item 1: DAY and 2 * DAY are in the week before 3 * DAY; item 3 at 2 * DAY + 5
    assert second.features(1, 3 * DAY)["counts"] == {"1d": 1, "7d": 2}
    assert second.features(3, 3 * DAY)["counts"] == {"1d": 1, "7d": 1}
    first.append(first.parse_events({"events": [event(5, 2 * DAY)]}))
    assert second.features(5, 3 * DAY)["counts"]["1d"] == 1  # tailed from the journal
    with pytest.raises(ValueError, match="another bundle"):
        EventStore(DEFINITION, base, KNOWN, reopen(), bundle="b2")


def test_snapshots_trim_the_journal_and_a_restart_or_a_lagging_process_reads_them(reopen, monkeypatch):
    monkeypatch.setattr(online, "SNAPSHOT_EVERY", 3)
    rng = np.random.default_rng(0)
    writer = EventStore(DEFINITION, np.zeros(0, np.int64), KNOWN, reopen())
    lagging = EventStore(DEFINITION, np.zeros(0, np.int64), KNOWN, reopen())
    sent = []
    for _ in range(10):  # 2 events a batch: a snapshot every second batch, trimming the one before
        batch = [event(int(rng.choice([1, 2, 3, 5])), int(rng.integers(0, 5 * DAY))) for _ in range(2)]
        writer.append(writer.parse_events({"events": batch}))
        sent += batch
    # 10 commits, a snapshot after commits 2, 4, 6, 8, 10 (3 events since the last); the one
    # at 10 trimmed what the one at 8 covered: commits 9 and 10 are left
    assert reopen().snapshot()[0] == 10
    assert reopen().read_after(0)[0] == 9
    want = np.sort(event_keys(np.array([e["item_id"] for e in sent]), np.array([e["ts"] for e in sent])))
    restarted = EventStore(DEFINITION, np.zeros(0, np.int64), KNOWN, reopen())
    np.testing.assert_array_equal(restarted.live.keys(), want)
    lagging.sync()  # it read nothing since its start: its rows were trimmed, so it reloads the snapshot
    np.testing.assert_array_equal(lagging.live.keys(), want)


def test_concurrent_batches_share_commits_and_every_one_is_kept(reopen, monkeypatch):
    journal = reopen()
    commits = []
    write = journal.append

    def counted(keys):
        commits.append(len(keys))
        write(keys)

    monkeypatch.setattr(journal, "append", counted)
    store = EventStore(DEFINITION, np.zeros(0, np.int64), KNOWN, journal)
    batches = [store.parse_events({"events": [event(1 + i % 3, i * 60 + j) for j in range(5)]}) for i in range(64)]
    threads = [threading.Thread(target=store.append, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(commits) == 64 * 5 and len(commits) <= 64
    np.testing.assert_array_equal(store.live.keys(), np.sort(np.concatenate(batches)))


def test_a_failed_commit_fails_every_batch_in_it_and_keeps_none(reopen, monkeypatch):
    journal = reopen()
    store = EventStore(DEFINITION, np.zeros(0, np.int64), KNOWN, journal)

    def broken(keys):
        raise OSError("disk full")

    monkeypatch.setattr(journal, "append", broken)
    with pytest.raises(OSError, match="disk full"):
        store.append(store.parse_events({"events": [event()]}))
    assert len(store.live) == 0


def test_a_redis_that_does_not_fsync_every_write_is_refused(redis_server):
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.config_set("appendfsync", "everysec")
    try:
        with pytest.raises(ValueError, match="appendfsync everysec"):
            RedisJournal(redis_server.url)
    finally:
        client.config_set("appendfsync", "always")


def test_the_store_option_is_one_journal_or_the_other(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        open_journal(tmp_path, "redis://127.0.0.1:1")
    with pytest.raises(ValueError, match="expected redis://"):
        open_journal(None, "http://127.0.0.1:6379")
    with pytest.raises(ValueError, match="--store redis://127.0.0.1:1"):
        open_journal(None, "redis://127.0.0.1:1")  # nothing listens there
    assert open_journal(None, None) is None
