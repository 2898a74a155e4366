"""The live item counters behind online item features: what `cascade serve` keeps so that a stage
trained on the item trend (``cascade.data.trend``) reads, at request time, the value training
computed.

- ``OnlineFeatures``: the definition a bundle carries (the trend's windows and scale, which event
  kinds count, and up to when the bundle's own snapshot of the logged events reaches).
- ``LiveTrend``: the exposures as sorted event keys that grow: a large sorted base and a small
  sorted delta, folded into the base past ``MERGE_AT``. Its counts are ``window_counts`` of both,
  the very function training counts with, so a replay gives training's values exactly.
- A journal makes events durable: ``SqliteJournal`` (the embedded default: one SQLite file in WAL
  mode under ``--state DIR``; every server process on the host tails it) or ``RedisJournal``
  (``--store redis://HOST:PORT``: a Redis stream, shared by hosts; the server must fsync its
  append-only file on every write). An event is in the journal, committed and synced, before its
  acknowledgement; concurrent batches share one commit (``EventStore.append``: group commit).
  Snapshots of the keys, with the journal position they cover, bound a restart's work: the
  journal rows a snapshot covers are trimmed a snapshot later.
- ``EventStore``: validates a batch of events (``parse_events``: nothing bad reaches the journal),
  appends it durably, and keeps this process's ``LiveTrend`` in step with the journal (``sync``).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from cascade.data.trend import DAY, TS_OFFSET, TrendSpec, event_keys, window_counts

EXPOSURE = "exposure"  # the logs' exposed candidates (stage 3): what the trend counts
MAX_EVENTS = 10_000  # events in one POST /events
FUTURE_SLACK = DAY  # an event or request further ahead of the server's clock than this is refused
MERGE_AT = 1 << 16  # delta keys folded into the base (a linear merge of two sorted runs)
SNAPSHOT_EVERY = 1 << 20  # journalled events between snapshots


class EventError(ValueError):
    """A bad event batch, naming the field (``events[3].ts``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass(frozen=True)
class OnlineFeatures:
    """What a bundle's stages read that moves with time: the item trend ``trend`` (windows and
    scale), counted over events of ``kinds``; the bundle's snapshot holds the logged ones strictly
    before ``events_until`` (the first test request: a replay of the test split continues it)."""

    trend: TrendSpec
    events_until: int
    kinds: tuple[str, ...] = (EXPOSURE,)

    def to_json(self) -> dict[str, Any]:
        return {"trend": {"days": list(self.trend.days), "scale": self.trend.scale}, "kinds": list(self.kinds), "events_until": self.events_until}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "OnlineFeatures":
        return cls(TrendSpec(tuple(d["trend"]["days"]), d["trend"]["scale"]), int(d["events_until"]), tuple(d["kinds"]))


class LiveTrend:
    """Sorted event keys that grow (``ItemTrend`` that takes new events); thread-safe."""

    def __init__(self, keys: np.ndarray):
        self.base = np.sort(np.asarray(keys, np.int64))
        self.delta = np.zeros(0, np.int64)
        self._lock = threading.Lock()

    def add(self, keys: np.ndarray) -> None:
        if not len(keys):
            return
        with self._lock:
            # a stable sort of concatenated sorted runs is a linear merge (timsort)
            delta = np.sort(np.concatenate([self.delta, np.sort(keys)]), kind="stable")
            if len(delta) >= MERGE_AT:
                self.base, self.delta = np.sort(np.concatenate([self.base, delta]), kind="stable"), np.zeros(0, np.int64)
            else:
                self.delta = delta

    def keys(self) -> np.ndarray:
        with self._lock:
            return np.sort(np.concatenate([self.base, self.delta]), kind="stable")

    def __len__(self) -> int:
        return len(self.base) + len(self.delta)

    def windows(self, item: np.ndarray, ts: np.ndarray, days: Sequence[float]) -> np.ndarray:
        """item (B, N), ts (B,) -> (W, B, N): each item's events in [ts - days[w], ts)."""
        base, delta = self.base, self.delta  # one consistent pair: add() replaces, never mutates
        out = window_counts(base, item, ts, days)
        return out + window_counts(delta, item, ts, days) if len(delta) else out

    def counts(self, item: np.ndarray, ts: np.ndarray, days: float) -> np.ndarray:
        return self.windows(item, ts, (days,))[0]


class Journal(Protocol):
    """Where events become durable: batches of keys in commit order, numbered by ``seq``."""

    def append(self, keys: np.ndarray) -> None: ...  # committed and synced on return

    def read_after(self, seq: int) -> tuple[int, int, np.ndarray]: ...  # (first seq read or 0, last seq, keys)

    def snapshot(self) -> tuple[int, np.ndarray] | None: ...  # (seq it covers, keys)

    def save_snapshot(self, seq: int, keys: np.ndarray) -> None: ...  # and trim the rows the previous one covered

    def last_seq(self) -> int: ...

    def identity(self, bundle: str) -> None: ...  # refuse state that another bundle wrote

    def close(self) -> None: ...


class SqliteJournal:
    """``DIR/journal.sqlite`` (WAL, synchronous=FULL: a commit is on disk before it returns; one
    row per commit group, the keys as a blob) and ``DIR/snapshot.npy`` + ``snapshot.json``."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "journal.sqlite"
        self._write = self._connect()
        self._read = self._connect()
        self._write.execute("CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, keys BLOB NOT NULL)")
        self._write.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._wlock, self._rlock = threading.Lock(), threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        return con

    def identity(self, bundle: str) -> None:
        with self._wlock:
            self._write.execute("INSERT OR IGNORE INTO meta VALUES ('bundle', ?)", (bundle,))
            (have,) = self._write.execute("SELECT value FROM meta WHERE key = 'bundle'").fetchone()
        if have != bundle:
            raise ValueError(f"{self.dir}: this state belongs to another bundle (its events were counted on top of that bundle's snapshot); give a fresh --state")

    def append(self, keys: np.ndarray) -> None:
        with self._wlock:
            self._write.execute("INSERT INTO events (keys) VALUES (?)", (np.ascontiguousarray(keys, np.int64).tobytes(),))

    def read_after(self, seq: int) -> tuple[int, int, np.ndarray]:
        with self._rlock:
            rows = self._read.execute("SELECT seq, keys FROM events WHERE seq > ? ORDER BY seq", (seq,)).fetchall()
        if not rows:
            return 0, seq, np.zeros(0, np.int64)
        return rows[0][0], rows[-1][0], np.concatenate([np.frombuffer(blob, np.int64) for _, blob in rows])

    def last_seq(self) -> int:
        with self._rlock:
            return int(self._read.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])

    def _meta(self) -> dict[str, Any] | None:
        meta = self.dir / "snapshot.json"
        return json.loads(meta.read_text()) if meta.exists() else None

    def snapshot(self) -> tuple[int, np.ndarray] | None:
        info = self._meta()
        return None if info is None else (int(info["seq"]), np.load(self.dir / info["file"]))

    def save_snapshot(self, seq: int, keys: np.ndarray) -> None:
        with open(self.dir / "snapshot.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process at a time: another's files stay whole
            previous = self._meta()
            if previous is not None and previous["seq"] >= seq:
                return  # another process wrote a newer one
            name = f"snapshot-{seq}.npy"
            with open(self.dir / name, "wb") as f:
                np.save(f, keys)
                f.flush()
                os.fsync(f.fileno())
            _write_synced(self.dir / "snapshot.json", json.dumps({"seq": seq, "file": name, "events": int(len(keys))}))
            if previous is not None:
                # rows the previous snapshot covers: a process still behind it reloads this one
                with self._wlock:
                    self._write.execute("DELETE FROM events WHERE seq <= ?", (previous["seq"],))
            for old in self.dir.glob("snapshot-*.npy"):
                if old.name != name:
                    old.unlink(missing_ok=True)

    def close(self) -> None:
        self._write.close()
        self._read.close()


def _write_synced(path: Path, text: str) -> None:
    """``path`` replaced whole by ``text``, on disk before it returns."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RedisJournal:
    """A Redis stream ``PREFIX:events`` whose entry ids are ``seq-0`` (a script numbers each commit
    group atomically, so every process tails the same order), the snapshot in the hash
    ``PREFIX:snapshot``, the bundle's identity in ``PREFIX:bundle``. Acknowledged means fsynced:
    the server must run with ``appendonly yes`` and ``appendfsync always`` (checked on open)."""

    APPEND = "local n = redis.call('INCR', KEYS[1]) redis.call('XADD', KEYS[2], n .. '-0', 'k', ARGV[1]) return n"

    def __init__(self, url: str, prefix: str = "cascade"):
        import redis  # the Redis backend's own dependency

        self.url, self.prefix = url, prefix
        try:
            self.redis = redis.Redis.from_url(url, socket_timeout=30)
            config = self.redis.config_get("append*")
        except redis.exceptions.ResponseError:  # CONFIG renamed away (a managed Redis): trust it
            config = {"appendonly": "yes", "appendfsync": "always"}
        except (redis.exceptions.ConnectionError, ValueError) as e:
            raise ValueError(f"--store {url}: {e}") from None
        if config.get("appendonly") != "yes" or config.get("appendfsync") != "always":
            raise ValueError(f"--store {url}: the Redis server has appendonly {config.get('appendonly')}, appendfsync {config.get('appendfsync')}; an acknowledged event would not be on disk: run it with --appendonly yes --appendfsync always")
        self.keys = {name: f"{prefix}:{name}" for name in ("seq", "events", "snapshot", "bundle", "lock")}
        self._append = self.redis.register_script(self.APPEND)

    def identity(self, bundle: str) -> None:
        self.redis.set(self.keys["bundle"], bundle, nx=True)
        have = self.redis.get(self.keys["bundle"]).decode()
        if have != bundle:
            raise ValueError(f"--store {self.url}: its '{self.prefix}' state belongs to another bundle; use another Redis database (redis://HOST:PORT/DB)")

    def append(self, keys: np.ndarray) -> None:
        self._append(keys=[self.keys["seq"], self.keys["events"]], args=[np.ascontiguousarray(keys, np.int64).tobytes()])

    def read_after(self, seq: int) -> tuple[int, int, np.ndarray]:
        rows = self.redis.xrange(self.keys["events"], min=f"({seq}-0", max="+")
        if not rows:
            return 0, seq, np.zeros(0, np.int64)
        number = lambda entry_id: int(entry_id.split(b"-")[0])  # noqa: E731
        return number(rows[0][0]), number(rows[-1][0]), np.concatenate([np.frombuffer(fields[b"k"], np.int64) for _, fields in rows])

    def last_seq(self) -> int:
        return int(self.redis.get(self.keys["seq"]) or 0)

    def snapshot(self) -> tuple[int, np.ndarray] | None:
        seq, keys = self.redis.hmget(self.keys["snapshot"], ["seq", "keys"])
        return None if seq is None else (int(seq), np.frombuffer(keys, np.int64).copy())

    def save_snapshot(self, seq: int, keys: np.ndarray) -> None:
        lock = self.redis.lock(self.keys["lock"], timeout=120)
        with lock:
            previous = self.redis.hget(self.keys["snapshot"], "seq")
            if previous is not None and int(previous) >= seq:
                return
            self.redis.hset(self.keys["snapshot"], mapping={"seq": seq, "keys": np.ascontiguousarray(keys, np.int64).tobytes()})
            if previous is not None:  # entries the previous snapshot covers
                self.redis.xtrim(self.keys["events"], minid=f"{int(previous) + 1}-0", approximate=False)

    def close(self) -> None:
        self.redis.close()


def open_journal(state: str | Path | None, store: str | None) -> Journal | None:
    """``--state DIR`` (SQLite) or ``--store redis://...``; neither: events in memory only."""
    if state is not None and store is not None:
        raise ValueError("give --state DIR (this host) or --store redis://HOST:PORT (shared), not both")
    if store is not None:
        if not store.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"--store {store}: expected redis://HOST:PORT[/DB]")
        return RedisJournal(store)
    return SqliteJournal(state) if state is not None else None


class EventStore:
    """The live counters of one bundle: ``parse_events`` -> ``append`` (durable, group commit) ->
    every process's ``LiveTrend`` through ``sync``; ``counts`` is what the catalog reads."""

    def __init__(self, definition: OnlineFeatures, keys: np.ndarray, item_known: np.ndarray, journal: Journal | None = None, bundle: str = ""):
        """``keys``: the bundle's snapshot of logged events; ``item_known`` (max id + 1,) bool: the
        catalog's ids; ``journal``: None keeps events in memory only (lost on restart)."""
        self.definition, self.item_known, self.journal, self.identity = definition, item_known, journal, bundle
        self.seq = 0
        self._sync_lock = threading.Lock()
        self._commit = threading.Condition()
        self._queue: list[np.ndarray] = []
        self._tickets = self._done = 0
        self._writing = False
        self._failed: list[tuple[int, int, Exception]] = []
        self._since_snapshot = 0
        if journal is None:
            self.live = LiveTrend(keys)
            return
        journal.identity(bundle)
        snap = journal.snapshot()
        self.live = LiveTrend(keys if snap is None else snap[1])
        self.seq = 0 if snap is None else snap[0]
        self.sync()

    # ------------------------------------------------------------------ reading

    def sync(self) -> int:
        """Take in what the journal holds past this process's position (other processes' events
        too); returns the events taken."""
        if self.journal is None:
            return 0
        with self._sync_lock:
            first, last, keys = self.journal.read_after(self.seq)
            if first and first != self.seq + 1:  # a gap: rows trimmed before this process read them?
                snap = self.journal.snapshot()
                if snap is not None and snap[0] > self.seq:  # they are in the snapshot
                    self.seq, self.live = snap[0], LiveTrend(snap[1])
                    first, last, keys = self.journal.read_after(self.seq)
            self.live.add(keys)
            self.seq = last
            self._since_snapshot += len(keys)
            return len(keys)

    def counts(self, item: np.ndarray, ts: np.ndarray, days: float) -> np.ndarray:
        return self.live.counts(item, ts, days)

    def windows(self, item: np.ndarray, ts: np.ndarray, days: Sequence[float]) -> np.ndarray:
        return self.live.windows(item, ts, days)

    def features(self, item_id: int, ts: int) -> dict[str, Any]:
        """One item's counters at ``ts`` (what ``GET /features`` shows)."""
        self.sync()
        counts = {f"{d:g}d": int(self.counts(np.array([[item_id]]), np.array([ts]), d)[0, 0]) for d in self.definition.trend.days}
        return {"item_id": item_id, "ts": ts, "counts": counts, "scale": self.definition.trend.scale, "events": len(self.live)}

    # ------------------------------------------------------------------ writing

    def parse_events(self, payload: Any, now: float | None = None) -> np.ndarray:
        """``{"events": [{"item_id", "ts", "kind"}, ...]}`` -> (E,) event keys, or ``EventError``
        naming the first bad field; nothing is written."""
        if not isinstance(payload, dict) or set(payload) != {"events"}:
            extra = sorted(set(payload) - {"events"}) if isinstance(payload, dict) else []
            raise EventError(str(extra[0]) if extra else "events", "expected a JSON object {\"events\": [{\"item_id\", \"ts\", \"kind\"}, ...]}")
        events = payload["events"]
        if not isinstance(events, list) or not events:
            raise EventError("events", "expected a non-empty list of event objects")
        if len(events) > MAX_EVENTS:
            raise EventError("events", f"{len(events):,} events in one batch, at most {MAX_EVENTS:,}")
        horizon = (time.time() if now is None else now) + FUTURE_SLACK
        kinds = set(self.definition.kinds)
        item, ts = np.empty(len(events), np.int64), np.empty(len(events), np.int64)
        for i, e in enumerate(events):
            if not isinstance(e, dict):
                raise EventError(f"events[{i}]", "expected an object with item_id, ts and kind")
            if set(e) != {"item_id", "ts", "kind"}:
                missing, extra = sorted({"item_id", "ts", "kind"} - set(e)), sorted(set(e) - {"item_id", "ts", "kind"})
                raise EventError(f"events[{i}].{(missing or extra)[0]}", "missing" if missing else "unknown field (an event has item_id, ts and kind)")
            x = e["item_id"]
            if not _is_int(x) or not 0 < x < len(self.item_known) or not self.item_known[x]:
                raise EventError(f"events[{i}].item_id", f"unknown item {json.dumps(x)[:40]} (not in the bundle's catalog)")
            item[i] = x
            ts[i] = parse_ts(e["ts"], f"events[{i}].ts", horizon)
            if e["kind"] not in kinds:
                raise EventError(f"events[{i}].kind", f"unknown kind {json.dumps(e['kind'])[:40]} (counted: {', '.join(sorted(kinds))})")
        return event_keys(item, ts)

    def append(self, keys: np.ndarray) -> None:
        """Make ``keys`` durable, then visible to this process. Concurrent callers share a commit:
        the first to find no commit under way writes everything queued (group commit)."""
        if self.journal is None:
            self.live.add(keys)
            return
        with self._commit:
            self._queue.append(keys)
            self._tickets += 1
            ticket = self._tickets
            while self._done < ticket:
                if self._writing:
                    self._commit.wait()
                    continue
                batch, upto = self._queue, self._tickets
                self._queue, self._writing = [], True
                self._commit.release()
                error = None
                try:
                    self.journal.append(np.concatenate(batch))
                except Exception as e:  # noqa: BLE001  every caller of the group hears of it
                    error = e
                finally:
                    self._commit.acquire()
                    self._writing = False
                if error is not None:
                    self._failed = [f for f in self._failed if f[1] > self._done] + [(self._done, upto, error)]
                self._done = upto
                self._commit.notify_all()
            for lo, hi, error in self._failed:
                if lo < ticket <= hi:
                    raise error
        self.sync()
        self._maybe_snapshot()

    def _maybe_snapshot(self) -> None:
        if self.journal is None or self._since_snapshot < SNAPSHOT_EVERY:
            return
        with self._sync_lock:
            if self._since_snapshot < SNAPSHOT_EVERY:
                return
            self._since_snapshot = 0
            seq, keys = self.seq, self.live.keys()
        self.journal.save_snapshot(seq, keys)

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_ts(value: Any, field: str, horizon: float) -> int:
    """A ts in whole seconds (an integer, or a number with no fraction), at most ``horizon``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        raise EventError(field, f"expected a number of seconds, got {json.dumps(value)[:40]}")
    if value != int(value):
        raise EventError(field, f"expected whole seconds, got {value}")
    if value > horizon:
        raise EventError(field, f"{int(value)} is more than {FUTURE_SLACK} s ahead of the server's clock ({int(horizon - FUTURE_SLACK)})")
    if value < -TS_OFFSET:
        raise EventError(field, f"{int(value)} is before the earliest time the counters hold ({-TS_OFFSET})")
    return int(value)



