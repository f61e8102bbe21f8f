"""`routescan score`: offline scoring with summary, operating points, bad rows and pipeline exit codes."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from routescan.cli.main import app
from routescan.telemetry.io import write_traces

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result, result.stdout + (result.stderr or "")


def test_score_file(tmp_path, test_detector, synthetic_traces) -> None:
    det = test_detector.save(tmp_path / "det.zip")
    traces = tmp_path / "t.jsonl"
    write_traces(traces, synthetic_traces)
    with traces.open("a") as fh:
        fh.write('{"trace_id": "broken"}\n')
        bad = json.loads(synthetic_traces[0].model_dump_json())
        bad["prompt"] = "some hidden words"
        fh.write(json.dumps(bad) + "\n")
    out = tmp_path / "scores.jsonl"
    result, text = run("score", traces, "--detector", det, "--out", out, "--label-column", "label")
    assert result.exit_code == 0, text
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["scored"] == len(synthetic_traces) and summary["skipped"] == 2
    assert f"row {len(synthetic_traces) + 1}" in text and f"row {len(synthetic_traces) + 2}" in text
    assert "some hidden words" not in text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["trace_id"] for r in rows] == [t.trace_id for t in synthetic_traces]
    assert all(set(r) == {"row", "trace_id", "model_id", "score", "label"} for r in rows)
    expected = test_detector.predict_proba(test_detector.spec.transform_many(synthetic_traces))
    assert [r["score"] for r in rows] == [float(x) for x in expected]
    # the toy corpus is separable: the flagged group is mostly label 1
    flagged_pos = sum(
        r["label"] == "flagged" for r, t in zip(rows, synthetic_traces, strict=True) if t.labels["label"]
    )
    assert flagged_pos > len(synthetic_traces) // 4

    result, text = run("score", traces, "--detector", det, "--out", out, "--on-bad", "fail")
    assert result.exit_code == 2 and f"row {len(synthetic_traces) + 1}" in text

    write_traces(traces, synthetic_traces)
    result, _ = run("score", traces, "--detector", det, "--out", out, "--threshold", "0", "--fail-on-flag")
    assert result.exit_code == 3
    result, _ = run(
        "score",
        traces,
        "--detector",
        det,
        "--out",
        tmp_path / "s.csv",
        "--threshold",
        "1.01",
        "--fail-on-flag",
    )
    assert result.exit_code == 0
    assert (tmp_path / "s.csv").read_text().startswith("row,trace_id,model_id,score,label\n")
    result, text = run("score", traces, "--detector", det, "--out", out, "--fpr", "0.01")
    assert result.exit_code == 0 and '"operating_point": "fpr1"' in result.stdout
    result, text = run("score", traces, "--detector", det, "--out", out, "--fpr", "0.02")
    assert result.exit_code == 2 and "no operating point at FPR 0.02" in text


def test_score_refuses_traces_of_another_model(tmp_path, test_detector, tiny, launch_models) -> None:
    from routescan.telemetry.emulated import EmulatedCollector, Request

    det = test_detector.save(tmp_path / "det.zip")
    other = [
        t["hf-eager"]
        for _, t in EmulatedCollector(tiny("olmoe"), [launch_models["hf-eager"]]).collect(
            [Request("o-1", "hello"), Request("o-2", "bye")]
        )
    ]
    traces = tmp_path / "o.parquet"
    write_traces(traces, other)
    result, text = run("score", traces, "--detector", det, "--out", tmp_path / "s.jsonl", "--on-bad", "fail")
    assert result.exit_code == 2 and "cannot score it" in " ".join(text.split())


def test_untrusted_detector_file_is_refused(tmp_path, test_detector) -> None:
    import types
    import zipfile

    import skops.io as sio

    from routescan.detector.artifact import Detector, DetectorError

    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("card.json", test_detector.card.model_dump_json())
        zf.writestr("estimator.skops", sio.dumps(types.SimpleNamespace(payload=1)))
    try:
        Detector.load(path)
    except DetectorError as exc:
        assert "allowlist" in str(exc)
    else:
        raise AssertionError("a detector with types outside the allowlist was loaded")
    round_trip = Detector.load(test_detector.save(tmp_path / "ok.zip"))
    assert round_trip.card == test_detector.card


def test_linear_fast_path_matches_sklearn(test_detector, synthetic_traces) -> None:
    import numpy as np

    X = test_detector.spec.transform_many(synthetic_traces)
    assert test_detector._linear is not None
    fast = test_detector.predict_proba(X)
    slow = test_detector.estimator.predict_proba(X)[:, 1]
    np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-12)
