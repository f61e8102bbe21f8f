"""Shared CLI plumbing: one console, and errors shown as one clear line instead of a traceback."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from routescan.config import section_defaults

console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

# Errors whose message already says what was wrong and what to do.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError)


SignalOption = Annotated[
    str | None,
    typer.Option(
        "--launch-model",
        "-l",
        help="The signal to read from the traces: a launch model (built-in: hf-eager, router, "
        "vllm-fused-moe, grouped-mm; or a YAML path) that turns their routed counts into kernel "
        "threads. Default: hf-eager for routed counts, the traces' own for measured ones (cupti).",
        envvar="ROUTESCAN_LAUNCH_MODEL",
        show_default=False,
    ),
]


def friendly_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except _USER_ERRORS as exc:
            if os.environ.get("ROUTESCAN_DEBUG"):
                raise
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


def defaults(file: str, section: str) -> dict[str, Any]:
    try:
        return section_defaults(file, section)
    except (OSError, ValueError):
        return {}


class ProgressLines:
    """Progress a log file can follow: a live bar on a terminal; elsewhere (backgrounded, piped,
    CI) a plain line every ``every_s`` seconds and at the end, with count, rate and time left."""

    def __init__(self, label: str, total: int | None, *, every_s: float = 30.0) -> None:
        self.label, self.total, self.every_s = label, total, every_s
        self.done = 0
        self.note = ""
        self._bar: Progress | None = None
        self._start = self._last = 0.0

    def __enter__(self) -> ProgressLines:
        self._start = self._last = time.monotonic()
        if console.is_terminal:
            columns = [TextColumn(self.label), BarColumn(), MofNCompleteColumn()]
            if self.total:
                columns.append(TimeRemainingColumn())
            self._bar = Progress(*columns, console=console, transient=True).__enter__()
            self._task = self._bar.add_task(self.label, total=self.total)
        return self

    def advance(self, n: int = 1, note: str | None = None) -> None:
        """Count ``n`` more items; ``note`` names the step now running (shown in the next line)."""
        self.done += n
        if note is not None:
            self.note = note
        if self._bar is not None:
            self._bar.advance(self._task, n)
        elif time.monotonic() - self._last >= self.every_s:
            self._line()

    def _line(self) -> None:
        self._last = now = time.monotonic()
        rate = self.done / max(now - self._start, 1e-9)
        text = f"{self.label}: {self.done:,}"
        if self.total:
            text += f"/{self.total:,} ({100 * self.done / self.total:.0f}%)"
        text += f", {rate * 60:,.1f}/min"
        if self.total and rate > 0:
            text += f", about {_duration((self.total - self.done) / rate)} left"
        if self.note:
            text += f" ({self.note})"
        console.print(text, highlight=False)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
        elif self.done:
            self._line()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
