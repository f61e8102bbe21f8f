"""The daemon's scoring path: parse -> check -> featurise -> score (CPU, off the event loop when the
body is large) -> record in the audit store -> acknowledge, count, alert.

Validation errors keep their field path and reason and drop their input value, since a refused
value may be the very text being refused; a refused key is shown only when it is a short
identifier.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import re
import time
from collections.abc import Sequence
from typing import Any, TypeVar

import anyio
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from routescan.detector.scoring import Scored, Scorer
from routescan.service.alerts import AlertSender
from routescan.service.metrics import Metrics
from routescan.service.schemas import BatchRequest, ScoreRequest, ScoreResult
from routescan.service.settings import ServiceSettings
from routescan.service.store import AuditRecord, AuditStore
from routescan.telemetry.schema import ExportLevel
from routescan.telemetry.wire import WireError, unpackb

M = TypeVar("M", bound=BaseModel)
MAX_ERRORS = 20
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_.\-]{1,32}$")


class BatchTooLarge(ValueError):
    """More items than ``max_batch``."""


class FullFromNetwork(PermissionError):
    """A full-level record (a trace, a full fingerprint) from a peer that is not on this host."""


def safe_loc(loc: Sequence[Any]) -> list[str | int]:
    """A validation error's location with refused keys masked: a dict key that failed its own
    pattern (pydantic marks it with a following ``[key]``) always, any other key unless it is a
    short identifier (field names such as ``prompt`` stay readable)."""
    out: list[str | int] = []
    parts = list(loc)
    for i, part in enumerate(parts):
        refused_key = i + 1 < len(parts) and parts[i + 1] == "[key]"
        if isinstance(part, int):
            out.append(part)
        elif _SAFE_KEY.match(str(part)) and not refused_key:
            out.append(str(part))
        else:
            out.append(f"<refused key of {len(str(part))} characters>")
    return out


def why(error: dict[str, Any]) -> dict[str, Any]:
    """A validation error without its input value."""
    loc = safe_loc(error.get("loc", ()))
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        msg = (
            f"unknown field '{loc[-1] if loc else '?'}' is not accepted: RouteScan takes telemetry "
            "(traces or fingerprints) only, never text or other fields"
        )
    elif kind == "json_invalid":
        msg = "the body is not valid JSON"
    else:
        msg = str(error.get("msg", "invalid value"))
    return {"loc": loc, "type": kind, "msg": msg}


def refused(exc: ValidationError, prefix: tuple[str, ...] = ("body",)) -> RequestValidationError:
    """The first :data:`MAX_ERRORS` errors, sanitised (a flood of unknown fields stays cheap to answer)."""
    errors = exc.errors(include_input=False, include_url=False, include_context=False)[:MAX_ERRORS]
    return RequestValidationError([why({**e, "loc": (*prefix, *e["loc"])}) for e in errors])


MAX_FIELDS = 64  # per JSON object: a trace has 19 fields, a launch 10, labels at most 16
MAX_KEY_CHARS = 64


def check_structure(body: bytes) -> None:
    """Refuse a body whose objects have more fields, or longer keys, than any RouteScan object.

    pydantic-core validates a flood of unknown fields by building one error per field while holding
    the GIL (600k fields: ~3 s in which no other thread, the event loop included, runs). The C JSON
    parser with a per-object hook that only counts (it builds nothing) finds the flood first, at
    about a tenth of validation's cost on a valid body.
    """
    try:
        json.loads(body, object_pairs_hook=_count_fields)
    except _Structure as exc:
        raise _structural(str(exc)) from None
    except ValueError:
        return  # not JSON (or not UTF-8): the validator says so


class _Structure(Exception):
    """Not a ValueError, so it cannot be mistaken for the parser's own errors."""


def _count_fields(pairs: list[tuple[str, Any]]) -> None:
    if len(pairs) > MAX_FIELDS:
        raise _Structure(f"an object has {len(pairs)} fields; RouteScan's objects have at most {MAX_FIELDS}")
    for key, _ in pairs:
        if len(key) > MAX_KEY_CHARS:
            raise _Structure(f"a key is over {MAX_KEY_CHARS} characters, longer than any RouteScan field")


def _structural(msg: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ["body"], "type": "structure", "msg": msg}])


def parse(body: bytes, model: type[M], *, binary: bool = False) -> M:
    """Validate a raw body: JSON in pydantic-core (Rust parsing, no Python dict in between), or the
    binary wire decoded (bounded) and validated by the same model."""
    try:
        if binary:
            try:
                decoded = unpackb(body)
            except WireError as exc:
                raise _structural(str(exc)) from None
            return model.model_validate(decoded)
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise refused(exc) from None


class ScoringService:
    """A scorer, the audit store it records into, its metrics and alerts."""

    def __init__(
        self,
        scorer: Scorer,
        store: AuditStore,
        metrics: Metrics,
        settings: ServiceSettings,
        alerts: AlertSender | None = None,
    ) -> None:
        self.scorer = scorer
        self.store = store
        self.metrics = metrics
        self.settings = settings
        self.alerts = alerts
        self._limiter = anyio.CapacityLimiter(settings.parse_threads)

    def evaluate(
        self, body: bytes, batch: bool, large: bool, binary: bool = False, local: bool = True
    ) -> list[Scored]:
        """CPU work of one request: parse, check, featurise, score (a large JSON body is first
        checked for field floods, which pydantic-core would otherwise spend seconds refusing; the
        binary decoder bounds maps itself)."""
        if large and not binary:
            check_structure(body)
        items: list[ScoreRequest]
        if batch:
            items = parse(body, BatchRequest, binary=binary).items
            if len(items) > self.settings.max_batch:
                raise BatchTooLarge(f"{len(items)} items, over max_batch={self.settings.max_batch}")
        else:
            items = [parse(body, ScoreRequest, binary=binary)]
        inputs = [i.trace if i.trace is not None else i.fingerprint for i in items]
        if not local and not self.settings.allow_full_from_network:
            full = [n for n, item in enumerate(inputs) if item.export_level == ExportLevel.full]  # type: ignore[union-attr]
            if full:
                where = f"item {full[0]} is" if batch else "this is"
                raise FullFromNetwork(
                    f"{where} a full-level record (a trace or full fingerprint: nearly the prompt, "
                    "docs/privacy.md) from a peer that is not on this host; send a reduced level "
                    "(ROUTESCAN_EXPORT_LEVEL on the agent) or, to accept it anyway, set "
                    "allow_full_from_network: true on this daemon"
                )
        return self.scorer.score(inputs)  # type: ignore[arg-type]

    async def score(
        self, body: bytes, *, batch: bool, binary: bool = False, replay: bool = False, local: bool = True
    ) -> tuple[list[ScoreResult], float]:
        """Score a request body and record every result before acknowledging any.

        ``replay``: an agent replaying its spool; traces this detector has already recorded (the
        batch reached the store before its connection broke) are answered but not recorded again.

        A body up to ``inline_parse_bytes`` is parsed and scored on the event loop: that work
        (tens of microseconds for a trace) costs less than the hop to a worker thread. A bigger one
        goes to a worker thread, so probes and small requests are answered while it is scored."""
        start = time.perf_counter()
        if len(body) <= self.settings.inline_parse_bytes:
            scored = self.evaluate(body, batch, large=False, binary=binary, local=local)
        else:  # a big body would hold the event loop (and every probe) for its whole parse
            scored = await anyio.to_thread.run_sync(
                functools.partial(self.evaluate, body, batch, large=True, binary=binary, local=local),
                limiter=self._limiter,
            )
        card, point, now = self.scorer.card, self.scorer.point, time.time()
        fresh = scored
        if replay and scored:
            ids = [s.trace_id for s in scored]
            seen = await anyio.to_thread.run_sync(
                functools.partial(self.store.recorded, ids, detector_id=card.detector_id)
            )
            fresh = [s for s in scored if (s.trace_id, s.model_id) not in seen]
        records = [
            AuditRecord(
                s.trace_id, s.model_id, s.score, s.label, card.detector_id, card.version, point.name, now
            )
            for s in fresh
        ]
        await asyncio.wrap_future(self.store.submit(records))  # acknowledged only once committed
        latency_ms = (time.perf_counter() - start) * 1e3
        # Every value here was validated on the way in (ids by the trace schema, scores by the
        # scorer's finiteness check), so the results are constructed, not validated again.
        results = [
            ScoreResult.model_construct(
                trace_id=s.trace_id,
                model_id=s.model_id,
                score=s.score,
                label=s.label,
                threshold=point.threshold,
                operating_point=point.name,
                detector_id=card.detector_id,
                detector_version=card.version,
                demo_detector=card.demo,
                latency_ms=latency_ms,
            )
            for s in scored
        ]
        # metrics and alerts count what was recorded now, not a replayed copy of what already was
        if fresh is not scored:
            kept = {id(s) for s in fresh}
            self._count([r for r, s in zip(results, scored, strict=True) if id(s) in kept])
        else:
            self._count(results)
        return results, latency_ms

    def _count(self, results: list[ScoreResult]) -> None:
        """Metrics and alerts: one counter update per (model, label) of the batch, not per result."""
        tally = collections.Counter((r.model_id, r.label) for r in results)
        for (model_id, label), n in tally.items():
            self.metrics.scored.labels(model_id=model_id, label=label).inc(n)
            if label == "flagged":
                self.metrics.flagged.labels(model_id=model_id).inc(n)
        histograms = {m: self.metrics.scores.labels(model_id=m) for m, _ in tally}
        for result in results:
            histograms[result.model_id].observe(result.score)
            if result.label == "flagged" and self.alerts is not None:
                self.alerts.send(result.model_dump(mode="json"))
