"""Ship traces from the serving process to the `routescan serve` daemon without ever blocking it.

``submit`` puts an item on a bounded in-memory queue and returns at once (a full queue drops the
item and counts it: serving latency comes first). A background thread batches items, builds their
traces (off the forward path), and posts them to the daemon's ``/v1/score/batch`` over a Unix domain
socket or loopback HTTP, in the binary wire form (MessagePack, :mod:`routescan.telemetry.wire`).
When the daemon is unreachable, batches are appended to a local spool file (JSONL, fsynced) and
replayed, oldest first, once it answers again, marked as a replay: the daemon records only the
traces of a replayed batch that its audit store does not hold yet, so a batch stored just before its
connection broke is not recorded twice.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx
import msgpack

from routescan.features.fingerprint import FINGERPRINT_SCHEMA, Fingerprint
from routescan.service.schemas import AGENT_HEADER, COUNTERS_HEADER, REPLAY_HEADER
from routescan.telemetry.io import trace_json
from routescan.telemetry.schema import ExportLevel, RequestTrace
from routescan.telemetry.wire import MEDIA_TYPE, packb, trace_payload, unpackb

Item = RequestTrace | Callable[[], RequestTrace]


class Reducer(Protocol):
    """Traces -> records of a reduced export level (:class:`routescan.detector.exporter.Exporter`)."""

    level: ExportLevel

    def records(self, traces: Sequence[RequestTrace]) -> list[Fingerprint]: ...


@dataclass
class SenderCounters:
    submitted: int = 0
    sent: int = 0
    dropped: int = 0  # queue full: never reached the daemon
    spooled: int = 0
    replayed: int = 0
    rejected: int = 0  # the daemon refused them (wrong model / spec): retrying cannot help
    build_errors: int = 0
    # Microseconds: wall time the vLLM plugin added on the serving thread after each step's forward
    # (step_us), those forwards' own wall time (forward_us, for the ratio), and CPU time of this
    # sender's thread (building, serialising, posting: sender_us). The daemon exports them as
    # routescan_agent_seconds, so the agent's cost is read beside the work it rides on.
    step_us: int = 0
    forward_us: int = 0
    sender_us: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


# a one-entry map and its key, no value: what wraps each packed record of a batch
_ITEM_HEAD = {kind: msgpack.packb({kind: None})[:-1] for kind in ("trace", "fingerprint")}
_FINGERPRINT_LINE = '{"schema_version":"' + FINGERPRINT_SCHEMA


def _msgpack_batch(records: list[bytes], kind: str = "trace") -> bytes:
    """``{"items": [{kind: r}, ...]}`` from records already packed, without unpacking them."""
    packer = msgpack.Packer()
    head = packer.pack_map_header(1) + packer.pack("items") + packer.pack_array_header(len(records))
    return head + b"".join(_ITEM_HEAD[kind] + r for r in records)


def _json_item(line: str) -> str:
    """A spooled JSON record as a batch item: a fingerprint line (a reduced export level) or a trace."""
    return ('{"fingerprint":' if line.startswith(_FINGERPRINT_LINE) else '{"trace":') + line + "}"


def agent_id() -> str:
    """This sender's name in the daemon's metrics: host and process, in the id character set."""
    raw = f"{socket.gethostname()}-{os.getpid()}"
    return re.sub(r"[^A-Za-z0-9._:\-]", "_", raw)[-64:]


def _client(target: str, token: str | None, timeout: float) -> tuple[httpx.Client, str]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    headers[AGENT_HEADER] = agent_id()
    if target.startswith("unix://"):
        transport = httpx.HTTPTransport(uds=target.removeprefix("unix://"))
        return httpx.Client(transport=transport, timeout=timeout, headers=headers), "http://routescan"
    if target.startswith(("http://", "https://")):
        return httpx.Client(timeout=timeout, headers=headers), target.rstrip("/")
    raise ValueError(f"daemon address {target!r}: use unix:///path/to.sock or http://127.0.0.1:PORT")


SPOOL_MODE = 0o600


def default_spool_path() -> Path:
    """The serving user's state directory (never a shared /tmp)."""
    from platformdirs import user_state_dir

    return Path(user_state_dir("routescan")) / "spool.jsonl"


class TraceSender:
    """Bounded queue + background sender + spool. Thread-safe ``submit``; ``close`` drains."""

    def __init__(
        self,
        target: str,
        *,
        spool: str | Path,
        queue_size: int = 10_000,
        batch_max: int = 64,
        flush_interval_s: float = 0.05,
        retry_interval_s: float = 1.0,
        timeout_s: float = 5.0,
        token: str | None = None,
        trace_file: str | Path | None = None,
        exporter: Reducer | None = None,
    ) -> None:
        self.target = target
        # a reduced export level: each batch of traces becomes that level's fingerprints before it
        # leaves the process, and only those are sent or spooled (the tee keeps full traces, on host)
        self.exporter = exporter if exporter is not None and exporter.level != ExportLevel.full else None
        self._kind = "fingerprint" if self.exporter is not None else "trace"
        self.spool = Path(spool)
        # traces are sensitive metadata (docs/privacy.md): the spool is the serving user's alone
        self.spool.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.batch_max = batch_max
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
        self.counters = SenderCounters()
        self._queue: queue.Queue[Item] = queue.Queue(maxsize=queue_size)
        # an optional copy of every trace on the serving host's disk (ROUTESCAN_TRACE_FILE): the same
        # JSONL trace file `routescan collect` writes, for collecting from live traffic
        self._tee = None
        if trace_file is not None:
            path = Path(trace_file)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, SPOOL_MODE)
            self._tee = os.fdopen(fd, "a", encoding="utf-8")
        self._client, self._base = _client(target, token, timeout_s)
        self._stop = threading.Event()
        self._down_until = 0.0
        self._thread = threading.Thread(target=self._run, name="routescan-sender", daemon=True)
        self._thread.start()

    # -- producer side (serving thread) ----------------------------------------------------------
    def submit(self, item: Item) -> bool:
        self.counters.submitted += 1
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            self.counters.dropped += 1
            return False

    def close(self, timeout_s: float = 30.0) -> None:
        """Send (or spool) everything queued, then stop the thread."""
        self._stop.set()
        self._thread.join(timeout=timeout_s)
        self._client.close()
        if self._tee is not None:
            self._tee.close()

    def pending_spool(self) -> int:
        """Traces waiting on disk: the spool plus a replay the daemon interrupted."""
        total = 0
        for path in (self._replaying, self.spool):
            if path.exists():
                with path.open("rb") as fh:
                    total += sum(1 for line in fh if line.strip())
        return total

    # -- sender thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch:
                started = time.thread_time_ns()
                self._deliver(batch)
                self.counters.sender_us += (time.thread_time_ns() - started) // 1000
            elif self._stop.is_set():
                break
            if not self._down() and self._backlog():
                self._replay()

    def _take(self) -> list[bytes]:
        """Up to ``batch_max`` records, built and serialised (MessagePack) at once: traces, or the
        export level's fingerprints of them.

        Only bytes are kept: bytes are not tracked by the cyclic garbage collector, whereas
        a batch of live trace objects (hundreds of launches each) waiting out the flush interval
        gets promoted to the oldest generation and triggers full collections of the host process's
        whole heap, ~200 ms pauses of the serving thread (measured with scripts/bench_agent.py).
        """
        items: list[bytes] = []
        traces: list[RequestTrace] = []
        deadline = time.monotonic() + self.flush_interval_s
        while len(items) + len(traces) < self.batch_max:
            wait = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=max(wait, 0.0)) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            started = time.thread_time_ns()
            try:
                trace = item() if callable(item) else item
                if self.exporter is None:
                    items.append(packb(trace_payload(trace)))
                else:
                    traces.append(trace)
            except Exception:  # a bad trace must not kill the sender; counted, visible in metrics
                self.counters.build_errors += 1
                continue
            if self._tee is not None:
                self._tee.write(trace_json(trace) + "\n")
            self.counters.sender_us += (time.thread_time_ns() - started) // 1000
        if traces:
            started = time.thread_time_ns()
            items.extend(self._reduced(traces))
            self.counters.sender_us += (time.thread_time_ns() - started) // 1000
        if self._tee is not None and (items or traces):
            self._tee.flush()
        return items

    def _reduced(self, traces: list[RequestTrace]) -> list[bytes]:
        """The export level's records of a batch, packed; one pass for the batch, and item by item
        only when the batch fails (so one bad trace costs itself, not its batch)."""
        assert self.exporter is not None
        try:
            records = self.exporter.records(traces)
        except Exception:
            records = []
            for trace in traces:
                try:
                    records.extend(self.exporter.records([trace]))
                except Exception:
                    self.counters.build_errors += 1
        return [packb(r.model_dump(mode="python", exclude_none=True)) for r in records]

    def _down(self) -> bool:
        return time.monotonic() < self._down_until

    def _post(self, traces: list[bytes] | list[str], *, replay: bool = False) -> str:
        """Post serialised traces (MessagePack bytes, or JSON text from the spool): 'ok', 'rejected'
        (the daemon will never take these) or 'down'.

        The daemon validates every trace against the schema, so nothing is re-validated here."""
        if traces and isinstance(traces[0], bytes):
            content, media = _msgpack_batch(traces, self._kind), MEDIA_TYPE  # type: ignore[arg-type]
        else:
            content = '{"items":[' + ",".join(_json_item(t) for t in traces) + "]}"  # type: ignore[arg-type]
            media = "application/json"
        try:
            counters = ",".join(f"{k}={v}" for k, v in self.counters.as_dict().items())
            # the agent's own health rides along, so the daemon's /metrics shows spooled / dropped
            headers = {"content-type": media, COUNTERS_HEADER: counters}
            if replay:
                # a spooled batch may have reached the audit store before its connection broke: the
                # daemon records only the traces it has not recorded yet, so a replay never duplicates
                headers[REPLAY_HEADER] = "1"
            resp = self._client.post(f"{self._base}/v1/score/batch", content=content, headers=headers)
        except httpx.HTTPError:
            return "down"
        if resp.status_code == 200:
            return "ok"
        if resp.status_code in (409, 413, 422):
            return "rejected"
        return "down"  # 5xx, 503 while starting: try again later

    def _deliver(self, traces: list[bytes]) -> None:
        status = "down" if self._down() else self._post(traces)
        if status == "ok":
            self.counters.sent += len(traces)
        elif status == "rejected":
            self.counters.rejected += len(traces)
        else:
            self._down_until = time.monotonic() + self.retry_interval_s
            # the spool is JSONL of what is sent: traces, or a reduced level's fingerprints
            self._append_spool([self._spool_line(t) for t in traces])

    def _spool_line(self, packed: bytes) -> str:
        if self._kind == "fingerprint":
            return Fingerprint.model_validate(unpackb(packed)).model_dump_json(exclude_none=True)
        return trace_json(RequestTrace.model_validate(unpackb(packed)))

    def _append_spool(self, traces: list[str]) -> None:
        with os.fdopen(os.open(self.spool, os.O_WRONLY | os.O_APPEND | os.O_CREAT, SPOOL_MODE), "a") as fh:
            for t in traces:
                fh.write(t + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.counters.spooled += len(traces)

    @property
    def _replaying(self) -> Path:
        # still a trace file (spool.replaying.jsonl), so `routescan score` can read it by hand
        return self.spool.with_name(f"{self.spool.stem}.replaying{self.spool.suffix}")

    def _backlog(self) -> bool:
        return self._replaying.exists() or self.spool.exists()

    def _reachable(self) -> bool:
        try:
            return self._client.get(f"{self._base}/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def _replay(self) -> None:
        """Send the backlog oldest first; what fails stays spooled, in order.

        The backlog is moved aside (``<spool>.replaying.jsonl``) so new spooling never races the
        replay, and it is streamed a batch at a time. While the daemon is down this costs one
        health probe per retry interval: the file is neither read nor rewritten, because a serving
        process must not stall on a spool that grew while the daemon was away.
        """
        replaying = self._replaying
        if not replaying.exists():
            os.replace(self.spool, replaying)
        if not self._reachable():
            self._down_until = time.monotonic() + self.retry_interval_s
            return
        delivered = 0
        rest: list[str] = []
        with replaying.open(encoding="utf-8") as fh:
            lines = (line for line in fh if line.strip())
            while chunk := list(itertools.islice(lines, self.batch_max)):
                # a line torn by a crash mid-append would make the daemon refuse its whole batch
                whole = [line.strip() for line in chunk if _is_json(line)]
                status = self._post(whole, replay=True) if whole else "ok"
                if status == "down":
                    self._down_until = time.monotonic() + self.retry_interval_s
                    rest = chunk + list(lines)
                    break
                # counted once the chunk is consumed, so a retry of the same chunk does not recount it
                self.counters.rejected += len(chunk) - len(whole)
                if status == "ok":
                    self.counters.replayed += len(whole)
                else:
                    self.counters.rejected += len(whole)
                delivered += len(chunk)
        if not rest:
            replaying.unlink()
        elif delivered:
            # drop what was delivered; the tail keeps its place ahead of anything spooled since
            tmp = replaying.with_name(replaying.name + ".tmp")
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SPOOL_MODE), "w") as fh:
                fh.write("".join(rest))
            os.replace(tmp, replaying)
