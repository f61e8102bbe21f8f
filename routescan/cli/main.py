"""The `routescan` command: collect -> featurize -> inspect, then score offline or serve."""

from __future__ import annotations

from typing import Annotated

import typer

from routescan import __version__
from routescan.cli.audits import audits
from routescan.cli.collect import collect
from routescan.cli.evaluate import evaluate
from routescan.cli.featurize import featurize
from routescan.cli.frontier import frontier
from routescan.cli.info import info
from routescan.cli.inspect_cmd import inspect
from routescan.cli.invert import invert
from routescan.cli.moefy_cmd import export, moefy
from routescan.cli.score import score
from routescan.cli.serve import serve
from routescan.cli.train import score_bins, train

app = typer.Typer(
    name="routescan",
    help="Privacy-preserving safety auditing of MoE LLMs from expert-kernel launch telemetry. "
    "Traces hold per-(layer, expert) routing counts only: never prompt text.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"routescan {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """RouteScan command line."""


app.command(no_args_is_help=False)(collect)
app.command()(featurize)
app.command()(inspect)
app.command()(score)
app.command()(serve)
app.command()(audits)
app.command()(moefy)
app.command()(export)
app.command()(train)
app.command()(score_bins)
app.command()(evaluate)
app.command()(info)
app.command()(invert)
app.command()(frontier)

if __name__ == "__main__":
    app()
