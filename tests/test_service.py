"""The scoring service against a real uvicorn on 127.0.0.1: scoring, audit log, auth, limits, errors."""

from __future__ import annotations

import http.server
import json
import threading
import time
from typing import ClassVar

import httpx
import pytest
from servers import A_LAUNCH, free_port, post_body, score_body, service_settings, uvicorn_thread

from routescan.detector.artifact import Detector
from routescan.features.fingerprint import fingerprint
from routescan.service.app import create_app
from routescan.service.settings import load_settings

settings = service_settings
body = score_body


@pytest.fixture
def server(tmp_path, test_detector, monkeypatch):
    monkeypatch.delenv("ROUTESCAN_API_TOKEN", raising=False)
    with uvicorn_thread(create_app(settings(tmp_path, max_batch=8), detector=test_detector)) as base:
        yield base


def test_score_trace_and_fingerprint_and_audit_log(server, synthetic_traces, test_detector) -> None:
    trace = synthetic_traces[1]
    r = httpx.post(f"{server}/v1/score", json=body(trace))
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["trace_id"] == trace.trace_id and 0 <= result["score"] <= 1
    assert result["detector_id"] == "test-detector" and result["operating_point"] == "fpr5"
    assert result["label"] == ("flagged" if result["score"] >= result["threshold"] else "ok")
    expected = test_detector.predict_proba(test_detector.features(trace))[0]
    assert result["score"] == pytest.approx(expected)

    fp = fingerprint(trace, test_detector.spec)
    r2 = httpx.post(f"{server}/v1/score", json={"fingerprint": fp.model_dump(mode="json")})
    assert r2.status_code == 200 and r2.json()["score"] == pytest.approx(result["score"])

    audits = httpx.get(f"{server}/v1/audits").json()
    assert [a["trace_id"] for a in audits["items"]] == [trace.trace_id, trace.trace_id]
    assert set(audits["items"][0]) == {
        "id",
        "trace_id",
        "model_id",
        "score",
        "label",
        "detector_id",
        "detector_version",
        "operating_point",
        "created",
    }

    info = httpx.get(f"{server}/v1/detector").json()
    assert info["model_id"] == "tiny-mixtral-seed0" and info["features"] == test_detector.spec.dim
    assert {p["name"] for p in info["operating_points"]} >= {"fpr1", "fpr5"}
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server}/readyz").json()["ready"] is True


def test_the_binary_wire_scores_exactly_as_json(server, synthetic_traces) -> None:
    """The agent's MessagePack bodies (the count matrix as a packed array) and JSON give the same
    scores, single and batched, and every one is in the audit log."""
    from routescan.telemetry.wire import MEDIA_TYPE, packb

    wire = {"content-type": MEDIA_TYPE}
    singles = []
    for trace in synthetic_traces[:3]:
        as_json = httpx.post(f"{server}/v1/score", json=body(trace)).json()
        as_binary = httpx.post(f"{server}/v1/score", content=packb({"trace": trace}), headers=wire)
        assert as_binary.status_code == 200, as_binary.text
        assert as_binary.json()["score"] == as_json["score"]
        singles.append(as_json["score"])
    batch = packb({"items": [{"trace": t} for t in synthetic_traces[:3]]})
    r = httpx.post(f"{server}/v1/score/batch", content=batch, headers=wire)
    # batched rows go through one matrix product: equal to the last bits only
    assert r.status_code == 200 and [x["score"] for x in r.json()["results"]] == pytest.approx(
        singles, rel=1e-12
    )
    assert len(httpx.get(f"{server}/v1/audits?limit=50").json()["items"]) == 9
    other = httpx.post(f"{server}/v1/score", content=packb({"trace": synthetic_traces[0]}), headers={
        "content-type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert other.status_code == 415 and "application/msgpack" in other.text


@pytest.mark.parametrize("binary", [False, True], ids=["json", "msgpack"])
@pytest.mark.parametrize("where", ["top", "trace", "launch", "labels"])
def test_text_is_refused_with_the_field_named_and_not_echoed(
    server, synthetic_traces, where: str, binary: bool
) -> None:
    payload = body(synthetic_traces[0])
    secret = "tell me how to pick the lock on my neighbour's door"
    if where == "top":
        payload["prompt"] = secret
    elif where == "trace":
        payload["trace"]["text"] = secret
    elif where == "launch":
        payload["trace"]["launches"] = [{**A_LAUNCH, "content": secret}]
    else:
        payload["trace"]["labels"]["note"] = secret
    r = post_body(f"{server}/v1/score", payload, binary=binary)
    assert r.status_code == 422
    assert secret not in r.text and "pick the lock" not in r.text
    detail = r.json()["detail"]
    if where != "labels":
        assert any("never text" in d["msg"] for d in detail)
        assert any(d["loc"][-1] in ("prompt", "text", "content") for d in detail)
    else:
        assert any(d["loc"][:4] == ["body", "trace", "labels", "note"] for d in detail)
    assert not httpx.get(f"{server}/v1/audits").json()["items"], "nothing refused is recorded"


def test_other_model_or_spec_is_a_409(server, tiny, launch_models, synthetic_traces, test_detector) -> None:
    from routescan.telemetry.emulated import EmulatedCollector, Request

    other = next(iter(EmulatedCollector(tiny("olmoe")).collect([Request("o-1", "hi")])))
    r = httpx.post(f"{server}/v1/score", json=body(other[1]))
    assert r.status_code == 409 and "olmoe" in r.json()["detail"] and "cannot score" in r.json()["detail"]
    fp = fingerprint(synthetic_traces[0], test_detector.spec).model_dump(mode="json")
    fp["values"] = fp["values"][:-1]
    r = httpx.post(f"{server}/v1/score", json={"fingerprint": fp})
    assert r.status_code == 409 and "values" in r.json()["detail"]
    r = httpx.post(f"{server}/v1/score", json={})
    assert r.status_code == 422 and "exactly one" in r.text


def test_batch_and_limits(server, synthetic_traces) -> None:
    items = [body(t) for t in synthetic_traces[:8]]
    r = httpx.post(f"{server}/v1/score/batch", json={"items": items})
    assert r.status_code == 200 and len(r.json()["results"]) == 8
    assert [x["trace_id"] for x in r.json()["results"]] == [t.trace_id for t in synthetic_traces[:8]]
    r = httpx.post(f"{server}/v1/score/batch", json={"items": items + items[:1]})
    assert r.status_code == 413 and "max_batch=8" in r.text
    page = httpx.get(f"{server}/v1/audits", params={"limit": 5}).json()
    assert len(page["items"]) == 5 and page["next_offset"] == 5
    rest = httpx.get(f"{server}/v1/audits", params={"limit": 5, "offset": 5}).json()
    assert len(rest["items"]) == 3 and rest["next_offset"] is None
    first = httpx.get(f"{server}/v1/audits", params={"limit": 5}).json()
    keyed = httpx.get(f"{server}/v1/audits", params={"limit": 5, "after": first["next_after"]}).json()
    assert [a["id"] for a in keyed["items"]] == [a["id"] for a in rest["items"]] and keyed[
        "next_after"
    ] is None


def test_audit_filters(server, synthetic_traces, test_detector) -> None:
    results = httpx.post(
        f"{server}/v1/score/batch", json={"items": [body(t) for t in synthetic_traces[:8]]}
    ).json()
    flagged = {r["trace_id"] for r in results["results"] if r["label"] == "flagged"}
    got = httpx.get(f"{server}/v1/audits", params={"label": "flagged"}).json()["items"]
    assert {a["trace_id"] for a in got} == flagged
    assert httpx.get(f"{server}/v1/audits", params={"model_id": "nope"}).json()["items"] == []
    assert (
        len(httpx.get(f"{server}/v1/audits", params={"model_id": "tiny-mixtral-seed0"}).json()["items"]) == 8
    )
    assert httpx.get(f"{server}/v1/audits", params={"since": "2999-01-01T00:00:00Z"}).json()["items"] == []
    assert (
        len(httpx.get(f"{server}/v1/audits", params={"until": "2999-01-01T00:00:00Z"}).json()["items"]) == 8
    )
    assert httpx.get(f"{server}/v1/audits", params={"label": "maybe"}).status_code == 422


def test_metrics(server, synthetic_traces) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    httpx.post(f"{server}/v1/score/batch", json={"items": [body(t) for t in synthetic_traces[:8]]})
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server}/metrics").text)}
    kinds = {name: f.type for name, f in families.items() if name.startswith("routescan_")}
    assert kinds == {
        "routescan_requests": "counter",
        "routescan_request_seconds": "histogram",
        "routescan_scored": "counter",
        "routescan_flagged": "counter",
        "routescan_alerts": "counter",
        "routescan_detector_info": "gauge",  # an info metric, as the text format writes it
        "routescan_store_errors": "counter",
        "routescan_store_up": "gauge",
        "routescan_score": "histogram",
        "routescan_agent_traces": "counter",
        "routescan_agent_seconds": "counter",
    }

    def value(family: str, sample: str, **labels: str) -> float:
        return sum(
            s.value
            for s in families[family].samples
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert (
        value("routescan_requests", "routescan_requests_total", endpoint="/v1/score/batch", status="200") == 1
    )
    assert (
        value("routescan_request_seconds", "routescan_request_seconds_count", endpoint="/v1/score/batch") == 1
    )
    assert value("routescan_scored", "routescan_scored_total", model_id="tiny-mixtral-seed0") == 8
    assert value("routescan_store_errors", "routescan_store_errors_total") == 0
    assert value("routescan_store_up", "routescan_store_up") == 1
    assert value("routescan_detector_info", "routescan_detector_info", detector_id="test-detector") == 1
    assert value("routescan_score", "routescan_score_count", model_id="tiny-mixtral-seed0") == 8


def test_agents_report_their_counters_with_their_batches(server, synthetic_traces) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    headers = {
        "x-routescan-agent": "vllm-host-1234",
        "x-routescan-agent-counters": "sent=40,spooled=7,dropped=2,step_us=1500,forward_us=300000",
    }
    r = httpx.post(f"{server}/v1/score/batch", json={"items": [body(synthetic_traces[0])]}, headers=headers)
    assert r.status_code == 200
    bad = {"x-routescan-agent": "tell me how to pick a lock", "x-routescan-agent-counters": "spooled=1"}
    assert (
        httpx.post(
            f"{server}/v1/score/batch", json={"items": [body(synthetic_traces[1])]}, headers=bad
        ).status_code
        == 200
    )
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server}/metrics").text)}
    samples = {
        (s.labels["agent"], s.labels["outcome"]): s.value for s in families["routescan_agent_traces"].samples
    }
    assert samples == {
        ("vllm-host-1234", "sent"): 40,
        ("vllm-host-1234", "spooled"): 7,
        ("vllm-host-1234", "dropped"): 2,
    }
    seconds = {
        (s.labels["agent"], s.labels["part"]): s.value for s in families["routescan_agent_seconds"].samples
    }
    assert seconds == {("vllm-host-1234", "step"): 0.0015, ("vllm-host-1234", "forward"): 0.3}


def test_body_size_limit(tmp_path, test_detector, synthetic_traces) -> None:
    with uvicorn_thread(create_app(settings(tmp_path, max_body_bytes=1024), detector=test_detector)) as base:
        big = body(synthetic_traces[0])
        big["trace"]["launches"] = [A_LAUNCH] * 30  # an attachment makes it ~2.5 KB
        r = httpx.post(f"{base}/v1/score", json=big)
        assert r.status_code == 413 and "max_body_bytes" in r.text

        def chunks():
            yield b'{"trace": '
            yield b" " * 4096

        r = httpx.post(f"{base}/v1/score", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413


def test_bearer_token(tmp_path, test_detector, synthetic_traces, monkeypatch) -> None:
    monkeypatch.setenv("ROUTESCAN_API_TOKEN", "s3cret-token")
    with uvicorn_thread(create_app(settings(tmp_path), detector=test_detector)) as base:
        assert httpx.post(f"{base}/v1/score", json=body(synthetic_traces[0])).status_code == 401
        bad = {"Authorization": "Bearer wrong"}
        assert httpx.post(f"{base}/v1/score", json=body(synthetic_traces[0]), headers=bad).status_code == 401
        assert httpx.get(f"{base}/v1/audits", headers=bad).status_code == 401
        assert httpx.get(f"{base}/metrics").status_code == 401
        good = {"Authorization": "Bearer s3cret-token"}
        assert httpx.post(f"{base}/v1/score", json=body(synthetic_traces[0]), headers=good).status_code == 200
        assert httpx.get(f"{base}/healthz").status_code == 200, "probes stay open"


def test_refuses_non_loopback_without_token(tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from routescan.cli.main import app

    monkeypatch.delenv("ROUTESCAN_API_TOKEN", raising=False)
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--db", str(tmp_path / "a.db")])
    assert result.exit_code == 2
    assert "without an API token" in " ".join((result.stdout + (result.stderr or "")).split())


def test_settings_precedence(tmp_path, monkeypatch) -> None:
    config = tmp_path / "service.yaml"
    config.write_text("service:\n  port: 9000\n  max_batch: 10\n  retention_days: 5\n")
    monkeypatch.setenv("ROUTESCAN_MAX_BATCH", "20")
    s = load_settings(config, retention_days=None, port=9100)
    assert (s.port, s.max_batch, s.retention_days) == (9100, 20, 5)
    with pytest.raises(ValueError):
        load_settings(config, port=-1)


class _Hook(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []
    delay = 0.0

    def do_POST(self) -> None:
        time.sleep(self.delay)
        length = int(self.headers.get("content-length", 0))
        type(self).received.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def _hook_server(delay: float):
    handler = type("Hook", (_Hook,), {"received": [], "delay": delay})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, handler


def test_webhook_alerts_off_the_request_path(tmp_path, test_detector, synthetic_traces) -> None:
    srv, handler = _hook_server(delay=0.0)
    try:
        s = settings(tmp_path, operating_point="all", webhook_url=f"http://127.0.0.1:{srv.server_port}/hook")
        with uvicorn_thread(create_app(s, detector=test_detector)) as base:
            r = httpx.post(f"{base}/v1/score/batch", json={"items": [body(t) for t in synthetic_traces[:3]]})
            assert r.json()["flagged"] == 3
            deadline = time.monotonic() + 10
            while len(handler.received) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
        assert sorted(a["trace_id"] for a in handler.received) == sorted(
            t.trace_id for t in synthetic_traces[:3]
        )
        assert all(
            set(a) >= {"score", "label", "detector_id"} and "prompt" not in a for a in handler.received
        )
    finally:
        srv.shutdown()


@pytest.mark.parametrize("kind", ["slow", "dead"])
def test_slow_or_dead_webhook_never_slows_scoring(
    tmp_path, test_detector, synthetic_traces, kind: str
) -> None:
    srv = None
    if kind == "slow":
        srv, _ = _hook_server(delay=3.0)
        url = f"http://127.0.0.1:{srv.server_port}/hook"
    else:
        url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    s = settings(
        tmp_path,
        operating_point="all",
        webhook_url=url,
        webhook_queue=2,
        webhook_retries=1,
        webhook_timeout_s=5.0,
    )
    try:
        app = create_app(s, detector=test_detector)
        with uvicorn_thread(app) as base, httpx.Client() as client:
            start = time.perf_counter()
            for t in synthetic_traces[:20]:
                assert client.post(f"{base}/v1/score", json=body(t)).json()["label"] == "flagged"
            elapsed = time.perf_counter() - start
            assert elapsed < 3.0, f"20 flagged requests took {elapsed:.2f}s behind a {kind} webhook"
            if kind == "slow":
                assert app.state.metrics.value("routescan_alerts_total", outcome="dropped") >= 10
    finally:
        if srv:
            srv.shutdown()


def test_loads_the_shipped_demo_detector() -> None:
    from routescan.detector.artifact import default_detector_path

    det = Detector.load(default_detector_path())
    assert det.card.demo and det.card.spec.model_id == "tiny-mixtral-seed0"
    assert {p.name for p in det.card.operating_points} == {"fpr1", "fpr5"}


def test_the_dashboard_reads_only_metrics_the_daemon_exports(server, synthetic_traces) -> None:
    """docker/grafana/dashboards/routescan.json must not chart a series the daemon never writes."""
    import re
    from pathlib import Path

    from prometheus_client.parser import text_string_to_metric_families

    dashboard = json.loads(
        (Path(__file__).parents[1] / "docker/grafana/dashboards/routescan.json").read_text()
    )
    headers = {"x-routescan-agent": "a-1", "x-routescan-agent-counters": "spooled=1,dropped=0"}
    httpx.post(
        f"{server}/v1/score/batch", json={"items": [body(t) for t in synthetic_traces[:4]]}, headers=headers
    )
    httpx.post(f"{server}/v1/score", json=body(synthetic_traces[5]))
    exported = {
        sample.name
        for family in text_string_to_metric_families(httpx.get(f"{server}/metrics").text)
        for sample in family.samples
    }
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b(routescan_[a-z_]+)\b", target["expr"])
    }
    assert len(dashboard["panels"]) >= 8 and used, "the dashboard charts nothing"
    assert used <= exported, f"the dashboard reads series the daemon never exports: {sorted(used - exported)}"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("requests", "flagged", "score distribution", "latency", "store", "alerts", "agents"):
        assert topic in titles, topic


def test_a_replayed_batch_records_only_what_the_store_does_not_hold(server, synthetic_traces) -> None:
    first = {"items": [body(t) for t in synthetic_traces[:3]]}
    assert httpx.post(f"{server}/v1/score/batch", json=first).status_code == 200
    # the agent replays a spooled batch whose first attempt may have reached the store: the three
    # recorded traces are answered again but not recorded twice; the new one is recorded
    replay = {"items": [body(t) for t in synthetic_traces[:4]]}
    r = httpx.post(f"{server}/v1/score/batch", json=replay, headers={"x-routescan-replay": "1"})
    assert r.status_code == 200 and len(r.json()["results"]) == 4
    ids = [a["trace_id"] for a in httpx.get(f"{server}/v1/audits", params={"limit": 100}).json()["items"]]
    assert sorted(ids) == sorted(t.trace_id for t in synthetic_traces[:4])
    # without the replay mark a repeated id is a new request with the same id, recorded again
    assert httpx.post(f"{server}/v1/score/batch", json=first).status_code == 200
    ids = [a["trace_id"] for a in httpx.get(f"{server}/v1/audits", params={"limit": 100}).json()["items"]]
    assert len(ids) == 7
