"""Shared CLI plumbing: one console, and errors shown as one clear line instead of a traceback."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from routescan.config import section_defaults

console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

# Errors whose message already says what was wrong and what to do.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError)


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
