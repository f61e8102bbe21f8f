"""`routescan invert`: inversion attacks on fingerprints vs on text -> docs/privacy.md."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from routescan.cli.common import SignalOption, console, friendly_errors


def invert(
    traces: Annotated[Path, typer.Argument(help="Traces from `routescan collect --corpus`.")],
    corpus: Annotated[Path, typer.Option(help="The corpus recipe the traces were collected from.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report (Markdown); .json and a PNG beside it.")],
    corpora: Annotated[Path, typer.Option(envvar="ROUTESCAN_CORPORA", help="Shared corpora folder.")] = Path(
        "../shared/corpora"
    ),
    top_n: Annotated[int, typer.Option(help="Content words the attackers try to recover.")] = 100,
    include_wrapped: Annotated[
        bool, typer.Option(help="Also attack wrapped requests (their template text dominates the words).")
    ] = False,
    pools: Annotated[
        str, typer.Option(help="Candidate pool sizes for retrieval, comma-separated.")
    ] = "100,1000",
    seed: Annotated[int, typer.Option()] = 0,
    windows: Annotated[
        bool,
        typer.Option(
            "--windows/--no-windows",
            help="Attack the window-pooled record (the fingerprint beside the feature-wise max over "
            "its windows of W tokens, traces from collect --window) instead of the fingerprint "
            "alone: what keeping windows gives away.",
        ),
    ] = False,
    launch_model: SignalOption = None,
) -> None:
    """Train attackers that try to recover prompt content from routing fingerprints, and the same
    attackers on the prompt text as the upper reference (a research setting: the prompts are rebuilt
    from the corpus in memory by request id, never read from a trace). Held-out evaluation, fixed seeds.
    """
    friendly_errors(_invert)(
        traces, corpus, out, corpora, top_n, include_wrapped, pools, seed, launch_model, windows
    )  # fmt: skip


def _invert(traces, corpus, out, corpora, top_n, include_wrapped, pools, seed, launch_model, windows) -> None:
    import numpy as np

    from routescan.corpus.builder import CorpusConfig, build_corpus
    from routescan.features.fingerprint import FingerprintSpec
    from routescan.privacy.inversion import AttackData, run_attacks
    from routescan.privacy.report import figure, kept_sections, render
    from routescan.telemetry.io import read_traces

    rows = list(read_traces(traces))
    if not rows:
        raise ValueError(f"{traces}: no traces")
    examples = {e.id: e for e in build_corpus(corpora, CorpusConfig.from_yaml(corpus))}
    rows = [
        t
        for t in rows
        if t.trace_id in examples and (include_wrapped or examples[t.trace_id].family == "none")
    ]
    if len(rows) < 200:
        raise ValueError(f"only {len(rows)} traces match the corpus; the attacks need a few hundred at least")
    spec = FingerprintSpec.from_trace(rows[0], launch_model)
    ex = [examples[t.trace_id] for t in rows]
    if windows:
        from routescan.detector.dataset import LabelledSet

        if not any(t.windows is not None for t in rows):
            raise ValueError(f"{traces}: no trace has windows; collect with --window W")
        # the same record the window-pooled detector reads (LabelledSet derives it, once)
        labelled = LabelledSet.from_traces(rows, spec)
        X = np.concatenate([labelled.X, labelled.window_max()], axis=1)
    else:
        X = spec.transform_many(rows)
    data = AttackData(
        X=X,
        texts=[e.text for e in ex],
        tokens=np.array([t.prompt_tokens for t in rows], dtype=float),
        source=np.array([e.source for e in ex]),
        domain=np.array([e.domain for e in ex]),
    )
    console.print(f"attacking {len(rows)} fingerprints of {spec.model_id} ({spec.launch_model})")
    results = run_attacks(data, top_n=top_n, seed=seed, pools=[int(p) for p in pools.split(",") if p])
    results.update(
        model_id=spec.model_id,
        launch_model=spec.launch_model,
        representation="fingerprint + window max" if windows else "fingerprint",
    )
    command = "routescan invert " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    fig = figure(results, out.parent / "figures" / f"{out.stem}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = render(results, command=command, figure=f"figures/{fig.name}")
    out.write_text(text + kept_sections(out), encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    w = results["word_recovery"]
    summary = {k: round(v["f1"], 4) for k, v in w.items() if isinstance(v, dict)}
    console.print(f"wrote {out}")
    typer.echo(json.dumps({"out": str(out), "word_recovery_f1": summary}))
