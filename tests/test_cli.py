"""The CLI end to end on tiny models: collect, featurize, inspect, errors, resume, and no text out."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_word_tokenizer
from typer.testing import CliRunner

from routescan.cli.main import app
from routescan.features.table import read_table
from routescan.models.tiny import build_tiny_moe
from routescan.telemetry.io import read_traces

runner = CliRunner()
CANARY = "zqxcanaryword"


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def prompts_csv(tmp_path: Path, n: int = 6) -> Path:
    rows = [
        {
            "prompt": f"Request number {i}: {CANARY} tell me about topic {i} please",
            "label": i % 2,
            "domain": ["privacy", "benign"][i % 2],
            "id": f"req-{i}",
        }
        for i in range(n)
    ]
    return write_csv(tmp_path / "prompts.csv", rows)


def run(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result, result.stdout + (result.stderr or "")


def test_collect_featurize_inspect_and_no_text_anywhere(tmp_path: Path) -> None:
    src = prompts_csv(tmp_path)
    out = tmp_path / "traces.jsonl"
    result, text = run(
        "collect",
        "--tiny",
        "qwen3_moe",
        "--prompts",
        src,
        "--out",
        out,
        "--label-column",
        "label",
        "--label-column",
        "domain",
        "--id-column",
        "id",
    )
    assert result.exit_code == 0, text
    # no terminal here (as in a log file): progress is a plain line with count, rate and time left
    assert re.search(r"collecting: \d+/\d+ \(100%\), [\d.,]+/min", text), text
    traces = list(read_traces(out))  # one file: every signal is derived from its counts
    assert [t.trace_id for t in traces] == [f"req-{i}" for i in range(6)]
    assert traces[1].labels == {"label": 1, "domain": "benign"} and traces[1].schema_version.endswith("/2")
    tables = {}
    printed = [text]
    for signal in ("hf-eager", "router", "vllm-fused-moe"):
        fp = tmp_path / f"fp.{signal}.parquet"
        result, text2 = run("featurize", out, "--out", fp, "-l", signal)
        assert result.exit_code == 0, text2
        printed.append(text2)
        tables[signal] = read_table(fp)
        assert tables[signal].spec.launch_model == signal
        assert tables[signal].X.shape == (6, tables[signal].spec.dim)
        assert tables[signal].labels["domain"][0] == "privacy"
    assert not (tables["hf-eager"].X == tables["router"].X).all()
    png = tmp_path / "heat.png"
    result, text3 = run("inspect", out, "--trace-id", "req-2", "--png", png)
    assert result.exit_code == 0, text3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result, text4 = run("inspect", out, "-l", "router", "--mean", "--png", tmp_path / "mean.png")
    assert result.exit_code == 0 and "mean of 6" in text4
    printed += [text3, text4]
    result, text5 = run("featurize", out, "--out", tmp_path / "x.parquet", "-l", "cuda-magic")
    assert result.exit_code == 2 and "unknown launch model 'cuda-magic'" in " ".join(text5.split())
    # The hard rule: no prompt text in any artefact or in anything printed.
    for path in [out, *tmp_path.glob("fp.*.parquet")]:
        assert CANARY.encode() not in path.read_bytes()
        assert b"tell me about topic" not in path.read_bytes()
    for words in printed:
        assert CANARY not in words


def test_parquet_output_and_resume_after_a_crash(tmp_path: Path) -> None:
    src = prompts_csv(tmp_path, n=7)
    out = tmp_path / "t.parquet"
    result, text = run("collect", "--tiny", "mixtral", "--prompts", src, "--out", out, "--limit", "3")
    assert result.exit_code == 0, text
    assert [t.row for t in read_traces(out)] == [0, 1, 2]
    assert not (tmp_path / "t.parquet.partial.jsonl").exists()
    result, text = run("collect", "--tiny", "mixtral", "--prompts", src, "--out", out)
    assert result.exit_code == 0, text
    assert "3 of 7 requests already collected" in text
    assert [t.row for t in read_traces(out)] == list(range(7))

    jsonl = tmp_path / "t.jsonl"
    run("collect", "--tiny", "mixtral", "--prompts", src, "--out", jsonl, "--limit", "4")
    data = jsonl.read_bytes()
    jsonl.write_bytes(data[: len(data) - 40])  # a write torn by a crash
    result, text = run("collect", "--tiny", "mixtral", "--prompts", src, "--out", jsonl)
    assert result.exit_code == 0, text
    assert "incomplete last line" in text
    assert [t.row for t in read_traces(jsonl)] == list(range(7))
    result, text = run(
        "collect", "--tiny", "mixtral", "--prompts", src, "--out", jsonl, "--overwrite", "--limit", "2"
    )
    assert [t.row for t in read_traces(jsonl)] == [0, 1]


def test_batch_size_does_not_change_the_output(tmp_path: Path) -> None:
    src = prompts_csv(tmp_path, n=5)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    run("collect", "--tiny", "deepseek_v2", "--prompts", src, "--out", a, "--batch-size", "5")
    run("collect", "--tiny", "deepseek_v2", "--prompts", src, "--out", b, "--batch-size", "1")
    assert a.read_bytes() == b.read_bytes() and a.stat().st_size > 0


@pytest.mark.parametrize(
    ("rows", "args", "message"),
    [
        ([{"text": "hello"}], [], "no column 'prompt'; the file has text"),
        ([{"prompt": "hello"}, {"prompt": "  "}], [], "row 1: empty prompt"),
        (
            [{"prompt": "hello", "cat": "a long free text value"}],
            ["--label-column", "cat"],
            "not a short token",
        ),
        ([{"prompt": "hello"}], ["--label-column", "prompt"], "cannot also be a label"),
        ([{"prompt": "hello"}], ["--tiny", "llama"], "no tiny config for 'llama'"),
        ([{"prompt": "hello"}], ["-l", "hf-eager"], "pass --launch-model to featurize"),
    ],
)
def test_clear_errors(tmp_path: Path, rows, args, message: str) -> None:
    src = write_csv(tmp_path / "p.csv", rows)
    result, text = run("collect", "--prompts", src, "--out", tmp_path / "o.jsonl", *args)
    assert result.exit_code == 2
    assert message in " ".join(text.split())
    assert "Traceback" not in text
    if len(rows[0]) > 1:
        assert "a long free text value" not in text


def test_skip_empty(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "p.csv", [{"prompt": "hello"}, {"prompt": ""}, {"prompt": "bye"}])
    result, text = run("collect", "--prompts", src, "--out", tmp_path / "o.jsonl", "--skip-empty")
    assert result.exit_code == 0, text
    assert [t.row for t in read_traces(tmp_path / "o.jsonl")] == [0, 2]


def test_model_directory_with_chat_template(tmp_path: Path) -> None:
    model_dir = tmp_path / "my-moe"
    model = build_tiny_moe("granitemoe", vocab_size=128, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model.save_pretrained(model_dir)
    save_word_tokenizer(model_dir)
    src = write_csv(tmp_path / "p.csv", [{"prompt": "hello tell me about topic"}, {"prompt": "bye"}])
    out_t, out_p = tmp_path / "tmpl.jsonl", tmp_path / "plain.jsonl"
    result, text = run("collect", "--model", model_dir, "--prompts", src, "--out", out_t)
    assert result.exit_code == 0, text
    result, text = run(
        "collect",
        "--model",
        model_dir,
        "--prompts",
        src,
        "--out",
        out_p,
        "--no-chat-template",
    )
    assert result.exit_code == 0, text
    templ, plain = list(read_traces(out_t)), list(read_traces(out_p))
    assert templ[0].model_id.endswith("my-moe")
    # the chat template wraps every request in the same fixed tokens
    extra = {t.prompt_tokens - p.prompt_tokens for t, p in zip(templ, plain, strict=True)}
    assert len(extra) == 1 and extra.pop() > 0


def test_non_moe_model_directory_is_refused(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
    ).save_pretrained(tmp_path / "dense")
    src = write_csv(tmp_path / "p.csv", [{"prompt": "hello"}])
    result, text = run(
        "collect", "--model", tmp_path / "dense", "--prompts", src, "--out", tmp_path / "o.jsonl"
    )
    assert result.exit_code == 2
    assert "'llama' is not a Mixture-of-Experts architecture" in " ".join(text.split())
    result, text = run(
        "collect", "--model", tmp_path / "nowhere", "--prompts", src, "--out", tmp_path / "o.jsonl"
    )
    assert result.exit_code == 2 and "not a directory" in text


def test_console_script_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "routescan.cli.main", "collect", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--attach-launches" in proc.stdout and "embedded" in proc.stdout


def test_embedded_default_runs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result, text = run("collect")
    assert result.exit_code == 0, text
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["requests"] == 12
    traces = list(read_traces(tmp_path / "routescan-demo" / "traces.jsonl"))
    assert len(traces) == 12 and traces[0].labels == {"label": 0, "set": "demo"}
