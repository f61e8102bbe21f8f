"""`routescan collect`: prompts in, one trace per request (per launch model) out, no text."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from routescan.cli.common import ProgressLines, console, defaults, friendly_errors
from routescan.corpus.builder import CorpusConfig, build_corpus, manifest, summarize
from routescan.corpus.prompts import PromptRow, demo_prompts_path, read_prompts
from routescan.files import atomic_path
from routescan.models.tiny import tiny_model_types
from routescan.telemetry.io import append_jsonl, read_traces, trace_format, write_traces
from routescan.telemetry.registry import available_launch_models, load_launch_model

_D = defaults("collect.yaml", "collect")


def output_paths(out: Path, launch_models: list[str]) -> dict[str, Path]:
    """One file per launch model: ``out`` itself for one, ``<stem>.<name><suffix>`` for several."""
    if len(launch_models) == 1:
        return {launch_models[0]: out}
    return {name: out.with_name(f"{out.stem}.{name}{out.suffix}") for name in launch_models}


def _staging_path(final: Path) -> Path:
    """Where traces stream during collection: the file itself for JSONL, a side JSONL for Parquet."""
    return final if trace_format(final) == "jsonl" else final.with_name(final.name + ".partial.jsonl")


def _recover_jsonl(path: Path) -> set[str]:
    """Ids already collected in ``path``. A torn last line (crash mid-write) is cut off."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    keep = len(data) if data.endswith(b"\n") or not data else data.rfind(b"\n") + 1
    if keep != len(data):
        with path.open("r+b") as fh:
            fh.truncate(keep)
        console.print(f"[yellow]note:[/] dropped an incomplete last line of {path} (interrupted write)")
    return {t.trace_id for t in read_traces(path)}


def _open_outputs(paths: dict[str, Path], resume: bool) -> tuple[dict[str, Path], set[str] | None]:
    staging = {}
    done: set[str] | None = None
    for name, final in paths.items():
        stage = _staging_path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        if not resume:
            for p in {stage, final}:
                p.unlink(missing_ok=True)
        elif stage != final and final.exists() and not stage.exists():
            # Resuming onto a finished Parquet file: stream its traces back out to append to them.
            write_traces(stage, read_traces(final))
        ids = _recover_jsonl(stage)
        done = ids if done is None else done & ids
        staging[name] = stage
    return staging, done


def corpus_rows(recipe: Path, corpora: Path) -> tuple[list[PromptRow], dict]:
    """The requests of a corpus recipe, as prompt rows whose labels are the example's metadata, and
    the corpus manifest (which source rows it used; no text)."""
    config = CorpusConfig.from_yaml(recipe)
    examples = build_corpus(corpora, config)
    counts = summarize(examples)
    wrapped = sum(v["harmful"] + v["benign"] for v in counts["wrapped_by_family"].values())
    console.print(
        f"corpus [bold]{config.name}[/]: {counts['examples']} requests = {counts['harmful_plain']} harmful"
        f" + {counts['benign_plain']} benign + {counts['hard_negatives']} hard negatives + {wrapped} wrapped",
        highlight=False,
    )
    rows = [PromptRow(i, e.text, e.id, e.labels()) for i, e in enumerate(examples)]
    return rows, manifest(config, examples)


def _cupti_stream(loaded, requests, names: list[str], max_tokens: int, aggregate: bool):
    """(request, {name: trace}) from the GPU collector, under the single output name asked for.
    Kernel records only exist per kernel, so ``aggregate`` sums them after the fact."""
    from routescan.telemetry.cupti import CuptiCollector, GpuUnavailable

    if len(names) != 1:
        raise ValueError("the cupti collector writes one trace per request: give at most one --launch-model")
    try:
        collector = CuptiCollector(loaded, max_tokens=max_tokens)
        loaded.model.to("cuda")
        for request, trace in collector.collect(requests):
            yield request, {names[0]: trace.aggregated() if aggregate else trace}
    except GpuUnavailable as exc:
        raise ValueError(str(exc)) from None


def collect(
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts",
            "-p",
            help="CSV/TSV, JSONL, JSON array or TXT (one prompt a line). Default: the embedded demo prompts.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Trace file, .jsonl or .parquet.", envvar="ROUTESCAN_OUT")
    ] = Path(_D.get("out", "routescan-demo/traces.jsonl")),
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            "-m",
            help="A transformers MoE saved with save_pretrained() (weights read from disk only).",
            show_default=False,
        ),
    ] = None,
    tiny: Annotated[
        str | None,
        typer.Option(
            help=f"A seeded tiny random MoE instead of --model: {', '.join(tiny_model_types())}. "
            f"Default when neither is given: {_D.get('tiny', 'mixtral')}.",
            show_default=False,
            envvar="ROUTESCAN_TINY",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --tiny model's weights.")] = int(_D.get("seed", 0)),
    launch_model: Annotated[
        list[str] | None,
        typer.Option(
            "--launch-model",
            "-l",
            help="Launch model(s) to emit (repeat for several from one forward pass; "
            f"built-in: {', '.join(available_launch_models())}, or a YAML path). Several write "
            "<out-stem>.<name><suffix> each.",
            envvar="ROUTESCAN_LAUNCH_MODELS",
            show_default=False,
        ),
    ] = None,
    corpus: Annotated[
        Path | None,
        typer.Option(
            help="Collect a labelled detector corpus built from a recipe (configs/corpus/*.yaml) "
            "instead of --prompts; each trace carries label, domain, wrapper family, source, base id.",
            show_default=False,
        ),
    ] = None,
    corpora: Annotated[
        Path,
        typer.Option(help="The shared corpora folder --corpus reads.", envvar="ROUTESCAN_CORPORA"),
    ] = Path("../shared/corpora"),
    text_column: Annotated[
        str, typer.Option(help="Column / field holding the prompt.", envvar="ROUTESCAN_TEXT_COLUMN")
    ] = _D.get("text_column", "prompt"),
    id_column: Annotated[
        str | None,
        typer.Option(help="Column holding opaque request ids (default: row-<n>).", show_default=False),
    ] = None,
    label_column: Annotated[
        list[str] | None,
        typer.Option(
            "--label-column",
            help="Column(s) carried into each trace's labels (short tokens or numbers).",
            show_default=False,
        ),
    ] = None,
    skip_empty: Annotated[bool, typer.Option(help="Skip empty prompts instead of stopping.")] = False,
    limit: Annotated[
        int | None, typer.Option(help="Collect at most this many prompts.", show_default=False)
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Prompts per prefill forward pass.", envvar="ROUTESCAN_BATCH_SIZE")
    ] = int(_D.get("batch_size", 8)),
    max_tokens: Annotated[
        int, typer.Option(help="Refuse longer requests (never truncates).", envvar="ROUTESCAN_MAX_TOKENS")
    ] = int(_D.get("max_tokens", 4096)),
    chat_template: Annotated[
        bool | None,
        typer.Option(
            "--chat-template/--no-chat-template",
            help="Wrap each prompt in the tokenizer's chat template (default: when it has one).",
            show_default=False,
        ),
    ] = None,
    system_prompt: Annotated[
        str | None, typer.Option(help="System message for the chat template.", show_default=False)
    ] = None,
    model_id: Annotated[
        str | None,
        typer.Option(
            help="Model id to write into traces (default: from the model's config).", show_default=False
        ),
    ] = None,
    aggregate: Annotated[
        bool,
        typer.Option(
            "--aggregate/--per-kernel",
            help="Write one summed launch per (layer, expert) instead of every kernel: fingerprints are "
            "identical and files far smaller (eager loops over many experts emit thousands of kernels).",
        ),
    ] = False,
    experts_implementation: Annotated[
        str,
        typer.Option(
            help="How --model computes its experts. eager: per-expert kernels (what GPU collection "
            "needs). For emulated collection on CPU a faster one gives the same routing: masked_dense "
            "for `routescan moefy` models, grouped_mm / batched_mm for transformers MoEs.",
            envvar="ROUTESCAN_EXPERTS_IMPLEMENTATION",
        ),
    ] = "eager",
    collector: Annotated[
        str,
        typer.Option(
            help="emulated: CPU/any-device forward with routers hooked, launches computed by the launch "
            "models. cupti: a GPU prefill per request, kernels read from CUPTI activity records "
            "(needs routescan[gpu] and an NVIDIA driver; launch models do not apply).",
            envvar="ROUTESCAN_COLLECTOR",
        ),
    ] = "emulated",
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--overwrite", help="Skip requests already in --out (default), or start the file over."
        ),
    ] = True,
) -> None:
    """Run prompts through an MoE model's prefill and write one expert-launch trace per request.

    The emulated collector runs the forward pass on CPU with the routers hooked and computes the
    kernel launches a GPU backend would make (see configs/launch/). No prompt text, token id or
    per-token routing is written: only per-(layer, expert) aggregates.

    With no arguments it runs the embedded default: a seeded tiny Mixtral over twelve built-in demo
    prompts, writing routescan-demo/traces.jsonl.

    Examples:

      routescan collect --tiny qwen2_moe --prompts prompts.csv --label-column label --out t.jsonl

      routescan collect --model ./my-moe --prompts data.jsonl -l hf-eager -l router --out traces.parquet
    """
    friendly_errors(_collect)(**locals())


def _collect(**kw) -> None:
    if kw["model"] is not None and kw["tiny"] is not None:
        raise ValueError("give --model or --tiny, not both")
    names = kw["launch_model"] or list(_D.get("launch_models", ["hf-eager"]))
    names = [n for item in names for n in str(item).split(",") if n]
    launch_models = [load_launch_model(n) for n in names]
    names = [lm.name for lm in launch_models]
    if len(set(names)) != len(names):
        raise ValueError(f"launch models given twice: {names}")

    corpus_manifest = None
    if kw["corpus"] is not None:
        if kw["prompts"] is not None:
            raise ValueError("give --prompts or --corpus, not both")
        rows, corpus_manifest = corpus_rows(kw["corpus"], kw["corpora"])
    else:
        prompts_path: Path = kw["prompts"] or demo_prompts_path()
        label_columns = list(kw["label_column"] or [])
        if kw["prompts"] is None and not label_columns:
            label_columns = ["label", "set"]
        rows = list(
            read_prompts(
                prompts_path,
                text_column=kw["text_column"],
                id_column=kw["id_column"],
                label_columns=label_columns,
                skip_empty=kw["skip_empty"],
            )
        )
    if kw["limit"] is not None:
        rows = rows[: kw["limit"]]

    paths = output_paths(kw["out"], names)
    staging, done = _open_outputs(paths, kw["resume"])
    todo = [r for r in rows if r.trace_id not in (done or set())]
    if corpus_manifest is not None:
        # similar lengths share a batch, so padding does not multiply the cost of the long wrapped
        # requests (a prompt file keeps its order: sort it by length yourself for the same gain)
        todo.sort(key=lambda r: len(r.text))
    if done:
        console.print(f"resuming: {len(rows) - len(todo)} of {len(rows)} requests already collected")

    if todo:
        # torch and transformers load here, not when the CLI starts
        from routescan.models.loading import load_pretrained, load_tiny
        from routescan.telemetry.emulated import EmulatedCollector, Request

        if kw["model"] is not None:
            loaded = load_pretrained(
                kw["model"],
                experts_implementation=kw["experts_implementation"],
                chat_template=kw["chat_template"],
                system_prompt=kw["system_prompt"],
                model_id=kw["model_id"],
            )
        else:
            loaded = load_tiny(kw["tiny"] or _D.get("tiny", "mixtral"), seed=kw["seed"])
            if kw["model_id"]:
                loaded.model_id = kw["model_id"]
        impl = loaded.adapter.experts_implementation
        console.print(
            f"model [bold]{loaded.model_id}[/] ({loaded.adapter.arch.name}, {len(loaded.adapter.layers)} MoE "
            f"layers, experts_implementation={impl}); launch models: {', '.join(names)}",
            highlight=False,
        )
        if impl != "eager" and any(lm.per_expert for lm in launch_models):
            console.print(
                "[yellow]note:[/] per-expert launch sizes need experts_implementation='eager' on the GPU;"
                " the emulator computes them from routing regardless"
            )
        requests = (Request(r.trace_id, r.text, row=r.row, labels=r.labels) for r in todo)
        if kw["collector"] == "cupti":
            stream = _cupti_stream(loaded, requests, names, kw["max_tokens"], kw["aggregate"])
        elif kw["collector"] == "emulated":
            stream = EmulatedCollector(
                loaded,
                launch_models,
                batch_size=kw["batch_size"],
                max_tokens=kw["max_tokens"],
                aggregate=kw["aggregate"],
            ).collect(requests)
        else:
            raise ValueError(f"--collector must be 'emulated' or 'cupti', not {kw['collector']!r}")
        handles = {name: staging[name].open("a", encoding="utf-8") for name in names}
        try:
            with ProgressLines("collecting", len(todo)) as bar:
                for _request, traces in stream:
                    for name, trace in traces.items():
                        append_jsonl(handles[name], trace)
                    bar.advance()
        finally:
            for fh in handles.values():
                fh.close()

    for name, final in paths.items():
        stage = staging[name]
        if stage != final:
            write_traces(final, read_traces(stage))
            os.remove(stage)
        console.print(f"wrote {final}")
    if corpus_manifest is not None:
        out_path = Path(kw["out"])
        target = out_path.with_name(out_path.name.split(".")[0] + ".manifest.json")
        with atomic_path(target) as tmp:
            tmp.write_text(json.dumps(corpus_manifest, indent=1) + "\n", encoding="utf-8")
        console.print(f"wrote {target} (the source rows this corpus used; no text)")
    summary = {
        "requests": len(rows),
        "collected_now": len(todo),
        "outputs": {k: str(v) for k, v in paths.items()},
    }
    typer.echo(json.dumps(summary))
