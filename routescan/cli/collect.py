"""`routescan collect`: prompts in, one trace per request (per launch model) out, no text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from routescan.cli.common import ProgressLines, console, defaults, friendly_errors
from routescan.corpus.builder import CorpusConfig, build_corpus, manifest, summarize
from routescan.corpus.prompts import PromptRow, demo_prompts_path, read_prompts
from routescan.files import atomic_path
from routescan.models.tiny import tiny_model_types
from routescan.telemetry.collector import COLLECTORS, Request, open_collector
from routescan.telemetry.io import TraceSink

_D = defaults("collect.yaml", "collect")


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
    window: Annotated[
        int | None,
        typer.Option(
            help="Also keep the counts of every WINDOW prompt tokens of a longer prompt (what chunked "
            "prefill sees): a short request inside a long template is then scored on its own window "
            "too. Emulated collector only. Windows carry more about a prompt than its sum: see "
            "docs/privacy.md.",
            envvar="ROUTESCAN_WINDOW",
            min=1,
            show_default=False,
        ),
    ] = None,
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
    launch_model: Annotated[
        list[str] | None,
        typer.Option("--launch-model", "-l", hidden=True, help="Moved to featurize / train / score."),
    ] = None,
    attach_launches: Annotated[
        str | None,
        typer.Option(
            "--attach-launches",
            help="Also keep every kernel launch on each trace: the named launch model's for the emulated "
            "collector (built-in or a YAML path), the kernel records for cupti (any value). Only for "
            "validating CUPTI against the emulator; fingerprints never need it.",
            show_default=False,
        ),
    ] = None,
    experts_implementation: Annotated[
        str,
        typer.Option(
            help="How --model computes its experts. eager: per-expert kernels (what GPU collection "
            "needs). For emulated collection on CPU a faster one gives the same routing: masked_dense "
            "for `routescan moefy` models, grouped_mm / batched_mm for transformers MoEs.",
            envvar="ROUTESCAN_EXPERTS_IMPLEMENTATION",
        ),
    ] = "eager",
    dtype: Annotated[
        str,
        typer.Option(
            help="float32 or bfloat16 for --model. Routing depends on it (rounding moves near-ties): "
            "collect in the dtype the model is served in (docs/reference-model.md, stock checkpoints).",
            envvar="ROUTESCAN_DTYPE",
        ),
    ] = "float32",
    collector: Annotated[
        str,
        typer.Option(
            help="emulated: CPU/any-device forward with routers hooked; traces hold routed token counts, "
            "which any launch model turns into kernel launches when featurising or scoring. cupti: a "
            "GPU prefill per request; traces hold the threads CUPTI measured per (layer, expert) "
            "(needs routescan[gpu] and an NVIDIA driver).",
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
    """Run prompts through an MoE model's prefill and write one trace (routescan.trace/2) per request.

    A trace holds, per MoE layer, how many of the request's (token, slot) pairs each expert received
    (emulated), or the threads each expert's kernels launched (cupti). No prompt text, token id or
    per-token routing is written: only per-(layer, expert) aggregates. Which kernel signal a detector
    reads (hf-eager, router, vllm-fused-moe, ...) is chosen when featurising, training or scoring,
    from the same traces.

    With no arguments it runs the embedded default: a seeded tiny Mixtral over twelve built-in demo
    prompts, writing routescan-demo/traces.jsonl.

    Collection is resumable: rerunning the same command skips requests already in --out.

    Examples:

      routescan collect --tiny qwen2_moe --prompts prompts.csv --label-column label --out t.jsonl

      routescan collect --model ./my-moe --prompts data.jsonl --out traces.parquet
    """
    if launch_model:
        # trace/1 collected one file per launch model; a trace/2 file serves every signal
        friendly_errors(_moved)()
    friendly_errors(_collect)(
        prompts=prompts, out=out, model=model, tiny=tiny, seed=seed, corpus=corpus, corpora=corpora,
        text_column=text_column, id_column=id_column, label_column=label_column, skip_empty=skip_empty,
        limit=limit, batch_size=batch_size, max_tokens=max_tokens, window=window, chat_template=chat_template,
        system_prompt=system_prompt, model_id=model_id, attach_launches=attach_launches,
        experts_implementation=experts_implementation, collector=collector, resume=resume, dtype=dtype,
    )  # fmt: skip


def _moved() -> None:
    raise ValueError(
        "collect writes routed counts (routescan.trace/2), from which every signal is derived: pass "
        "--launch-model to featurize, train, evaluate, inspect or invert instead (the detector's card "
        "names it for score and serve); --attach-launches keeps per-kernel launches for CUPTI checks"
    )


def _collect(**kw) -> None:
    if kw["model"] is not None and kw["tiny"] is not None:
        raise ValueError("give --model or --tiny, not both")
    if kw["collector"] not in COLLECTORS:
        raise ValueError(f"--collector must be one of {', '.join(COLLECTORS)}, not {kw['collector']!r}")

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

    sink = TraceSink(kw["out"], resume=kw["resume"], notice=lambda m: console.print(f"[yellow]note:[/] {m}"))
    todo = [r for r in rows if r.trace_id not in sink.done]
    if corpus_manifest is not None:
        # similar lengths share a batch, so padding does not multiply the cost of the long wrapped
        # requests (a prompt file keeps its order: sort it by length yourself for the same gain)
        todo.sort(key=lambda r: len(r.text))
    if sink.done:
        console.print(f"resuming: {len(rows) - len(todo)} of {len(rows)} requests already collected")

    if todo:
        loaded = _load_model(kw)
        impl = loaded.adapter.experts_implementation
        console.print(
            f"model [bold]{loaded.model_id}[/] ({loaded.adapter.arch.name}, {len(loaded.adapter.layers)} MoE "
            f"layers, experts_implementation={impl}); collector: {kw['collector']}",
            highlight=False,
        )
        collector = open_collector(
            kw["collector"],
            loaded,
            batch_size=kw["batch_size"],
            max_tokens=kw["max_tokens"],
            attach=kw["attach_launches"],
            window=kw["window"],
        )
        requests = [Request(r.trace_id, r.text, row=r.row, labels=r.labels) for r in todo]
        if callable(check := getattr(collector, "check_lengths", None)):
            check(requests)
        with sink, ProgressLines("collecting", len(todo)) as bar:
            sink.collect(collector, requests, progress=bar.advance)
    final = sink.finish()
    console.print(f"wrote {final}")
    if corpus_manifest is not None:
        target = final.with_name(final.name.split(".")[0] + ".manifest.json")
        with atomic_path(target) as tmp:
            tmp.write_text(json.dumps(corpus_manifest, indent=1) + "\n", encoding="utf-8")
        console.print(f"wrote {target} (the source rows this corpus used; no text)")
    typer.echo(json.dumps({"requests": len(rows), "collected_now": len(todo), "out": str(final)}))


def _load_model(kw: dict):
    # torch and transformers load here, not when the CLI starts
    import torch

    from routescan.models.loading import load_pretrained, load_tiny

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if kw["dtype"] not in dtypes:
        raise ValueError(f"--dtype {kw['dtype']!r}: choose float32 or bfloat16")
    if kw["model"] is not None:
        return load_pretrained(
            kw["model"],
            dtype=dtypes[kw["dtype"]],
            experts_implementation=kw["experts_implementation"],
            chat_template=kw["chat_template"],
            system_prompt=kw["system_prompt"],
            model_id=kw["model_id"],
        )
    loaded = load_tiny(kw["tiny"] or _D.get("tiny", "mixtral"), seed=kw["seed"])
    if kw["model_id"]:
        loaded.model_id = kw["model_id"]
    return loaded
