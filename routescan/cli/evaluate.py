"""`routescan evaluate`: the generalisation report (leave-one-domain-out, leave-one-wrapper-family-out,
hard negatives) for each signal source, with baselines, as Markdown + JSON + PNG."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from routescan.cli.common import ProgressLines, console, friendly_errors

# the signals compared by default: per-expert kernels, routing itself, and what fused kernels show
COMPARED_SIGNALS = ("hf-eager", "router", "vllm-fused-moe")
HAND_WRITTEN = "<!-- hand-written: kept by routescan evaluate -->"


def evaluate(
    traces: Annotated[
        list[Path],
        typer.Argument(
            help="Labelled trace files: one trace/2 file (each --signal is derived from it), or trace/1 "
            "files of one signal source each (traces.hf-eager.jsonl traces.router.jsonl ...), same "
            "requests in each."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report Markdown file; .json and PNGs beside it.")],
    corpus: Annotated[
        Path | None,
        typer.Option(
            help="The corpus recipe the traces were collected from: enables the text (TF-IDF) "
            "baseline, which rebuilds the prompts in memory only.",
            show_default=False,
        ),
    ] = None,
    corpora: Annotated[Path, typer.Option(envvar="ROUTESCAN_CORPORA", help="Shared corpora folder.")] = Path(
        "../shared/corpora"
    ),
    methods: Annotated[
        str,
        typer.Option(
            help="Telemetry methods, comma-separated: invariant, logreg, gbm, volume (total prefill "
            "threads only: what any launch observer sees, the floor the fingerprint must beat)."
        ),
    ] = "invariant,logreg,gbm,volume",
    baselines: Annotated[
        str,
        typer.Option(
            help="Source-independent baselines, comma-separated: length (prompt length only), and with "
            "--corpus the content auditors tfidf and minilm (sentence embeddings; extra 'baselines'). "
            "They run once, on the first signal's rows.",
        ),
    ] = "length,tfidf,minilm",
    primary: Annotated[
        str,
        typer.Option(
            help="Telemetry method the goals table reads (the first signal's): the shipped reference "
            "detector's, invariant (whose inner search keeps every feature: a group-balanced LR)."
        ),
    ] = "invariant",
    windows: Annotated[
        bool,
        typer.Option(
            "--windows/--no-windows",
            help="Window pooling on the first signal (traces collected with --window): request score "
            "against max-pooled window scores and a window-max record.",
        ),
    ] = True,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for AUROC intervals.")] = 1000,
    title: Annotated[str, typer.Option(help="Report title.")] = "Detection results",
    seed: Annotated[int, typer.Option()] = 0,
    signal: Annotated[
        list[str] | None,
        typer.Option(
            "--launch-model",
            "-l",
            help="Signals to compare (repeat): launch models applied to the traces' routed counts. "
            "Default: hf-eager, router and vllm-fused-moe for routed counts; a measured file's own.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Evaluate the detector and its baselines on held-out harm domains and wrapper families.

    Every method is refit per held-out group; the invariant detector's hyper-parameters are chosen
    inside each training fold only. Length-only and text baselines run once (they do not depend on
    the signal source).

    Example:

      routescan evaluate runs/traces/smollm2.jsonl -l hf-eager -l router -l vllm-fused-moe \\
        --corpus configs/corpus/default.yaml -o docs/results.md
    """
    friendly_errors(_evaluate)(
        traces, out, corpus, corpora, methods, baselines, primary, windows, bootstrap, title, seed, signal
    )  # fmt: skip


def _evaluate(
    traces, out, corpus, corpora, methods, baselines, primary, windows, bootstrap, title, seed, signal
) -> None:
    import numpy as np

    from routescan.detector.content import Content, load_sentence_model
    from routescan.detector.dataset import LabelledSet
    from routescan.detector.methods import CONTENT_METHODS, TELEMETRY_METHODS
    from routescan.detector.report import evaluate as run
    from routescan.detector.report import render_markdown, write_figures, write_json
    from routescan.features.fingerprint import derives_signals
    from routescan.telemetry.io import read_traces

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(TELEMETRY_METHODS))
    if unknown or not chosen:
        raise ValueError(
            f"unknown telemetry method(s) {unknown or methods!r}; choose from {', '.join(TELEMETRY_METHODS)}"
        )
    shared = [m.strip() for m in baselines.split(",") if m.strip()]
    bad = sorted(set(shared) - {"length", *CONTENT_METHODS})
    if bad:
        raise ValueError(f"unknown baseline(s) {bad}; choose from length, {', '.join(CONTENT_METHODS)}")
    sentence_model = None
    if corpus is None:
        shared = [m for m in shared if m not in CONTENT_METHODS]
    elif "minilm" in shared:
        sentence_model = load_sentence_model()  # fail now, not after an hour of fits, if it is missing
    sources: dict[str, LabelledSet] = {}
    for path in traces:
        rows = list(read_traces(path))
        derives = bool(rows) and derives_signals(rows[0])
        for name in (signal or list(COMPARED_SIGNALS)) if derives else [None]:
            data = LabelledSet.from_traces(rows, launch_model=name)
            if data.spec.launch_model in sources:
                raise ValueError(f"signal '{data.spec.launch_model}' given twice")
            sources[data.spec.launch_model] = data
    ids = [np.sort(d.ids) for d in sources.values()]
    if any(len(i) != len(ids[0]) or not np.array_equal(i, ids[0]) for i in ids):
        raise ValueError("the trace files do not hold the same requests; collect them in one run")
    texts = None
    if corpus is not None:
        from routescan.corpus.builder import CorpusConfig, build_corpus

        texts = {e.id: e.text for e in build_corpus(corpora, CorpusConfig.from_yaml(corpus))}
        missing = [i for i in ids[0] if i not in texts][:3]
        if missing:
            raise ValueError(
                f"traces {missing} are not in corpus {corpus}; was it collected from another recipe?"
            )
    first = next(iter(sources.values()))
    content = None
    if texts is not None:
        ids_kept = set(ids[0].tolist())
        texts = {k: v for k, v in texts.items() if k in ids_kept}
        if "minilm" in shared:
            with ProgressLines("embedding texts (minilm baseline)", len(texts)) as emb:
                content = Content(
                    texts, progress=lambda done, _total: emb.advance(done - emb.done), model=sentence_model
                )
                content.embeddings(sorted(texts))
        else:
            content = Content(texts)
    with ProgressLines("evaluating (fits)", None) as bar:
        results = run(
            sources,
            texts=content,
            methods=chosen,
            text_methods=shared,
            windows=windows,
            n_boot=bootstrap,
            seed=seed,
            progress=lambda step: bar.advance(1, step),
        )
    command = "routescan evaluate " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    results["meta"] = {
        "model_id": first.spec.model_id,
        "command": command,
        "rows": len(first),
        "harmful": int(first.y.sum()),
        "hard_negatives": int(first.hard_negative.sum()),
        "wrapped": int(first.wrapped.sum()),
    }
    figures = write_figures(results, out.parent / "figures", out.stem)
    preamble = (
        f"Model `{first.spec.model_id}`; {len(first)} requests ({int(first.y.sum())} harmful, "
        f"{int(first.wrapped.sum())} wrapped, {int(first.hard_negative.sum())} hard negatives). "
        f"Written by:\n\n```bash\n{command}\n```\n\n"
        + "\n".join(f"![{p.stem}](figures/{p.name})" for p in figures)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    primary_pair = (next(iter(sources)), primary)
    body = render_markdown(results, title=title, preamble=preamble, primary=primary_pair)
    # a hand-written reading below the marker survives a rerun; the tables above it are regenerated
    old = out.read_text(encoding="utf-8") if out.exists() else ""
    if HAND_WRITTEN in old:
        body += "\n" + old[old.index(HAND_WRITTEN) :]
    out.write_text(body, encoding="utf-8")
    write_json(
        {k: v for k, v in results.items() if k not in ("curves", "distributions")}, out.with_suffix(".json")
    )
    console.print(f"wrote {out}, {out.with_suffix('.json')} and {len(figures)} figure(s)")
    summary = {
        src: {m: round(e["lodo"]["summary"]["mean_auroc"], 4) for m, e in by_m.items()}
        for src, by_m in results["sources"].items()
    }
    typer.echo(json.dumps({"out": str(out), "lodo_mean_auroc": summary}))
