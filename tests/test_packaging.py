"""
Tests of the built wheel: it carries the twistd plugin drop-ins and the
console script, and a fresh virtual environment with it installed lists
``securerpc`` in ``twistd --help``.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build netrpc's wheel from this checkout, without its dependencies."""
    output = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
         "--wheel-dir", str(output), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = output.glob("netrpc-*.whl")
    return built


def test_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())

    assert "twisted/plugins/securerpc.py" in names
    assert "twisted/plugins/netrpc_endpoints.py" in names
    # An __init__.py there would hide Twisted's own plugins package.
    assert "twisted/plugins/__init__.py" not in names
    assert "netrpc/py.typed" in names
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "netrpc = netrpc.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_fresh_venv_lists_plugin(wheel: Path, tmp_path: Path) -> None:
    """A new virtual environment with only the wheel (dependencies borrowed) finds the plugin."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )

    # The dependencies come from this test run's environment, but not the
    # checkout: a .pth line adds a folder without reading the .pth files in it.
    fresh_site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout.strip()
    )
    (fresh_site / "borrowed-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")

    located = subprocess.run(
        [str(python), "-c", "import netrpc; print(netrpc.__file__)"],
        check=True, capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )
    twistd_help = subprocess.run(
        [str(python), "-c", "from twisted.scripts.twistd import run; run()", "--help"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )

    assert located.stdout.startswith(str(fresh_site))
    assert "securerpc" in twistd_help.stdout
    assert "mutual TLS" in twistd_help.stdout
