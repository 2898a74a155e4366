"""The real server on a free localhost port, spoken to with a real HTTP client (urllib)."""

import json
import urllib.error
import urllib.request

import pytest

from export.runtime import CascadeService
from export.serve import serve_in_thread


@pytest.fixture(scope="module")
def server(bundle):
    url, stop = serve_in_thread(CascadeService(bundle))
    yield url
    stop()


def call(url, body=None, raw=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_recommend_health_and_metrics_over_http(server):
    status, health = call(f"{server}/health")
    assert status == 200 and health["status"] == "ok" and health["stages"]["rank"] == {"model": "din", "quota": 4}
    status, got = call(f"{server}/recommend", {"user_id": 3, "segment": 1, "history": [1, 2]})
    assert status == 200 and len(got["items"]) == 4 and not {1, 2} & set(got["items"])
    status, batch = call(f"{server}/recommend", {"requests": [{"user_id": 3, "segment": 1, "history": [1, 2]}, {"user_id": 4}]})
    assert status == 200 and batch["results"][0]["items"] == got["items"] and len(batch["results"]) == 2
    status, m = call(f"{server}/metrics.json")
    assert status == 200 and m["requests"] >= 3
    assert set(m["latency_ms"]) == {"queue", "recall", "prerank", "rank", "total"}
    assert m["latency_ms"]["total"]["p50"] <= m["latency_ms"]["total"]["p99"]


@pytest.mark.parametrize(
    "raw, status, field",
    [
        (b"{not json", 400, None),
        (json.dumps({"user_id": "x"}).encode(), 422, "user_id"),
        (json.dumps({"usr": 1}).encode(), 422, "usr"),
        (json.dumps({"requests": [{"user_id": 1}, {"history": {"a": 1}}]}).encode(), 422, "requests[1].history"),
        (json.dumps({"requests": []}).encode(), 422, "requests"),
        ("\u00ff".encode("latin-1"), 400, None),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_field_and_the_server_stays_up(server, raw, status, field):
    got_status, body = call(f"{server}/recommend", raw=raw)
    assert got_status == status and body["field"] == field and body["error"]
    assert call(f"{server}/recommend", {"user_id": 1})[0] == 200
    assert call(f"{server}/metrics.json")[1]["errors"][str(status)] >= 1
