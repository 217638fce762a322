"""Counted nouns for messages and log lines: "1 rule", "2 rules"."""

from __future__ import annotations

__all__ = ["plural"]


def plural(count: float, noun: str, plural_noun: str | None = None) -> str:
    """
    Return ``count`` followed by ``noun``, or by its plural unless ``count`` is 1.

    The plural is ``noun`` plus "s" unless ``plural_noun`` gives another form.
    A float count is written with ``:g``, so 1.0 reads "1 second" and 2.5
    reads "2.5 seconds".
    """
    number = f"{count:g}" if isinstance(count, float) else str(count)
    if count == 1:
        return f"{number} {noun}"
    return f"{number} {plural_noun or noun + 's'}"
