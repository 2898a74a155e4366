"""A cascade trained on the item trend, exported, served with live counters and replayed: the
server's stages keep what the torch cascade keeps; acknowledged events survive SIGKILL."""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cascade.cli import main
from cascade.data.trend import event_keys
from cascade.evaluate import load_saved
from cascade.models import MODELS
from export.bundle import MANIFEST
from export.online import RedisJournal, SqliteJournal
from export.replay import http_post, replay
from export.runtime import CascadeService
from export.serve import serve_in_thread
from teachers import TEACHERS
from tests.conftest import CONFIG
from tests.test_evaluate import TREND_DATA, TREND_STAGES


@pytest.fixture(scope="module")
def trend_run(tmp_path_factory):
    """(run dir, bundle) of a cascade whose pre-ranker and ranker read the 1- and 7-day trend on
    the list scale (the DSSM's item tower reads it too: no cached item side)."""
    tmp = tmp_path_factory.mktemp("trend")
    path = tmp / "c.yaml"
    text = CONFIG.replace("experiments:", "experiments:" + TREND_STAGES.replace("TREND_DATA", TREND_DATA.replace("SCALE", "list")), 1)
    path.write_text(text.replace("TRENDDATA", str(tmp / "trend_data")).replace("DATA", str(tmp / "data")).replace("OUT", str(tmp / "runs")).replace("CONFIG", str(path)))
    assert main(["train", str(path), "--experiment", "frozen_trend"]) == 0
    assert main(["export", str(tmp / "runs" / "frozen_trend"), "--out", str(tmp / "bundle")]) == 0
    return tmp / "runs" / "frozen_trend", tmp / "bundle"


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path):
    """(the serve options of a durable journal, a function opening it here): a --state directory,
    or --store on a real redis-server (flushed; the server itself, to kill and restart)."""
    if request.param == "sqlite":
        state = tmp_path / "state"
        return ["--state", str(state)], lambda: SqliteJournal(state), None
    server = request.getfixturevalue("redis_server")
    server.flush()
    return ["--store", server.url], lambda: RedisJournal(server.url), server


def test_the_bundle_carries_the_trend_and_runs_the_item_tower_live(trend_run):
    _, bundle = trend_run
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert manifest["online"]["trend"] == {"days": [1, 7], "scale": "list"}
    prerank = next(s for s in manifest["stages"] if s["name"] == "prerank")
    assert prerank["item_vectors"] == "live" and not (bundle / "prerank" / "items.npy").exists()
    service = CascadeService(bundle)
    keys = np.load(bundle / "online" / "events.npy")
    # the snapshot is every logged exposure before the first test request, and nothing after
    saved = load_saved(trend_run[0], models={**MODELS, **TEACHERS})
    trend, until = saved.data.trend(), manifest["online"]["events_until"]
    test_ts = saved.ds.requests["ts"][saved.ds.requests["split"] == "test"]
    assert until == test_ts.min()
    np.testing.assert_array_equal(keys, trend.keys[trend.ts < until])
    assert 0 < len(keys) < len(trend.keys)
    assert len(service.online.live) == len(keys)


def test_a_replay_through_http_keeps_every_stage_as_the_torch_cascade(trend_run, backend):
    run, bundle = trend_run
    saved = load_saved(run, models={**MODELS, **TEACHERS})
    service = CascadeService(bundle, journal=backend[1]())
    user_fields = list(service.user_fields)
    url, stop = serve_in_thread(service)
    try:
        post = http_post(url)
        report = replay(post, saved.data, saved.cascade(), saved.data.trend(), service.online.definition.events_until, user_fields)
        assert report["requests"] == (saved.ds.requests["split"] == "test").sum()
        assert report["events"] > 0
        assert report["same_every_stage"] >= 0.99, report
        assert report["same_final_order"] >= 0.99, report
        # the live counters: one item's window counts over HTTP equal the offline counts
        item = int(saved.ds.items["item_id"][0])
        at = int(saved.ds.requests["ts"].max())
        with urllib.request.urlopen(f"{url}/features?item_id={item}&ts={at}") as r:
            shown = json.loads(r.read())
        assert shown["counts"] == {f"{d}d": int(saved.data.trend().counts(np.array([[item]]), np.array([at]), d)[0, 0]) for d in (1, 7)}
        # a bad batch: 422 naming the field
        with pytest.raises(urllib.error.HTTPError) as e:
            post("/events", {"events": [{"item_id": item, "ts": "noon", "kind": "exposure"}]})
        assert e.value.code == 422 and json.loads(e.value.read())["field"] == "events[0].ts"
    finally:
        stop()


def test_a_replay_without_the_events_does_not_keep_the_same_items(trend_run):
    # the control: the same replay with every /events call dropped leaves the server on its
    # snapshot, whose counts miss the test split's exposures: some stage keeps other items
    run, bundle = trend_run
    saved = load_saved(run, models={**MODELS, **TEACHERS})
    service = CascadeService(bundle)
    url, stop = serve_in_thread(service)
    try:
        real = http_post(url)
        report = replay(lambda path, body: None if path == "/events" else real(path, body), saved.data, saved.cascade(), saved.data.trend(), service.online.definition.events_until, list(service.user_fields))
        assert report["same_every_stage"] < 0.99, report
    finally:
        stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(bundle: Path, *more: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cascade.cli", "serve", str(bundle), "--port", str(port), *more], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return proc, url
        except OSError:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("the server did not start in 60 s")


def test_every_acknowledged_event_survives_sigkill_at_random_points(trend_run, backend):
    # A client posts batches of 50 events as fast as the server acknowledges them; the server is
    # killed with SIGKILL at a random moment, three times, each restart on the same journal. With
    # Redis, the second time redis-server is SIGKILLed first and restarted from its append-only
    # file. The journal must then hold every acknowledged batch (and at most the one in flight).
    _, bundle = trend_run
    options, journal, redis_server = backend
    items = np.load(bundle / "catalog.npz")["item_id"]
    rng = np.random.default_rng(11)
    acked: list[list[dict]] = []
    in_flight = 0
    for round in range(3):
        proc, url = _start(bundle, *options)
        post = http_post(url, timeout=5)
        kill_redis = redis_server is not None and round == 1

        def kill(proc=proc, kill_redis=kill_redis):
            if kill_redis:
                redis_server.kill()
            os.kill(proc.pid, signal.SIGKILL)

        killer = threading.Timer(rng.uniform(0.3, 1.5), kill)
        killer.start()
        while True:
            batch = [{"item_id": int(rng.choice(items)), "ts": int(rng.integers(0, 10**6)), "kind": "exposure"} for _ in range(50)]
            try:
                assert post("/events", {"events": batch}) == {"accepted": 50}
            except (OSError, http.client.HTTPException):  # refused, reset, a 500 once Redis is gone, or killed mid-answer (IncompleteRead): not acknowledged
                in_flight += 1
                break
            acked.append(batch)
        killer.join()
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        if kill_redis:
            redis_server.start()
    assert len(acked) >= 3
    snapshot = np.load(bundle / "online" / "events.npy")
    _, _, have = journal().read_after(0)  # the whole journal (no snapshot: SNAPSHOT_EVERY is far off)
    want = event_keys(np.array([e["item_id"] for b in acked for e in b]), np.array([e["ts"] for b in acked for e in b]))
    assert not Counter(want.tolist()) - Counter(have.tolist())  # every acknowledged event, as often as sent
    assert len(want) <= len(have) <= len(want) + 50 * in_flight
    # and a restarted server counts them: its /health shows the snapshot plus the journal
    proc, url = _start(bundle, *options)
    try:
        with urllib.request.urlopen(f"{url}/health") as r:
            assert json.loads(r.read())["online"]["events"] == len(snapshot) + len(have)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_worker_processes_see_the_same_counts_through_the_shared_journal(trend_run, backend, capsys):
    _, bundle = trend_run
    assert main(["serve", str(bundle), "--workers", "2"]) == 2  # no shared journal: refused
    assert "--state" in capsys.readouterr().err
    proc, url = _start(bundle, *backend[0], "--workers", "2")
    try:
        item = int(np.load(bundle / "catalog.npz")["item_id"][0])
        at = 10**6
        before = {_get(f"{url}/features?item_id={item}&ts={at}")["counts"]["1d"] for _ in range(20)}
        assert len(before) == 1
        # 5 events of the item in the day before `at`, posted to whichever worker takes them
        for k in range(5):
            assert http_post(url)("/events", {"events": [{"item_id": item, "ts": at - 100 - k, "kind": "exposure"}]}) == {"accepted": 1}
        pids, seen = set(), set()
        deadline = time.monotonic() + 30
        with ThreadPoolExecutor(8) as pool:  # concurrent connections: the kernel hands them to both workers
            while len(pids) < 2 and time.monotonic() < deadline:
                for health, features in pool.map(lambda _: (_get(f"{url}/health"), _get(f"{url}/features?item_id={item}&ts={at}")), range(16)):
                    pids.add(health["pid"])
                    seen.add(features["counts"]["1d"])
        assert len(pids) == 2, pids
        assert seen == {before.pop() + 5}
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_the_job_exports_a_trend_cascade_and_replays_its_test_split_through_it(trend_run, capsys):
    from cascade.job import export_run, exported

    run, _ = trend_run
    assert exported(run) is False  # the fixture's bundle went elsewhere: nothing under the run yet
    export_run(run)
    out = capsys.readouterr().out
    replayed = json.loads((run / "replay.json").read_text())
    assert exported(run) is True
    assert replayed["requests"] == 30 and replayed["same_every_stage"] >= 0.99
    assert "replay of the test split through the served bundle" in out and "a replayed request" in out
    assert set(replayed["example"]["response"]["stages"]) == {"recall", "prerank", "rank"}


def test_a_reload_keeps_the_live_counters_and_refuses_a_bundle_without_them(trend_run, bundle):
    run, trend_bundle = trend_run
    again = trend_bundle.parent / "bundle_again"  # the same run exported again: a new bundle, same snapshot
    if not again.exists():
        assert main(["export", str(run), "--out", str(again)]) == 0
    service = CascadeService(trend_bundle)
    url, stop = serve_in_thread(service)
    try:
        post = http_post(url)
        item = int(np.flatnonzero(service.online.item_known)[0])
        at = service.online.definition.events_until + 3600
        post("/events", {"events": [{"item_id": item, "ts": at, "kind": "exposure"}] * 3})
        probe = f"{url}/features?item_id={item}&ts={at + 60}"
        with urllib.request.urlopen(probe) as r:
            counted = json.loads(r.read())["counts"]
        assert post("/admin/reload", {"bundle": str(again)})["bundle"] == str(again)
        with urllib.request.urlopen(probe) as r:
            assert json.loads(r.read())["counts"] == counted  # the 3 events posted before the swap
        post("/events", {"events": [{"item_id": item, "ts": at, "kind": "exposure"}]})
        with urllib.request.urlopen(probe) as r:
            assert json.loads(r.read())["counts"]["1d"] == counted["1d"] + 1  # and the new store takes more
        with pytest.raises(urllib.error.HTTPError) as e:  # a bundle with no online features: refused
            post("/admin/reload", {"bundle": str(bundle)})
        assert e.value.code == 422 and "no online feature" in json.loads(e.value.read())["error"]
    finally:
        stop()


NGINX = """
worker_processes 1;
daemon off;
pid PREFIX/nginx.pid;
error_log PREFIX/error.log;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path PREFIX/body; proxy_temp_path PREFIX/proxy;
    fastcgi_temp_path PREFIX/fcgi; uwsgi_temp_path PREFIX/uwsgi; scgi_temp_path PREFIX/scgi;
    upstream cascade { server 127.0.0.1:PORT_A; server 127.0.0.1:PORT_B; keepalive 8; }
    server {
        listen 127.0.0.1:PORT;
        location / { proxy_pass http://cascade; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
}
"""


def test_replicas_on_two_ports_behind_nginx_share_the_counters_through_redis(trend_run, redis_server, tmp_path):
    # Two `cascade serve` replicas (as on two hosts: each its own copy of the bundle, one shared
    # Redis journal) behind one nginx that balances them round robin, all on loopback. An event
    # posted through the proxy lands on one replica; both count it, and requests reach both.
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip("nginx not installed (the Debian package nginx-light; .ci/run installs it)")
    _, bundle = trend_run
    redis_server.flush()
    copies = [shutil.copytree(bundle, tmp_path / f"host{i}" / "bundle") for i in (0, 1)]
    replicas = [_start(copy, "--store", redis_server.url) for copy in copies]
    port = _free_port()
    conf = NGINX.replace("PREFIX", str(tmp_path)).replace("PORT_A", replicas[0][1].rsplit(":", 1)[1]).replace("PORT_B", replicas[1][1].rsplit(":", 1)[1]).replace("PORT", str(port))
    (tmp_path / "nginx.conf").write_text(conf)
    proxy = subprocess.Popen([nginx, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _get(f"{url}/health")
                break
            except OSError:
                assert proxy.poll() is None and time.monotonic() < deadline, proxy.stderr.read().decode()
                time.sleep(0.1)
        service = CascadeService(bundle)
        item = int(np.flatnonzero(service.online.item_known)[0])
        at = service.online.definition.events_until + 3600
        before = [_get(f"{r[1]}/features?item_id={item}&ts={at + 60}")["counts"]["1d"] for r in replicas]
        assert http_post(url)("/events", {"events": [{"item_id": item, "ts": at, "kind": "exposure"}] * 2}) == {"accepted": 2}
        after = [_get(f"{r[1]}/features?item_id={item}&ts={at + 60}")["counts"]["1d"] for r in replicas]
        assert after == [b + 2 for b in before]  # both replicas count the 2 events
        pids = {_get(f"{url}/health")["pid"] for _ in range(8)}
        assert pids == {_get(f"{r[1]}/health")["pid"] for r in replicas}  # the proxy reaches both
        body = {"user_id": 1, "history": [item], "ts": at + 60}
        answers = [http_post(url)("/recommend", body)["items"] for _ in range(4)]
        assert all(a == answers[0] for a in answers)  # the same answer, whichever replica serves it
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
        for proc, _ in replicas:
            proc.terminate()
            proc.wait(timeout=10)
