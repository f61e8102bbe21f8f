"""Run real servers on loopback for tests: uvicorn in a thread, or `routescan serve` as a process."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def uvicorn_thread(app, port: int | None = None, host: str = "127.0.0.1") -> Iterator[str]:
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def serve_process(
    *args: str, env: dict[str, str] | None = None, log: Path | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`routescan serve` in its own process, waited on until /readyz answers 200."""
    port = free_port()
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "routescan.cli.main", "serve", "--port", str(port), *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"routescan serve exited with {proc.returncode}")
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("routescan serve did not become ready")
            time.sleep(0.1)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if log:
            out.close()


def own_address() -> str | None:
    """This host's own non-loopback IPv4 address (a peer there is not loopback, yet the traffic
    never leaves the host), or None when it has none."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # a UDP connect picks the outgoing address; nothing is sent
        address = s.getsockname()[0]
        if not address.startswith("127."):
            return address
    return None


def service_settings(tmp_path: Path, **kw):
    """Settings of a test daemon whose audit store lives in ``tmp_path``."""
    from routescan.service.settings import ServiceSettings

    return ServiceSettings(db=tmp_path / "audit.sqlite3", **kw)


def score_body(trace) -> dict:
    """The /v1/score body of one trace, as a client sends it."""
    return {"trace": trace.model_dump(mode="json", exclude_none=True)}


def post_body(url: str, payload: dict, *, binary: bool = False, **kwargs):
    """POST a JSON-shaped payload as JSON, or as the binary wire (MessagePack) when ``binary``."""
    import httpx

    if not binary:
        return httpx.post(url, json=payload, **kwargs)
    from routescan.telemetry.wire import MEDIA_TYPE, packb

    headers = {"content-type": MEDIA_TYPE, **kwargs.pop("headers", {})}
    return httpx.post(url, content=packb(payload), headers=headers, **kwargs)


A_LAUNCH = {"kernel": "gemm", "layer": 0, "expert": 0, "grid": [2, 1, 1], "block": [4, 1, 1], "threads": 8}
