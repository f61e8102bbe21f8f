"""`routescan score`: offline scoring with summary, operating points, bad rows and pipeline exit codes."""

from __future__ import annotations

import json

import pytest
from sklearn.metrics import roc_auc_score
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
    # the label column is 0 / 1, so the summary reports how the detector does on this file
    expected_auroc = roc_auc_score(
        [t.labels["label"] for t in synthetic_traces],
        test_detector.predict_proba(test_detector.spec.transform_many(synthetic_traces)),
    )
    assert summary["evaluation"]["auroc"] == pytest.approx(expected_auroc)
    assert {"auprc", "tpr@1%fpr", "tpr_at_operating_point", "fpr_at_operating_point"} <= set(
        summary["evaluation"]
    )
    assert f"row {len(synthetic_traces) + 1}" in text and f"row {len(synthetic_traces) + 2}" in text
    assert "some hidden words" not in text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["trace_id"] for r in rows] == [t.trace_id for t in synthetic_traces]
    assert all(set(r) == {"row", "trace_id", "model_id", "score", "verdict", "labels"} for r in rows)
    assert [r["labels"] for r in rows] == [t.labels for t in synthetic_traces], "the input's labels are kept"
    expected = test_detector.predict_proba(test_detector.spec.transform_many(synthetic_traces))
    assert [r["score"] for r in rows] == [float(x) for x in expected]
    # the toy corpus is separable: the flagged group is mostly label 1
    flagged_pos = sum(
        r["verdict"] == "flagged" for r, t in zip(rows, synthetic_traces, strict=True) if t.labels["label"]
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
        "1",
        "--fail-on-flag",
    )
    assert result.exit_code == 0
    assert (tmp_path / "s.csv").read_text().startswith("row,trace_id,model_id,score,verdict,labels.label\n")
    result, text = run("score", traces, "--detector", det, "--out", out, "--fpr", "0.01")
    assert result.exit_code == 0 and '"operating_point": "fpr1"' in result.stdout
    result, text = run("score", traces, "--detector", det, "--out", out, "--fpr", "0.02")
    assert result.exit_code == 2 and "no operating point at FPR 0.02" in text


def test_score_refuses_traces_of_another_model(tmp_path, test_detector, tiny, launch_models) -> None:
    from routescan.telemetry.emulated import EmulatedCollector, Request

    det = test_detector.save(tmp_path / "det.zip")
    other = [
        t
        for _, t in EmulatedCollector(tiny("olmoe")).collect([Request("o-1", "hello"), Request("o-2", "bye")])
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
    assert round_trip.card == test_detector.card.model_copy(
        update={"estimator_type": "sklearn.pipeline.Pipeline"}
    )


def test_linear_fast_path_matches_sklearn(test_detector, synthetic_traces) -> None:
    import numpy as np

    X = test_detector.spec.transform_many(synthetic_traces)
    assert test_detector._linear is not None
    fast = test_detector.predict_proba(X)
    slow = test_detector.estimator.predict_proba(X)[:, 1]
    np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-12)


def test_score_edge_cases_a_probe_found(tmp_path, test_detector, synthetic_traces) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    det = test_detector.save(tmp_path / "det.zip")
    out = tmp_path / "s.jsonl"
    good = [json.loads(t.model_dump_json(exclude_none=True)) for t in synthetic_traces[:4]]

    # every row skipped: a pipeline must not read that as "nothing flagged"
    bad_only = tmp_path / "bad.jsonl"
    bad_only.write_text('{"trace_id": "x"}\n{"trace_id": "y"}\n')
    result, text = run("score", bad_only, "--detector", det, "--out", out, "--fail-on-flag")
    assert result.exit_code == 2 and "no trace could be scored" in " ".join(text.split())

    # Latin-1 and binary rows are that row's problem; a byte-order mark is not a problem at all
    mixed = tmp_path / "mixed.jsonl"
    with mixed.open("wb") as fh:
        fh.write(b"\xef\xbb\xbf" + json.dumps(good[0]).encode() + b"\n")
        fh.write("caf\xe9 na\xefve\n".encode("latin-1"))
        fh.write(b"\x00\xff\xfe binary\n")
        fh.write(json.dumps(good[1]).encode() + b"\n")
    result, text = run("score", mixed, "--detector", det, "--out", out)
    assert result.exit_code == 0, text
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["scored"] == 2 and summary["skipped"] == 2
    assert "row 2" in text and "row 3" in text and "not UTF-8" in text

    # empty and all-zero traces carry no evidence; numbers as strings are not numbers
    empty = dict(good[0], counts=[[0] * n for n in good[0]["experts_per_layer"]])
    zeros = dict(good[1], unit="threads", source="hf-eager", counts=empty["counts"])
    stringly = dict(good[2], prompt_tokens="5")
    huge = dict(good[3], prompt_tokens=10**309)
    odd = tmp_path / "odd.jsonl"
    odd.write_text("\n".join(json.dumps(r) for r in (empty, zeros, stringly, huge, good[0])) + "\n")
    result, text = run("score", odd, "--detector", det, "--out", out, "--on-bad", "skip")
    assert result.exit_code == 0, text
    assert json.loads(result.stdout.strip().splitlines()[-1])["skipped"] == 4
    assert "nothing to score" in " ".join(text.split()) and "Traceback" not in text

    # a Parquet file that is not a trace file
    alien = tmp_path / "alien.parquet"
    pq.write_table(pa.table({"trace_id": ["a"], "model_id": ["m"]}), alien)
    result, text = run("score", alien, "--detector", det, "--out", out)
    assert result.exit_code == 2 and "missing" in text and "Traceback" not in text

    # thresholds are probabilities; the summary is always valid JSON
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps(good[0]) + "\n")
    for threshold in ("5", "nan", "-0.1"):
        result, text = run("score", ok, "--detector", det, "--out", out, "--threshold", threshold)
        assert result.exit_code == 2 and "between 0 and 1" in text, threshold
    result, _ = run("score", ok, "--detector", det, "--out", out, "--threshold", "0.5")
    json.loads(result.stdout.strip().splitlines()[-1])


def test_a_blank_token_is_a_configuration_error(tmp_path, monkeypatch) -> None:
    from routescan.service.settings import load_settings

    monkeypatch.setenv("ROUTESCAN_API_TOKEN", "   ")
    result, text = run("serve", "--db", tmp_path / "a.db", "--port", "0")
    assert result.exit_code == 2 and "blank" in text and "auth off" not in text
    monkeypatch.delenv("ROUTESCAN_API_TOKEN")
    empty = tmp_path / "token"
    empty.write_text("\n")
    result, text = run("serve", "--db", tmp_path / "a.db", "--token-file", empty)
    assert result.exit_code == 2 and "empty" in text
    empty.write_text("  real-token \n")
    assert load_settings(token_file=empty).token() == "real-token"


def test_settings_layers_yaml_env_and_flags(tmp_path, monkeypatch) -> None:
    from routescan.service.settings import load_settings

    config = tmp_path / "service.yaml"
    config.write_text(
        "service:\n  port: 9000\n  uds_mode: 0640\n  max_batch: 10\n  allowed_hosts: [audit.internal]\n"
    )
    s = load_settings(config)
    assert (s.port, s.uds_mode, s.max_batch) == (9000, 0o640, 10)
    monkeypatch.setenv("ROUTESCAN_UDS_MODE", "0600")
    monkeypatch.setenv("ROUTESCAN_PORT", "9001")
    s = load_settings(config, port=9002)
    assert (s.port, s.uds_mode) == (9002, 0o600)
    assert "audit.internal" in s.trusted_hosts()
    config.write_text("service:\n  colour: blue\n")
    try:
        load_settings(config)
    except ValueError as exc:
        assert "colour" in str(exc)
    else:
        raise AssertionError("an unknown setting was accepted")


def test_the_shipped_reference_detector_loads_by_name_and_refuses_another_model(
    tmp_path, synthetic_traces
) -> None:
    """The primary reference MoE's detector ships in the package; `--detector NAME` finds it, its
    card says what it was trained on, and it will not score a tiny model's traces."""
    from routescan.detector.artifact import Detector, detector_path, shipped_detectors

    name = "smollm2-e32k16-shared-router"
    assert name in shipped_detectors()
    det = Detector.load(detector_path(name))
    card = det.card
    assert not card.demo and card.spec.launch_model == "router"
    assert card.spec.model_id.startswith("smollm2-135m-instruct-e32k16-shared")
    assert card.default_operating_point == "fpr1"
    assert card.training["rows"] > 10_000 and "toxicchat:benign" in card.corpus["sources"]
    assert det._linear is not None  # scored as one dot product
    traces = tmp_path / "t.jsonl"
    write_traces(traces, synthetic_traces[:3])
    result, text = run("score", traces, "--detector", name, "--out", tmp_path / "s.jsonl", "--on-bad", "fail")
    assert result.exit_code == 2 and "cannot score" in " ".join(text.split()), text
