"""`routescan serve`: the scoring daemon an operator runs beside the inference server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from routescan.cli.common import console, friendly_errors
from routescan.telemetry.schema import ExportLevel


def serve(
    host: Annotated[
        str | None,
        typer.Option(help="Address to bind (default 127.0.0.1; others need a token).", show_default=False),
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port (default 8787; 0 picks a free one).", show_default=False)
    ] = None,
    uds: Annotated[
        Path | None,
        typer.Option(
            help="Listen on this Unix domain socket instead of TCP (the in-process agent's default "
            "transport). The socket is created with --uds-mode (default 0660) and --uds-group: socket "
            "clients skip the token, so the file mode is the access control. An existing path is "
            "replaced only if it is a stale socket.",
            show_default=False,
        ),
    ] = None,
    uds_mode: Annotated[
        str | None,
        typer.Option(help="Octal mode of the socket file (default 0660).", show_default=False),
    ] = None,
    uds_group: Annotated[
        str | None,
        typer.Option(
            help="Group of the socket file, e.g. the serving container's group.", show_default=False
        ),
    ] = None,
    detector: Annotated[
        Path | None,
        typer.Option(
            help="Detector file, or the name of a reference detector shipped in the package (e.g. "
            "smollm2-e32k16-shared-router: routescan/detector/reference/). Default: the demo detector.",
            show_default=False,
        ),
    ] = None,
    operating_point: Annotated[
        str | None,
        typer.Option(help="Operating point of the detector, e.g. fpr1 or fpr5.", show_default=False),
    ] = None,
    db: Annotated[
        Path | None,
        typer.Option(help="SQLite audit store (default: in the user data directory).", show_default=False),
    ] = None,
    audit_store: Annotated[
        str | None,
        typer.Option(
            help="A postgresql:// URL: one audit store that every daemon of a fleet writes to (needs "
            "routescan[postgres]); default the SQLite file --db. Or set ROUTESCAN_AUDIT_STORE.",
            show_default=False,
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(help="File holding the bearer token (or set ROUTESCAN_API_TOKEN).", show_default=False),
    ] = None,
    webhook_url: Annotated[
        str | None, typer.Option(help="POST flagged results here, off the request path.", show_default=False)
    ] = None,
    export_level: Annotated[
        ExportLevel | None,
        typer.Option(
            help="Export level of the records scored (docs/privacy.md). Default: full on a socket or "
            "loopback, score beyond loopback; score derives from a full detector.",
            show_default=False,
        ),
    ] = None,
    allow_full_from_network: Annotated[
        bool | None,
        typer.Option(
            "--allow-full-from-network",
            help="Accept full traces and fingerprints from peers on other hosts (off: 403). They are "
            "nearly the prompt: see the threat model in docs/privacy.md.",
            show_default=False,
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="Settings file (default: configs/service.yaml).", show_default=False)
    ] = None,
) -> None:
    """Serve harm scores over HTTP: POST a trace or fingerprint to /v1/score, read /v1/audits.

    With no arguments it starts on 127.0.0.1:8787 with the demo detector shipped in the package and
    a SQLite audit store in your user data directory. Settings come from configs/service.yaml,
    then ROUTESCAN_* environment variables, then these flags. Binding a non-loopback address
    requires a bearer token; a loopback server without one refuses browsers (foreign Host or
    Origin headers, non-JSON bodies). Requests never carry text: the schemas refuse it. Beyond
    loopback the daemon takes score-level records (the agent's binned on-host score) and refuses
    full ones unless --allow-full-from-network says otherwise.
    """
    friendly_errors(_serve)(
        config,
        host=host,
        port=port,
        uds=uds,
        uds_mode=uds_mode,
        uds_group=uds_group,
        detector=detector,
        operating_point=operating_point,
        db=db,
        audit_store=audit_store,
        token_file=token_file,
        webhook_url=webhook_url,
        export_level=export_level,
        allow_full_from_network=allow_full_from_network,
    )


def _serve(config: Path | None, **overrides: object) -> None:
    from routescan.service.server import serve as run
    from routescan.service.settings import load_settings

    run(
        load_settings(config, **overrides),
        say=lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True),
    )
