"""POST /admin/reload on a real server: a verified bundle swapped in while requests run, a bad one
refused with the old one still serving, and the admin route closed to other clients."""

import contextlib
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest

from export.runtime import CascadeService
from export.serve import serve_in_thread

REQUEST = {"user_id": 3, "segment": 1, "history": [1, 2]}


def request_status(url, body):
    """A load client's view: the status, or the error that stopped the request."""
    try:
        return call(url, body)[0]
    except OSError as e:
        return type(e).__name__


@contextlib.contextmanager
def under_load(url, clients):
    """``clients`` threads posting REQUEST to ``url`` until the block ends; yields the list of
    their statuses (or the error that stopped a request)."""
    statuses, stop = [], threading.Event()

    def load():
        while not stop.is_set():
            statuses.append(request_status(f"{url}/recommend", REQUEST))

    threads = [threading.Thread(target=load) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield statuses
    finally:
        stop.set()
        for t in threads:
            t.join()


def call(url, body=None, headers=None):
    req = urllib.request.Request(url, None if body is None else json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def served(bundle):
    url, stop = serve_in_thread(CascadeService(bundle))
    yield url
    stop()


def test_a_reload_swaps_the_bundle_while_requests_keep_being_answered(served, bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "next")
    before = call(f"{served}/recommend", REQUEST)[1]
    with under_load(served, 4) as statuses:  # requests in flight across the swap
        status, swapped = call(f"{served}/admin/reload", {"bundle": str(copy)})
    assert status == 200 and swapped["bundle"] == str(copy), swapped
    assert statuses and set(statuses) == {200}, statuses
    health = call(f"{served}/health")[1]
    assert health["bundle"]["path"] == str(copy) and health["bundle"]["sha256"] == swapped["sha256"]
    assert call(f"{served}/recommend", REQUEST)[1]["items"] == before["items"]  # the same model, copied


def test_a_bundle_that_fails_verification_is_refused_and_the_old_one_keeps_serving(served, bundle, tmp_path):
    bad = shutil.copytree(bundle, tmp_path / "bad")
    onnx = next(bad.rglob("*.onnx"))
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\0")
    status, body = call(f"{served}/admin/reload", {"bundle": str(bad)})
    assert status == 422 and body["field"] == "bundle" and "altered" in body["error"] and "the served bundle stays" in body["error"]
    assert call(f"{served}/admin/reload", {"bundle": str(tmp_path / "nowhere")})[0] == 422
    assert call(f"{served}/admin/reload", {"bundel": str(bundle)})[1]["field"] == "bundle"
    assert call(f"{served}/health")[1]["bundle"]["path"] == str(bundle)
    assert call(f"{served}/recommend", REQUEST)[0] == 200


def test_with_a_token_the_admin_route_wants_it(bundle):
    url, stop = serve_in_thread(CascadeService(bundle), settings={"admin_token": "s3cret"})
    try:
        status, body = call(f"{url}/admin/reload", {"bundle": str(bundle)})
        assert status == 403 and "Bearer" in body["error"]
        assert call(f"{url}/admin/reload", {"bundle": str(bundle)}, {"Authorization": "Bearer wrong"})[0] == 403
        assert call(f"{url}/admin/reload", {"bundle": str(bundle)}, {"Authorization": "Bearer s3cret"})[0] == 200
    finally:
        stop()


def test_under_workers_a_reload_replaces_every_worker_with_no_failed_request(bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "next")
    proc = subprocess.Popen([sys.executable, "-m", "cascade.cli", "serve", str(bundle), "--port", "0", "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = re.search(r"(http://127\.0\.0\.1:\d+)", proc.stdout.readline()).group(1)
        deadline = time.monotonic() + 60
        while True:
            try:
                old_pids = {call(f"{url}/health")[1]["pid"] for _ in range(20)}
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        with under_load(url, 2) as statuses:
            status, body = call(f"{url}/admin/reload", {"bundle": str(copy)})
            assert status == 202, body
            # each new worker imports torch and loads the bundle under the load; uvicorn's 5 s
            # default for that dropped the reload on 2 busy cores (cli.WORKER_READY_S now)
            deadline = time.monotonic() + 180
            while True:  # until every worker answering is a new one serving the copy
                seen = [call(f"{url}/health")[1] for _ in range(10)]
                if all(h["bundle"]["path"] == str(copy) and h["pid"] not in old_pids for h in seen):
                    break
                assert time.monotonic() < deadline, seen
                time.sleep(0.5)
        assert statuses and set(statuses) == {200}, Counter(statuses)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
