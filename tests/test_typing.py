"""
Tests that netrpc's annotations hold: ``py.typed`` makes them a promise to
users, so the package must pass mypy in strict mode with the settings in
``setup.cfg``.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None,
    reason="mypy is not installed; install the test extra: pip install -e '.[test]'",
)
def test_mypy_strict(tmp_path: Path) -> None:
    """mypy, configured by the [mypy] section of setup.cfg, finds no error in netrpc/."""
    # A fresh cache keeps results from an older checkout out of the verdict.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy-cache")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, f"mypy failed:\n{result.stdout}{result.stderr}"
