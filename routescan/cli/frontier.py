"""`routescan frontier`: every export level's leakage beside its detection -> docs/privacy.md."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from routescan.cli.common import ProgressLines, SignalOption, console, friendly_errors


def frontier(
    traces: Annotated[Path, typer.Argument(help="Traces from `routescan collect --corpus`.")],
    corpus: Annotated[Path, typer.Option(help="The corpus recipe the traces were collected from.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Markdown file whose frontier section is written (replaced on a rerun, appended when "
            "missing); the full results go to <out stem>-frontier.json and the plot to "
            "figures/<out stem>-frontier.png beside it.",
        ),
    ] = Path("docs/privacy.md"),
    corpora: Annotated[Path, typer.Option(envvar="ROUTESCAN_CORPORA", help="Shared corpora folder.")] = Path(
        "../shared/corpora"
    ),
    top_n: Annotated[int, typer.Option(help="Content words the attackers try to recover.")] = 100,
    pools: Annotated[
        str, typer.Option(help="Candidate pool sizes for retrieval, comma-separated.")
    ] = "100,1000",
    levels: Annotated[
        str | None,
        typer.Option(
            help="Only these levels, comma-separated names as in docs/privacy.md's table (e.g. "
            "score-q12,score-q8); full is always measured, as the reference. Default: all."
        ),
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    launch_model: SignalOption = None,
) -> None:
    """Measure each export level (full, layers, harm projections, binned scores with and without
    randomised response): the `routescan invert` attackers trained on the level's own output, and
    LODO / wrapper detection with the level fitted per fold. A research setting: the prompts are
    rebuilt from the corpus in memory as the attackers' ground truth and never written anywhere.

    Example (docs/privacy.md; about 5 minutes on 2 cores for 7,905 traces):

      routescan frontier runs/traces/smollm2-bench.jsonl -l router \\
        --corpus configs/corpus/benchmarks.yaml -o docs/privacy.md
    """
    friendly_errors(_frontier)(traces, corpus, out, corpora, top_n, pools, levels, seed, launch_model)


def _frontier(traces, corpus, out, corpora, top_n, pools, levels, seed, launch_model) -> None:
    import numpy as np

    from routescan.corpus.builder import CorpusConfig, build_corpus
    from routescan.detector.dataset import LabelledSet
    from routescan.features.fingerprint import FingerprintSpec
    from routescan.privacy.frontier import DEFAULT_RECIPES, frontier
    from routescan.privacy.report import frontier_figure, render_frontier, splice
    from routescan.telemetry.io import read_traces

    recipes = list(DEFAULT_RECIPES)
    if levels:
        wanted = [w.strip() for w in levels.split(",") if w.strip()]
        known = {r.name: r for r in recipes}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise ValueError(f"unknown levels {unknown}; the list has: {', '.join(known)}")
        if "full" not in wanted:
            wanted.insert(0, "full")  # the goal's wrapper drop is measured against full
        recipes = [known[w] for w in wanted]
    rows = list(read_traces(traces))
    examples = {e.id: e for e in build_corpus(corpora, CorpusConfig.from_yaml(corpus))}
    rows = [t for t in rows if t.trace_id in examples]
    if len(rows) < 200:
        raise ValueError(
            f"only {len(rows)} traces match the corpus; the frontier needs a few hundred at least"
        )
    spec = FingerprintSpec.from_trace(rows[0], launch_model)
    data = LabelledSet.from_traces(rows, spec)
    attack_rows = np.flatnonzero(
        ~data.wrapped
    )  # as `routescan invert`: a template's words are not the request's
    texts = [examples[str(i)].text for i in data.ids[attack_rows]]
    console.print(f"frontier over {len(recipes)} levels: {len(data)} requests, {len(attack_rows)} attacked")
    with ProgressLines("levels", len(recipes), every_s=0) as bar:
        results = frontier(
            data,
            attack_rows,
            texts,
            recipes=recipes,
            top_n=top_n,
            pools=[int(p) for p in pools.split(",") if p],
            seed=seed,
            # one step per level: a level's name is shown while it runs, and counted when the next starts
            progress=lambda name: bar.advance(1 if bar.note else 0, note=name),
        )
        bar.advance(1, note="done")
    results.update(model_id=spec.model_id, launch_model=spec.launch_model)
    command = "routescan frontier " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    stem = out.stem
    fig = frontier_figure(results, out.parent / "figures" / f"{stem}-frontier.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    document = out.read_text(encoding="utf-8") if out.exists() else f"# {stem}\n"
    section = render_frontier(results, command=command, figure=f"figures/{fig.name}")
    out.write_text(splice(document, section), encoding="utf-8")
    out.with_name(f"{stem}-frontier.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    console.print(f"wrote the frontier section of {out}; recommended level: {results['recommended']}")
    typer.echo(json.dumps({"out": str(out), "recommended": results["recommended"]}))
