"""`routescan serve`: the scoring daemon an operator runs beside the inference server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from routescan.cli.common import console, friendly_errors


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
            "transport; access is governed by the socket file's permissions, group read/write).",
            show_default=False,
        ),
    ] = None,
    detector: Annotated[
        Path | None,
        typer.Option(
            help="Detector file (default: the demo detector shipped in the package).", show_default=False
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
    token_file: Annotated[
        Path | None,
        typer.Option(help="File holding the bearer token (or set ROUTESCAN_API_TOKEN).", show_default=False),
    ] = None,
    webhook_url: Annotated[
        str | None, typer.Option(help="POST flagged results here, off the request path.", show_default=False)
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="Settings file (default: configs/service.yaml).", show_default=False)
    ] = None,
) -> None:
    """Serve harm scores over HTTP: POST a trace or fingerprint to /v1/score, read /v1/audits.

    With no arguments it starts on 127.0.0.1:8787 with the demo detector shipped in the package and
    a SQLite audit store in your user data directory. Settings come from configs/service.yaml,
    then ROUTESCAN_* environment variables, then these flags. Binding a non-loopback address
    requires a bearer token. Requests never carry text: the schemas refuse it.
    """
    friendly_errors(_serve)(
        host=host,
        port=port,
        uds=uds,
        detector=detector,
        operating_point=operating_point,
        db=db,
        token_file=token_file,
        webhook_url=webhook_url,
        config=config,
    )


def _serve(config: Path | None, **overrides: object) -> None:
    import uvicorn

    from routescan.detector.artifact import Detector, default_detector_path
    from routescan.service.app import create_app
    from routescan.service.settings import load_settings

    settings = load_settings(config, **overrides)
    token = settings.api_token()
    if settings.uds is None and not settings.is_loopback() and not token:
        raise ValueError(
            f"refusing to listen on {settings.host} without an API token: set ROUTESCAN_API_TOKEN or "
            "--token-file (or bind 127.0.0.1)"
        )
    det = Detector.load(settings.detector or default_detector_path())
    card = det.card
    point = card.operating_point(settings.operating_point)
    console.print(
        f"detector [bold]{card.detector_id} {card.version}[/]{' [yellow](DEMO)[/]' if card.demo else ''} "
        "reads "
        f"{card.spec.model_id} / {card.spec.launch_model}; operating point {point.name} "
        f"(threshold {point.threshold:.4f})",
        highlight=False,
    )
    console.print(
        f"audit store {settings.db_path()}; auth {'bearer token' if token else 'off (loopback only)'}",
        highlight=False,
    )
    app = create_app(settings, detector=det)
    if settings.uds is not None:
        settings.uds.parent.mkdir(parents=True, exist_ok=True)
        settings.uds.unlink(missing_ok=True)  # a stale socket from a killed daemon would block the bind
        os.umask(0o007)  # socket rw for owner and group (the serving container's user), none for others
        console.print(f"listening on unix socket {settings.uds}", highlight=False)
        uvicorn.run(app, uds=str(settings.uds), access_log=settings.access_log, log_level="info")
        return
    uvicorn.run(app, host=settings.host, port=settings.port, access_log=settings.access_log, log_level="info")
