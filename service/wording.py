"""Counts in sentences people read: "1 job is running", "2 jobs are running"."""

from __future__ import annotations

__all__ = ["plural", "is_are", "running_count"]


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``n`` and the noun, plural unless ``n`` is 1 (``nouns``, else the noun and an s)."""
    return f"{n} {noun}" if n == 1 else f"{n} {nouns or noun + 's'}"


def is_are(n: int) -> str:
    return "is" if n == 1 else "are"


def running_count(n: int, noun: str) -> str:
    return f"{plural(n, noun)} {is_are(n)} running"
