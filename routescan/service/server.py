"""Run the daemon: load and check everything first (one clear line per problem), then serve.

On a Unix socket RouteScan binds the socket itself. uvicorn's own ``uds=`` mode chmods the socket
to 0666 after binding, and socket mode skips the bearer token, so any local user could read the
audit trail and post scores. Here the socket is born 0600 (umask), then given the configured mode
(default 0660) and group before it listens, and uvicorn is handed the file descriptor. An existing
path is unlinked only when it is a stale socket: a live daemon's socket, or anything that is not a
socket, is refused.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import uvicorn

from routescan.detector.artifact import Detector
from routescan.detector.artifact import detector_path as resolve_detector
from routescan.detector.scoring import resolve_operating_point
from routescan.service.app import create_app, open_store
from routescan.service.settings import ServiceSettings

log = logging.getLogger("routescan.service")


class SocketInUse(ValueError):
    """The socket path is taken: a live daemon listens there, or it is not a socket."""


def claim_socket_path(path: Path) -> None:
    """Make ``path`` free for a new socket: remove a stale socket, refuse anything else."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketInUse(
            f"{path} exists and is not a socket; RouteScan will not delete it: remove it yourself or "
            "choose another --uds path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # nobody listens: left behind by a killed daemon
        return
    except OSError as exc:
        raise SocketInUse(
            f"{path} is a socket that cannot be checked ({exc}); remove it if it is stale"
        ) from None
    finally:
        probe.close()
    raise SocketInUse(
        f"another process is listening on {path}; stop it first or choose another --uds path "
        "(taking over its socket would leave it running but unreachable)"
    )


def bind_unix_socket(path: Path, *, mode: int = 0o660, group: str | None = None) -> socket.socket:
    """A listening Unix socket at ``path`` with ``mode`` and ``group``, never wider in between."""
    path.parent.mkdir(parents=True, exist_ok=True)
    claim_socket_path(path)
    gid = -1
    if group is not None:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"uds_group: no group named {group!r} on this host") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the file is born 0600: no moment at which others can connect
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    try:
        if gid != -1:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
        sock.listen(2048)
    except OSError:
        sock.close()
        path.unlink(missing_ok=True)
        raise
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, saying so once it really listens."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[uvicorn.Server], None]) -> None:
        super().__init__(config)
        self._on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_ready(self)


def _where(server: uvicorn.Server, settings: ServiceSettings) -> str:
    if settings.uds is not None:
        return f"unix socket {settings.uds} (mode {settings.uds_mode:04o})"
    for srv in getattr(server, "servers", []):
        for sock in srv.sockets:
            host, port = sock.getsockname()[:2]
            return f"http://{host}:{port}"
    return f"http://{settings.host}:{settings.port}"


def serve(settings: ServiceSettings, *, say: Callable[[str], None]) -> None:
    """Check the settings, load the detector, open the store, then serve until stopped."""
    token = settings.token()
    if settings.uds is None and not settings.is_loopback() and not token:
        raise ValueError(
            f"refusing to listen on {settings.host} without an API token: set ROUTESCAN_API_TOKEN or "
            "--token-file (or bind 127.0.0.1)"
        )
    _log_to_stderr()
    detector_path = resolve_detector(settings.detector)
    say(f"routescan serve: loading detector {detector_path}")
    det = Detector.load(detector_path)
    det = settings.scoring_detector(det)
    card = det.card
    point = resolve_operating_point(card, name=settings.operating_point)
    say(
        f"detector {card.detector_id} {card.version}{' (DEMO)' if card.demo else ''} reads "
        f"{card.spec.model_id} / {card.spec.launch_model}; operating point {point.name} "
        f"(threshold {point.threshold:.4f})"
    )
    full_note = ""
    if det.export.level == "full" and not settings.local_only():
        full_note = (
            "; full records from other hosts are ACCEPTED (allow_full_from_network)"
            if settings.allow_full_from_network
            else "; full records from other hosts are refused (403): agents there must send a reduced level"
        )
    say(f"export level {det.export.describe()}{full_note}")
    store = open_store(settings)
    auth = "bearer token" if token else "off (loopback or socket only)"
    say(f"audit store {store.location}; auth {auth}")
    app = create_app(settings, detector=det, store=store)
    sock, inode = None, 0
    try:
        if settings.uds is not None:
            sock = bind_unix_socket(settings.uds, mode=settings.uds_mode, group=settings.uds_group)
            inode = settings.uds.lstat().st_ino
            config = uvicorn.Config(app, fd=sock.fileno(), access_log=settings.access_log, log_level="info")
        else:
            config = uvicorn.Config(
                app, host=settings.host, port=settings.port, access_log=settings.access_log, log_level="info"
            )
        server = _Server(config, on_ready=lambda s: say(f"ready: scoring on {_where(s, settings)}"))
        server.run()
    finally:
        store.close()
        if sock is not None and settings.uds is not None:
            sock.close()
            _remove_own_socket(settings.uds, inode)


def _remove_own_socket(path: Path, inode: int) -> None:
    """Unlink the socket file on exit if it is still the one this daemon bound."""
    with contextlib.suppress(OSError):
        if path.lstat().st_ino == inode:
            path.unlink()


def _log_to_stderr() -> None:
    """RouteScan's own log lines (store errors, refusals) go to stderr beside uvicorn's."""
    logger = logging.getLogger("routescan")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
