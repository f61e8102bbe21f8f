"""Export levels end to end: the daemon scores only its own level (409 otherwise), refuses full
records from peers off the host (403) unless told otherwise, the agent sends the level it is set to,
and the audit trail never holds a fingerprint."""

from __future__ import annotations

import sqlite3
import time

import httpx
import numpy as np
import pytest
from servers import own_address, score_body, service_settings, uvicorn_thread

from routescan.agent import TraceSender, exporter_from_settings
from routescan.agent.settings import AgentSettings
from routescan.detector.exporter import Exporter
from routescan.service.app import create_app
from routescan.telemetry.schema import ExportLevel


def _fp_body(fp) -> dict:
    return {"fingerprint": fp.model_dump(mode="json", exclude_none=True)}


def test_settings_choose_full_locally_and_score_beyond(tmp_path) -> None:
    local = service_settings(tmp_path)
    assert local.resolved_export_level() == ExportLevel.full
    sock = service_settings(tmp_path, host="0.0.0.0", uds=tmp_path / "s.sock")
    assert sock.resolved_export_level() == ExportLevel.full
    network = service_settings(tmp_path, host="0.0.0.0", api_token="t")
    assert network.resolved_export_level() == ExportLevel.score
    allowed = service_settings(tmp_path, host="0.0.0.0", api_token="t", allow_full_from_network=True)
    assert allowed.resolved_export_level() == ExportLevel.full
    # a detector trained on a reduced level is served at that level
    assert local.resolved_export_level(ExportLevel.harm) == ExportLevel.harm


def test_score_level_daemon_takes_only_its_bins(tmp_path, test_detector, synthetic_traces) -> None:
    app = create_app(service_settings(tmp_path, export_level="score"), detector=test_detector)
    exporter = Exporter("score", test_detector)
    traces = synthetic_traces[:40]
    records = exporter.records(traces)
    full = test_detector.full_proba(test_detector.spec.transform_many(traces))
    with uvicorn_thread(app) as base:
        info = httpx.get(f"{base}/v1/detector").json()
        assert info["export"]["level"] == "score" and info["export_values"] == 1
        # a trace is the full level: refused by level, as another model's trace is
        r = httpx.post(f"{base}/v1/score", json=score_body(traces[0]))
        assert r.status_code == 409 and "'score' records only" in r.json()["detail"]
        labels = []
        for rec, p in zip(records, full, strict=True):
            assert rec.export_level == ExportLevel.score and len(rec.values) == 1
            r = httpx.post(f"{base}/v1/score", json=_fp_body(rec))
            assert r.status_code == 200, r.text
            out = r.json()
            # the score is the bin; the verdict is exactly the full detector's (thresholds are edges)
            assert out["score"] == rec.values[0] <= p
            labels.append(out["label"] == "flagged")
            assert labels[-1] == (p >= out["threshold"])
        # a value between the bins would carry more than the level allows
        odd = records[0].model_copy(update={"values": [0.123456]})
        r = httpx.post(f"{base}/v1/score", json=_fp_body(odd))
        assert r.status_code == 409 and "score bins" in r.json()["detail"]
        # a full fingerprint is another level
        full_fp = Exporter("full", test_detector).records(traces[:1])[0]
        assert httpx.post(f"{base}/v1/score", json=_fp_body(full_fp)).status_code == 409


@pytest.mark.skipif(own_address() is None, reason="this host has no non-loopback address")
def test_full_records_from_another_host_are_refused_unless_allowed(
    tmp_path, test_detector, synthetic_traces
) -> None:
    host = own_address()
    trace = synthetic_traces[0]
    # full level on purpose (an operator who set export_level: full on a network bind)
    strict = service_settings(tmp_path, host=host, api_token="t", export_level="full")
    auth = {"authorization": "Bearer t"}
    with uvicorn_thread(create_app(strict, detector=test_detector), host=host) as base:
        r = httpx.post(f"{base}/v1/score", json=score_body(trace), headers=auth)
        assert r.status_code == 403 and "allow_full_from_network" in r.json()["detail"]
        batch = {"items": [score_body(t) for t in synthetic_traces[:2]]}
        r = httpx.post(f"{base}/v1/score/batch", json=batch, headers=auth)
        assert r.status_code == 403 and "item 0" in r.json()["detail"]
        assert httpx.get(f"{base}/v1/audits", headers=auth).json()["items"] == []  # nothing recorded
    allowed = service_settings(
        tmp_path / "b", host=host, api_token="t", export_level="full", allow_full_from_network=True
    )
    with uvicorn_thread(create_app(allowed, detector=test_detector), host=host) as base:
        assert httpx.post(f"{base}/v1/score", json=score_body(trace), headers=auth).status_code == 200
    # the same daemon's loopback peers may send full records: they are on this host
    with uvicorn_thread(create_app(strict.model_copy(), detector=test_detector)) as base:
        assert httpx.post(f"{base}/v1/score", json=score_body(trace), headers=auth).status_code == 200


def test_agent_sends_its_export_level_and_spools_it(tmp_path, test_detector, synthetic_traces) -> None:
    path = tmp_path / "det.zip"
    test_detector.save(path)
    settings = AgentSettings(export_level="score", detector=str(path), spool=tmp_path / "spool.jsonl")
    exporter = exporter_from_settings(settings)
    assert exporter is not None and exporter.level == ExportLevel.score
    app = create_app(service_settings(tmp_path, export_level="score"), detector=test_detector)
    traces = synthetic_traces[:12]
    # first with the daemon down: the spool holds score records, never traces
    port_down = f"http://127.0.0.1:{_closed_port()}"
    sender = TraceSender(port_down, spool=settings.spool, exporter=exporter, retry_interval_s=0.05)
    for t in traces[:6]:
        sender.submit(t)
    sender.close()
    spooled = settings.spool.read_text().splitlines()
    assert len(spooled) == 6 and all('"export_level":"score"' in line for line in spooled)
    assert not any('"counts"' in line for line in spooled)
    with uvicorn_thread(app) as base:
        sender = TraceSender(base, spool=settings.spool, exporter=exporter, retry_interval_s=0.05)
        for t in traces[6:]:
            sender.submit(t)
        deadline = time.monotonic() + 30
        while (sender.counters.sent < 6 or sender.counters.replayed < 6) and time.monotonic() < deadline:
            time.sleep(0.05)
        sender.close()
        assert sender.counters.sent == 6 and sender.counters.replayed == 6, sender.counters.as_dict()
        ids = {a["trace_id"] for a in httpx.get(f"{base}/v1/audits", params={"limit": 100}).json()["items"]}
    assert ids == {t.trace_id for t in traces}


def _closed_port() -> int:
    from servers import free_port

    return free_port()  # nothing listens there once the probe socket is closed


def _stored_cells_sqlite(db) -> list[object]:
    con = sqlite3.connect(db)
    try:
        tables = [r[0] for r in con.execute("select name from sqlite_master where type='table'")]
        # table names come from sqlite_master itself
        return [c for t in tables for row in con.execute(f"select * from {t}").fetchall() for c in row]
    finally:
        con.close()


def _stored_cells_postgres(url: str) -> list[object]:
    import psycopg

    with psycopg.connect(url) as con:
        tables = [
            r[0]
            for r in con.execute(
                "select tablename from pg_tables where schemaname = current_schema()"
            ).fetchall()
        ]
        return [c for t in tables for row in con.execute(f'select * from "{t}"').fetchall() for c in row]


def _assert_no_fingerprint(cells: list[object], fps, scores: set[float]) -> None:
    assert cells
    values = {round(v, 12) for fp in fps for v in fp.values if v not in (0.0, 1.0)} - scores
    floats = {round(float(c), 12) for c in cells if isinstance(c, float)}
    assert not floats & values  # no fingerprint value is stored, only scores
    assert not any(isinstance(c, (str, bytes)) and len(c) > 200 for c in cells)  # no serialised vectors
    assert not any(isinstance(c, (list, tuple, dict)) for c in cells)
    assert not any(isinstance(c, str) and ("[" in c or "values" in c) for c in cells)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_audit_trail_never_holds_a_fingerprint(
    backend, tmp_path, test_detector, synthetic_traces, request
) -> None:
    """Every column of every table of the audit store, after scoring traces and full fingerprints:
    ids, scores and detector names only; no value of any fingerprint is there."""
    kw = {"audit_store": request.getfixturevalue("pg_url")} if backend == "postgres" else {}
    app = create_app(service_settings(tmp_path, **kw), detector=test_detector)
    traces = synthetic_traces[:10]
    fps = Exporter("full", test_detector).records(traces)
    with uvicorn_thread(app) as base:
        for t, fp in zip(traces, fps, strict=True):
            assert httpx.post(f"{base}/v1/score", json=score_body(t)).status_code == 200
            assert httpx.post(f"{base}/v1/score", json=_fp_body(fp)).status_code == 200
    if backend == "postgres":
        cells = _stored_cells_postgres(kw["audit_store"])
    else:
        cells = _stored_cells_sqlite(tmp_path / "audit.sqlite3")
    X = test_detector.spec.transform_many(traces)
    scores = {round(float(s), 12) for s in test_detector.predict_proba(X)}
    assert {round(float(c), 12) for c in cells if isinstance(c, float)} & scores  # the scores are there
    _assert_no_fingerprint(cells, fps, scores)


def test_featurize_writes_a_reduced_level_with_its_parameters(
    tmp_path, test_detector, synthetic_traces
) -> None:
    import json

    from typer.testing import CliRunner

    from routescan.cli.main import app
    from routescan.telemetry.io import trace_json

    traces_file = tmp_path / "t.jsonl"
    traces_file.write_text("".join(trace_json(t) + "\n" for t in synthetic_traces[:20]))
    det = tmp_path / "det.zip"
    test_detector.save(det)
    out = tmp_path / "score.jsonl"
    args = ["featurize", str(traces_file), "-o", str(out), "--export-level", "score", "--detector", str(det)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    header, *lines = out.read_text().splitlines()
    export = json.loads(header)["export"]
    assert export["level"] == "score" and export["edges"]
    records = [json.loads(line) for line in lines]
    assert len(records) == 20 and all(r["export_level"] == "score" for r in records)
    assert all(len(r["values"]) == 1 and r["values"][0] in [0.0, *export["edges"]] for r in records)
    # a reduced level needs the detector that computes it, and is JSONL only
    result = CliRunner().invoke(app, ["featurize", str(traces_file), "-o", str(tmp_path / "x.parquet"),
                                      "--export-level", "layers"])  # fmt: skip
    assert result.exit_code != 0 and ".jsonl" in result.output


def test_score_bins_are_fitted_quantiles_and_the_daemon_uses_them(
    tmp_path, test_detector, synthetic_traces
) -> None:
    import json

    from typer.testing import CliRunner

    from routescan.cli.main import app
    from routescan.detector.artifact import Detector
    from routescan.telemetry.io import trace_json

    traces_file = tmp_path / "t.jsonl"
    traces_file.write_text("".join(trace_json(t) + "\n" for t in synthetic_traces))
    det = tmp_path / "det.zip"
    test_detector.save(det)
    out = tmp_path / "binned.zip"
    result = CliRunner().invoke(
        app, ["score-bins", str(det), str(traces_file), "-o", str(out), "--bins", "4"]
    )
    assert result.exit_code == 0, result.output
    binned = Detector.load(out)
    edges = binned.card.score_bins
    thresholds = {p.threshold for p in binned.card.operating_points if p.threshold > 0}
    assert edges == sorted(edges) and thresholds <= set(edges) and len(edges) <= 3 + len(thresholds)
    assert binned.at_level(ExportLevel.score).export.edges == edges
    # about a quarter of the traffic per quantile bin (environments weighted alike: here two)
    p = binned.full_proba(binned.spec.transform_many(synthetic_traces))
    assert json.loads(result.stdout.strip().splitlines()[-1])["bins"] == len(edges) + 1
    assert np.unique(np.searchsorted(edges, p, side="right")).size >= 3


def test_exporter_says_what_a_level_needs(test_detector) -> None:
    from routescan.detector.artifact import DetectorError

    with pytest.raises(DetectorError, match="computed from a detector"):
        Exporter("score")
    with pytest.raises(ValueError, match="score export level only"):
        Exporter("layers", test_detector, epsilon=1.0)
    with pytest.raises(DetectorError, match="trained on the 'harm' level"):
        Exporter("harm", test_detector)  # a full detector holds no projection
    noisy = Exporter("score", test_detector, epsilon=2.0)
    assert noisy.export.privacy() == {"epsilon": 2.0, "delta": 0.0}
