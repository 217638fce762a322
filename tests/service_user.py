"""
Files that a daemon under test can read again after it has dropped root.

When the tests run as root, the daemon switches to ``nobody`` after binding
its ports, and a reload re-reads the key and the config file as ``nobody``.
``ServiceFiles`` keeps a PKI copy and a config file in a folder under
``/tmp`` owned by that user, and hands every file back to it after a test
has changed the PKI as root. Without root, the daemon runs as the current
user and the folder needs no change of owner.
"""

from __future__ import annotations

import atexit
import functools
import os
import pwd
import shutil
import tempfile
from pathlib import Path

from netrpc.blocking import Client
from netrpc.certs import PKI

IS_ROOT = os.geteuid() == 0
# nobody exists on every Debian-like system.
SERVICE_USER = "nobody"
TESTS_DIRECTORY = Path(__file__).resolve().parent
_SERVICE_MODULES = ("compute_service.py", "fault_service.py")


@functools.cache
def service_modules_directory() -> Path:
    """
    Return a folder that every user may read, holding copies of the test
    service modules, for the daemon's ``PYTHONPATH``.

    As root, the daemon imports services after switching to ``nobody``, and
    the checkout may lie under a folder only root may enter, such as a
    fresh clone in a ``mktemp -d`` folder.
    """
    folder = Path(tempfile.mkdtemp(prefix="netrpc-services-"))
    folder.chmod(0o755)
    for name in _SERVICE_MODULES:
        shutil.copyfile(TESTS_DIRECTORY / name, folder / name)
        (folder / name).chmod(0o644)
    atexit.register(shutil.rmtree, folder, True)
    return folder


def service_python_path() -> str:
    """Return ``PYTHONPATH`` for a daemon that serves the test service modules."""
    paths = [str(service_modules_directory()), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(path for path in paths if path)


def privilege_arguments() -> list[str]:
    """Return the options that make the daemon drop root, when the tests run as root."""
    return ["--user", SERVICE_USER] if IS_ROOT else []


class ServiceFiles:
    """A folder, readable by the daemon's user, with a copy of ``pki`` and a config file."""

    def __init__(self, pki: PKI) -> None:
        # pytest's tmp_path lies under a folder only root may enter.
        self.directory = Path(tempfile.mkdtemp(prefix="netrpc-service-"))
        self.pki = PKI(self.directory / "pki")
        shutil.copytree(pki.directory, self.pki.directory)
        self.config = self.directory / "securerpc.toml"
        self.config.write_text("")
        self.hand_over()

    def write_config(self, text: str) -> None:
        """Replace the config file and give it to the daemon's user."""
        self.config.write_text(text)
        self.hand_over()

    def hand_over(self) -> None:
        """Make the daemon's user the owner of every file, after the test changed some as root."""
        if not IS_ROOT:
            return
        user = pwd.getpwnam(SERVICE_USER)
        for root, folders, files in os.walk(self.directory):
            os.chown(root, user.pw_uid, user.pw_gid)
            for name in (*folders, *files):
                os.chown(os.path.join(root, name), user.pw_uid, user.pw_gid, follow_symlinks=False)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def client_for(pki: PKI, port: int, name: str) -> Client:
    """Return a blocking client for client ``name`` of ``pki``, calling localhost on ``port``."""
    return Client(
        "localhost", port, cert=pki.client_cert(name), key=pki.client_key(name), ca=pki.server_ca_cert, timeout=10
    )
