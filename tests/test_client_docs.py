"""
The examples of docs/client.md, run against a real daemon on loopback: every
Python and shell block, and the batch file with the output the page shows.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from netrpc.certs import PKI
from tests.daemon_process import DaemonProcess
from tests.service_user import privilege_arguments

pytestmark = pytest.mark.e2e

PAGE = Path(__file__).resolve().parent.parent / "docs" / "client.md"
TEXT = PAGE.read_text()
BLOCKS = re.findall(r"```(python|sh)\n(.*?)```", TEXT, re.S)
BATCH_FILE = re.search(r"```\n(# multiply, then echo.*?)```", TEXT, re.S)
BATCH_OUTPUT = re.search(r"The calls go in one JSON-RPC batch.*?```\n(.*?)```", TEXT, re.S)
# Upper bound for one example, in seconds.
WAIT = 60


@pytest.fixture(scope="module")
def port(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    daemon = DaemonProcess(
        ["--pki", str(pki.directory), "--listen", "mtls:port=0:interface=127.0.0.1", *privilege_arguments()],
        cwd=tmp_path_factory.mktemp("daemon"),
    )
    try:
        yield daemon.wait_for_port()
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def folder(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder laid out as the examples expect: alice's files and certs/dev with client demo."""
    work = tmp_path_factory.mktemp("examples")
    for source in (pki.client_cert("alice"), pki.client_key("alice"), pki.server_ca_cert):
        shutil.copy2(source, work / source.name)
    dev = work / "certs" / "dev"
    shutil.copytree(pki.directory, dev)
    PKI(dev).issue_client("demo")
    return work


def run(kind: str, code: str, folder: Path, port: int) -> subprocess.CompletedProcess[str]:
    """Run one example with the documented host names and port pointed at the test daemon."""
    code = re.sub(r"rpc\d?\.example\.org", "localhost", code).replace("8700", str(port))
    environment = {key: value for key, value in os.environ.items() if not key.startswith("NETRPC_")}
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    command = [sys.executable, "-c", code] if kind == "python" else ["bash", "-euo", "pipefail", "-c", code]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=WAIT, env=environment)


def test_blocks_found() -> None:
    assert [kind for kind, _ in BLOCKS] == ["python", "python", "python", "python", "sh", "sh", "sh"]


@pytest.mark.parametrize(("kind", "code"), BLOCKS, ids=[f"{kind}-{n}" for n, (kind, _) in enumerate(BLOCKS)])
def test_example(kind: str, code: str, folder: Path, port: int) -> None:
    result = run(kind, code, folder, port)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "42"


def test_batch_file(folder: Path, port: int) -> None:
    assert BATCH_FILE is not None
    assert BATCH_OUTPUT is not None
    (folder / "calls.txt").write_text(BATCH_FILE[1])
    command = "netrpc call --server localhost:8700 --pki certs/dev --name demo --batch calls.txt"
    result = run("sh", command, folder, port)

    assert result.returncode == 1
    assert result.stdout == BATCH_OUTPUT[1]
