"""How ``manidp-bench`` reports problems: usage errors, skipped methods, warnings."""

from __future__ import annotations

import sys

__all__ = ["PROG", "BenchError", "SkipMethod", "MethodFailed", "short_error", "warn", "error"]

PROG = "manidp-bench"


class BenchError(Exception):
    """A usage error: reported as one line on stderr, exit status 2."""


class SkipMethod(Exception):
    """A method cannot run here; the reason goes into the report."""


class MethodFailed(Exception):
    """A method failed with a reason already worded for the report (e.g. by its child process)."""


def short_error(e: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters of it)."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


def warn(msg: str) -> None:
    print(f"{PROG}: warning: {msg}", file=sys.stderr)


def error(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
