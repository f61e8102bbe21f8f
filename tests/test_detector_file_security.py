"""A detector file from elsewhere must not run code, exhaust memory, or load as something else."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from typer.testing import CliRunner

from routescan.cli.main import app
from routescan.detector.artifact import Detector, DetectorError
from routescan.telemetry.io import write_traces


def _evil_skops(function: str, argument: str) -> bytes:
    """A skops archive whose root node calls ``builtins.<function>(argument)`` when constructed
    (the ConstructorFromReduceNode loader calls the named type with the stored arguments)."""
    args = json.loads(_schema_of(sio.dumps((argument,))))
    schema = {
        "__class__": function,
        "__module__": "builtins",
        "__loader__": "ConstructorFromReduceNode",
        "content": {k: v for k, v in args.items() if k not in ("protocol", "_skops_version")},
        "__id__": 1,
        "protocol": args["protocol"],
        "_skops_version": args["_skops_version"],
    }
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("schema.json", json.dumps(schema))
    return out.getvalue()


def _schema_of(blob: bytes) -> str:
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        return zf.read("schema.json").decode()


def _detector_file(path: Path, card_json: str, estimator: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("card.json", card_json)
        zf.writestr("estimator.skops", estimator)
    return path


@pytest.mark.parametrize(
    ("function", "payload"),
    [
        ("eval", "__import__('pathlib').Path({marker!r}).write_text('pwned')"),
        ("exec", "__import__('pathlib').Path({marker!r}).write_text('pwned')"),
        ("getattr", "__import__"),
    ],
)
def test_a_detector_naming_builtins_is_refused_and_runs_nothing(
    tmp_path, test_detector, synthetic_traces, function: str, payload: str
) -> None:
    marker = tmp_path / "marker"
    blob = _evil_skops(function, payload.format(marker=str(marker)))
    assert f"builtins.{function}" in sio.get_untrusted_types(data=blob)
    path = _detector_file(tmp_path / "evil.zip", test_detector.card.model_dump_json(), blob)

    with pytest.raises(DetectorError, match="allowlist"):
        Detector.load(path)
    assert not marker.exists()

    traces = tmp_path / "t.jsonl"
    write_traces(traces, synthetic_traces[:2])
    runner = CliRunner()
    result = runner.invoke(
        app, ["score", str(traces), "--detector", str(path), "--out", str(tmp_path / "s.jsonl")]
    )
    assert result.exit_code == 2 and "allowlist" in result.output
    result = runner.invoke(
        app, ["serve", "--detector", str(path), "--db", str(tmp_path / "a.db"), "--port", "0"]
    )
    assert result.exit_code == 2 and "allowlist" in result.output
    assert not marker.exists(), "the payload ran"


def test_the_loaded_estimator_must_be_the_type_the_card_names(tmp_path, test_detector) -> None:
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression().fit(np.eye(4), [0, 1, 0, 1])
    card = test_detector.card.model_copy(update={"estimator_type": "sklearn.pipeline.Pipeline"})
    path = _detector_file(tmp_path / "swap.zip", card.model_dump_json(), sio.dumps(lr))
    with pytest.raises(DetectorError, match=r"card names sklearn\.pipeline\.Pipeline"):
        Detector.load(path)


def test_every_estimator_routescan_trains_loads(tmp_path, test_detector) -> None:
    """The exact allowlist covers what RouteScan itself writes (else it would refuse its own files)."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    from routescan.detector.invariant import InvariantRiskClassifier

    rng = np.random.default_rng(0)
    X, env = rng.normal(size=(120, 5)), rng.integers(0, 3, 120)
    y = (X[:, 0] > 0).astype(int)
    for est in (
        InvariantRiskClassifier().fit(X, y, env),
        HistGradientBoostingClassifier(max_iter=3).fit(X, y),
        CalibratedClassifierCV(LogisticRegression(), cv=2).fit(X, y),
    ):
        path = Detector(est, test_detector.card).save(tmp_path / f"{type(est).__name__}.zip")
        loaded = Detector.load(path)
        assert type(loaded.estimator) is type(est)
        np.testing.assert_allclose(loaded.estimator.predict_proba(X), est.predict_proba(X))


def test_a_non_zip_estimator_and_a_zip_bomb_are_refused_before_inflating(tmp_path, test_detector) -> None:
    card = test_detector.card.model_dump_json()
    path = _detector_file(tmp_path / "junk.zip", card, b"this is not a zip archive")
    with pytest.raises(DetectorError, match="not a RouteScan detector file"):
        Detector.load(path)

    bomb = io.BytesIO()
    with (
        zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf,
        zf.open("schema.json", "w", force_zip64=True) as member,
    ):
        for _ in range(300):  # 300 MiB of zeros, about 300 kB deflated
            member.write(b"\0" * (1 << 20))
    path = _detector_file(tmp_path / "bomb.zip", card, bomb.getvalue())
    with pytest.raises(DetectorError, match="cap"):
        Detector.load(path)

    big_card = tmp_path / "card-bomb.zip"
    with zipfile.ZipFile(big_card, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("card.json", b" " * (2 << 20))
        zf.writestr("estimator.skops", sio.dumps(test_detector.estimator))
    with pytest.raises(DetectorError, match=r"card\.json is .* over the"):
        Detector.load(big_card)


@pytest.mark.parametrize("method", ["logreg", "invariant"])
def test_every_detector_routescan_train_writes_loads_under_the_trusted_list(
    method: str, synthetic_traces, tmp_path: Path
) -> None:
    """TRUSTED_TYPES is exactly what RouteScan's own detectors need: each kind `routescan train`
    fits saves, loads back with no type outside the list, and scores as before (fast path too)."""
    from routescan.detector.artifact import TRUSTED_TYPES, DetectorCard
    from routescan.detector.dataset import LabelledSet
    from routescan.detector.train import fit_detector, operating_points

    traces = [
        t.model_copy(update={"labels": {**t.labels, "domain": f"d{i % 4}"}})
        for i, t in enumerate(synthetic_traces)
    ]
    data = LabelledSet.from_traces(traces, launch_model="hf-eager")
    fitted = fit_detector(data, method=method)
    card = DetectorCard(
        detector_id=f"t-{method}",
        version="1",
        spec=data.spec,
        operating_points=operating_points(fitted.oof_proba, data.y),
        default_operating_point="fpr5",
        estimator=fitted.description,
    )
    path = Detector(fitted.estimator, card).save(tmp_path / "d.zip")
    with zipfile.ZipFile(path) as zf:
        untrusted = set(sio.get_untrusted_types(data=zf.read("estimator.skops")))
    assert untrusted <= TRUSTED_TYPES, untrusted - TRUSTED_TYPES
    loaded = Detector.load(path)
    np.testing.assert_allclose(
        loaded.predict_proba(data.X), fitted.estimator.predict_proba(data.X)[:, 1], rtol=1e-9
    )
    assert loaded._linear is not None  # one sigmoid over a linear model: scored as a dot product
