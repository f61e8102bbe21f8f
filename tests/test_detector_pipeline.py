"""Corpus recipe -> collect -> train -> evaluate, end to end on a tiny model and a synthetic corpus
(planted tokens stand in for harm; no real prompt is used or printed)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from routescan.cli.main import app
from routescan.corpus.builder import CorpusConfig, build_corpus, summarize
from routescan.detector.artifact import Detector, DetectorMismatch
from routescan.detector.dataset import LabelledSet
from routescan.detector.exporter import Exporter
from routescan.detector.protocols import family_folds, hard_negative_folds, lodo_folds, source_folds
from routescan.detector.scoring import Scorer
from routescan.telemetry.io import read_traces, write_traces
from routescan.telemetry.schema import Unit

WORDS = ("the a of to and in is for on with as by at from about please tell me how what").split()  # noqa: SIM905
PLANTS = {"alpha": "QQX VVK", "beta": "QQX ZZJ", "gamma": "QQX KKW"}
runner = CliRunner()


def _sentence(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpora")
    rng = np.random.default_rng(0)
    with (root / "harmful.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "source", "source_category", "domain", "duplicate_of_earlier", "source_file"])
        for i in range(150):
            domain = ["alpha", "beta", "gamma"][i % 3]
            w.writerow(
                [f"{_sentence(rng, 4)} {PLANTS[domain]} {_sentence(rng, 5)}", "synth", "", domain, 0, "x"]
            )
        w.writerow(["QQX VVK duplicate", "synth", "", "alpha", 1, "x"])  # dropped by de-duplication
        for _ in range(12):
            w.writerow([f"{_sentence(rng, 6)} QQX", "synth", "", "", 0, "x"])  # unmapped
    with (root / "benign.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "source", "subtype", "hard_negative", "duplicate_of_earlier", "source_file"])
        for i in range(320):
            split = ["val", "test", "train"][i % 3]
            w.writerow(
                [
                    _sentence(rng, int(rng.integers(5, 14))),
                    "alpaca",
                    "",
                    0,
                    0,
                    f"alpaca/harmless_{split}.json",
                ]
            )
        for _ in range(10):
            w.writerow([f"{_sentence(rng, 5)} VVK", "xstest", "", 1, 0, "xstest"])
    # a second world: "real users" of both labels, and over-refusal look-alikes (some hard negatives)
    (root / "extra").mkdir()
    with (root / "extra" / "mix.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "source", "subtype", "label", "hard_negative", "source_file"])
        for i in range(40):
            harmful = i % 3 == 0
            text = f"{_sentence(rng, 7)} {'QQX KKW ' if harmful else ''}{_sentence(rng, 3)}"
            w.writerow([text, "toxicchat", "", int(harmful), 0, "x"])
        for i in range(20):
            w.writerow(
                [f"{_sentence(rng, 6)} ZZJ {_sentence(rng, 2)}", "coconot_contrast", "", 0, int(i < 10), "x"]
            )
    with (root / "wrappers.jsonl").open("w") as fh:
        for i, fam in enumerate(["autodan", "in_the_wild", "prefix_injection", "style_injection"]):
            fh.write(
                json.dumps(
                    {"id": f"src/t{i}+v", "family": fam, "template": f"{{braces}} {fam} says: {{query}} ok"}
                )
                + "\n"
            )
    return root


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "c.yaml"
    path.write_text(
        "name: synth\nbenign: {count: 160}\n"
        "wrapping: {harmful_per_family: 12, benign_per_family: 12}\nseed: 0\n"
        "extra_sources: [{format: unified, path: extra/mix.csv, domain: unmapped}]\n"
    )
    return path


def test_corpus_builder_rules(corpora: Path, recipe: Path) -> None:
    examples = build_corpus(corpora, CorpusConfig.from_yaml(recipe))
    counts = summarize(examples)
    # the extra world: 14 harmful and 26 benign "users", 10 look-alikes and 10 hard negatives
    assert counts["harmful_plain"] == 162 + 14 and counts["benign_plain"] == 160 + 36
    assert counts["hard_negatives"] == 20
    # the DAN-like families are one super-family; benign requests are wrapped too
    assert counts["wrapped_by_family"] == {
        "dan_like": {"harmful": 12, "benign": 12},
        "prefix_injection": {"harmful": 12, "benign": 12},
        "style_injection": {"harmful": 12, "benign": 12},
    }
    plain_benign = {e.id for e in examples if e.label == 0 and e.family == "none"}
    wrapped_benign_bases = {e.base for e in examples if e.label == 0 and e.family != "none"}
    assert not plain_benign & wrapped_benign_bases  # wrapped benign come from a disjoint pool
    wrapped = next(e for e in examples if e.family == "prefix_injection")
    assert "{braces}" in wrapped.text and "{query}" not in wrapped.text  # plain replace, not format
    assert all(len(e.labels()) == 7 for e in examples)
    # seeded: the same recipe gives the same corpus
    assert [e.id for e in build_corpus(corpora, CorpusConfig.from_yaml(recipe))] == [e.id for e in examples]


@pytest.fixture(scope="module")
def collected(corpora: Path, recipe: Path, tmp_path_factory) -> Path:
    """One collection of the synthetic corpus (routed counts), shared by the tests below."""
    out = tmp_path_factory.mktemp("traces") / "t.jsonl"
    args = ["collect", "--tiny", "mixtral", "--corpus", str(recipe), "--corpora", str(corpora)]
    args += ["--out", str(out), "--batch-size", "16", "--window", "8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def test_collect_train_evaluate(collected, corpora: Path, recipe: Path, tmp_path: Path) -> None:
    hf = collected

    traces = list(read_traces(hf))
    assert len(traces) == 176 + 196 + 20 + 72
    # windows of 8 prompt tokens on every longer prompt, summing to the request's counts
    long = [t for t in traces if t.prompt_tokens > 8]
    assert long and all(t.windows is not None and t.windows.tokens == 8 for t in long)
    assert all(t.windows is None for t in traces if t.prompt_tokens <= 8)
    assert all(not any(w in t.model_dump_json() for w in ("QQX", "please tell")) for t in traces)
    # the manifest says which source rows the corpus used, per trace id, and holds no text
    manifest_file = hf.with_name("t.manifest.json")
    manifest = json.loads(manifest_file.read_text())
    entries = {e["id"]: e for e in manifest["examples"]}
    assert set(entries) == {t.trace_id for t in traces}
    assert all(e["file"] and e["row"] is not None for e in entries.values())
    benign_rows = {e["row"] for e in entries.values() if e["file"] == "benign.csv" and e["family"] == "none"}
    assert benign_rows, "the benign rows used are listed"
    assert "QQX" not in manifest_file.read_text() and "please tell" not in manifest_file.read_text()

    data = LabelledSet.from_traces(traces)
    folds = lodo_folds(data, min_size=40) + family_folds(data)
    assert [f.held_out for f in folds] == [
        "alpha",
        "beta",
        "gamma",
        "dan_like",
        "prefix_injection",
        "style_injection",
    ]
    for f in folds:
        assert not set(data.base[f.train]) & set(data.base[f.test])  # no request on both sides
        assert not data.hard_negative[f.train].any()
        if f.protocol == "lodo":
            assert f.held_out not in set(data.domain[f.train])
    (users,) = source_folds(data)
    assert users.held_out == "toxicchat" and set(data.source[users.test]) == {"toxicchat"}
    assert "toxicchat" not in set(data.source[users.train]) and not data.hard_negative[users.train].any()
    assert not set(users.calibration) & set(users.train) and not set(users.calibration) & set(users.test)
    hard = {f.held_out: f for f in hard_negative_folds(data)}
    assert set(hard) == {
        "coconot (trained)",
        "coconot (none trained)",
        "xstest+jbb_benign (trained)",
        "xstest+jbb_benign (none trained)",
    }
    for name, f in hard.items():
        held = "coconot_contrast" if name.startswith("coconot") else "xstest"
        assert set(data.source[f.test]) == {held} and data.hard_negative[f.test].all()
        assert held not in set(data.source[f.train])  # the held-out source trains on nothing
        assert data.hard_negative[f.train].any() == name.endswith("(trained)")
    # window fingerprints: one per window, and the window-max record has the fingerprint's width
    n_windows = [len(w) for w in data.windows]
    assert sum(n_windows) == sum(len(t.windows.counts) for t in long)
    assert data.window_max().shape == data.X.shape

    det = tmp_path / "d.zip"
    result = runner.invoke(app, ["train", str(hf), "-l", "hf-eager", "-o", str(det)])
    assert result.exit_code == 0, result.output
    detector = Detector.load(det)
    assert detector.spec.launch_model == "hf-eager"
    assert [p.name for p in detector.card.operating_points] == ["fpr1", "fpr5"]
    probs = detector.predict_proba(detector.spec.transform_many(traces[:5]))
    assert np.all((probs >= 0) & (probs <= 1))
    assert detector.card.score_bins and detector.export.level == "full"
    # a detector of a reduced level: its card holds the projection, and it scores only that level
    harm = tmp_path / "harm.zip"
    result = runner.invoke(app, ["train", str(hf), "-l", "hf-eager", "--method", "logreg",
                                 "--export-level", "harm", "-o", str(harm)])  # fmt: skip
    assert result.exit_code == 0, result.output
    harm_detector = Detector.load(harm)
    assert harm_detector.export.level == "harm" and len(harm_detector.export.directions) == 8
    assert harm_detector.card.score_bins is None
    records = Exporter("harm", harm_detector).records(traces[:5])
    scorer = Scorer(harm_detector, harm_detector.card.operating_point())
    assert all(0 <= s.score <= 1 for s in scorer.score(records))
    with pytest.raises(DetectorMismatch, match="'harm' records only"):
        scorer.score(traces[:1])
    # a detector refuses traces measured under another signal (a kernel collector's threads)
    measured = tmp_path / "cupti.jsonl"
    write_traces(
        measured, [t.model_copy(update={"source": "cupti", "unit": Unit.threads}) for t in traces[:3]]
    )
    result = runner.invoke(
        app,
        ["score", str(measured), "--detector", str(det), "-o", str(tmp_path / "s.jsonl"), "--on-bad", "fail"],
    )
    assert result.exit_code == 2 and "cannot give the spec's signal 'hf-eager'" in " ".join(
        result.output.split()
    )

    report = tmp_path / "report" / "results.md"
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(hf),
            "-l",
            "hf-eager",
            "-l",
            "vllm-fused-moe",
            "--corpus",
            str(recipe),
            "--corpora",
            str(corpora),
            "-o",
            str(report),
            "--bootstrap",
            "50",
        ],
    )
    assert result.exit_code == 0, result.output
    body = json.loads(report.with_suffix(".json").read_text())
    lodo = body["sources"]["hf-eager"]["invariant"]["lodo"]
    assert set(lodo["folds"]) == {"alpha", "beta", "gamma"}
    assert set(body["shared"]) == {"length", "tfidf", "minilm"}
    # unseen real users: scored whole, with rates at thresholds set on the training world
    users = body["sources"]["hf-eager"]["logreg"]["source"]["folds"]["toxicchat"]
    assert users["n_harmful"] == 14 and users["n_benign"] == 26
    assert 0 <= users["benign_fpr@1%"] <= 1 and 0 <= users["auprc"] <= 1
    hn = body["sources"]["hf-eager"]["logreg"]["hard_negative"]["folds"]
    assert hn["coconot (trained)"]["n_benign"] == 10 and "auroc_vs_harmful" in hn["coconot (trained)"]
    # the content baselines read the planted tokens; the sentence model is a real one
    assert body["shared"]["minilm"]["lodo"]["summary"]["mean_auroc"] > 0.8
    assert body["shared"]["tfidf"]["source"]["folds"]["toxicchat"]["auroc"] > 0.8
    win = body["windows"]
    assert set(win["wrapper"]["folds"]) == {"dan_like", "prefix_injection", "style_injection"}
    assert set(win["wrapper"]["summary"]) == {"request", "max", "record"}
    assert set(body["sources"]["vllm-fused-moe"]) == {"invariant", "logreg", "gbm", "volume"}
    # vLLM's fused kernel launches per layer, never per expert: the fingerprint is empty there and
    # only the launch volume (a function of prompt length) is left to read
    vllm_lodo = body["sources"]["vllm-fused-moe"]["invariant"]["lodo"]["summary"]["mean_auroc"]
    assert vllm_lodo == pytest.approx(0.5)
    vol = body["sources"]["vllm-fused-moe"]["volume"]["lodo"]["summary"]["mean_auroc"]
    length = body["shared"]["length"]["lodo"]["summary"]["mean_auroc"]
    assert abs(vol - length) < 0.1
    # the planted tokens make the text baseline near perfect: the harness measures what it should
    assert body["shared"]["tfidf"]["lodo"]["summary"]["mean_auroc"] > 0.9
    assert (report.parent / "figures" / "results-roc-hf-eager.png").stat().st_size > 1000
    assert (report.parent / "figures" / "results-scores-hf-eager.png").stat().st_size > 1000
    text = report.read_text()
    assert "leave-one-domain-out" in text and "QQX" not in text
    assert "## Goals" in text and "window pooling" in text and "text: minilm" in text
    # a hand-written reading below the marker survives a rerun; the tables are regenerated
    from routescan.cli.evaluate import HAND_WRITTEN

    report.write_text(text + f"\n{HAND_WRITTEN}\n\n## Reading\n\nkept words\n")
    args = ["evaluate", str(hf), "-l", "hf-eager", "--methods", "volume", "--baselines", "length"]
    result = runner.invoke(app, [*args, "--no-windows", "-o", str(report), "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    again = report.read_text()
    assert again.count(HAND_WRITTEN) == 1 and again.endswith("kept words\n")
    assert "| hf-eager | volume |" in again and "| hf-eager | logreg |" not in again


def test_invert_attacks_run_and_text_beats_fingerprints(
    collected, corpora: Path, recipe: Path, tmp_path
) -> None:
    hf = collected
    out = tmp_path / "privacy.md"
    args = ["invert", str(hf), "--corpus", str(recipe), "--corpora", str(corpora), "-o", str(out)]
    result = runner.invoke(app, [*args, "--top-n", "20", "--pools", "50"])
    assert result.exit_code == 0, result.output
    body = json.loads(out.with_suffix(".json").read_text())
    w = body["word_recovery"]
    # given the text, the same attackers recover the words: the harness can tell leaky from not
    best = {
        rep: max(w[f"{rep} / {a}"]["f1"] for a in ("knn", "mlp", "linear"))
        for rep in ("text (tf-idf)", "fingerprint")
    }
    # the text holds the answer, and the linear attacker reads it off
    assert w["text (tf-idf) / linear"]["f1"] > 0.9, w
    assert best["text (tf-idf)"] > best["fingerprint"] + 0.05, w
    assert best["text (tf-idf)"] > w["frequent-words baseline"]["f1"] + 0.1, w
    # a fingerprint is a deterministic function of the prompt: a dictionary attacker finds exact guesses
    assert body["retrieval"]["50"]["model_access_top1"] > 0.5
    assert body["revealed"]["length"]["mae_tokens"] >= 0
    assert "QQX" not in out.read_text() and "qqx" not in out.read_text()


def test_frontier_measures_levels_against_full(collected, corpora: Path, recipe: Path, tmp_path) -> None:
    out = tmp_path / "privacy.md"
    out.write_text("# Privacy\n\nhand-written text stays\n")
    args = ["frontier", str(collected), "--corpus", str(recipe), "--corpora", str(corpora), "-o", str(out)]
    args += ["--top-n", "20", "--pools", "50", "--levels", "score-q4,score-q8-eps2"]
    for _ in range(2):  # a rerun replaces its section, never duplicates it
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.startswith("# Privacy\n\nhand-written text stays") and text.count("## The frontier") == 1
    assert (tmp_path / "figures" / "privacy-frontier.png").stat().st_size > 0
    body = json.loads((tmp_path / "privacy-frontier.json").read_text())
    rows = {r["name"]: r for r in body["rows"]}
    assert list(rows) == ["full", "score-q4", "score-q8-eps2"]  # full is always the reference
    full, coarse, noisy = (rows[n]["leakage"] for n in rows)
    # the full fingerprint is a dictionary attacker's exact match; a few bins cannot be
    assert full["retrieval"]["50"]["model_access_top1"] > 0.5
    assert coarse["dim"] == 1 and coarse["distinct_records"] <= 6  # 4 quantile bins + 2 thresholds
    assert coarse["retrieval"]["50"]["model_access_top1"] < 0.25
    assert noisy["privacy"] == {"epsilon": 2.0, "delta": 0.0}
    assert 0.0 <= body["label_floor"]["word_f1"] <= 1.0
    for row in rows.values():
        assert 0.0 <= row["summary"]["lodo_auroc"] <= 1.0 and set(row["goal"]) == set(body["goal"])
    assert "QQX" not in text and "qqx" not in text
