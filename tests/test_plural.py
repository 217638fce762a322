"""Tests for netrpc._plural: counted nouns in messages."""

from __future__ import annotations

import pytest

from netrpc._plural import plural


@pytest.mark.parametrize(
    ("count", "expected"),
    [(0, "0 rules"), (1, "1 rule"), (2, "2 rules"), (1.0, "1 rule"), (2.5, "2.5 rules"), (1_000_000, "1000000 rules")],
)
def test_regular(count: float, expected: str) -> None:
    assert plural(count, "rule") == expected


def test_irregular() -> None:
    assert plural(1, "batch", "batches") == "1 batch"
    assert plural(3, "batch", "batches") == "3 batches"
