"""POST /admin/reload on a real server: a verified bundle swapped in while requests run, a bad one
refused with the old one still serving, and the admin route closed to other clients."""

import json
import shutil
import threading
import urllib.error
import urllib.request

import pytest

from export.runtime import CascadeService
from export.serve import serve_in_thread

REQUEST = {"user_id": 3, "segment": 1, "history": [1, 2]}


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
    statuses, stop = [], threading.Event()

    def load():  # requests in flight across the swap
        while not stop.is_set():
            statuses.append(call(f"{served}/recommend", REQUEST)[0])

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    status, swapped = call(f"{served}/admin/reload", {"bundle": str(copy)})
    stop.set()
    for t in threads:
        t.join()
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
