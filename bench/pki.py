"""
The certificates of one benchmark run, made with netrpc's own CA library.

Every system under test uses the same files: a server certificate for
``localhost`` and ``127.0.0.1`` signed by the server CA, and one client
certificate signed by the client CA. P-256 is the default key type;
RSA-4096 is there for the rows that show what slow keys cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from netrpc.certs import PKI, KeyType

CLIENT_NAME = "bench"
SERVER_NAMES = ("localhost", "127.0.0.1")

# The name on the command line of every bench process, and its key type.
KEY_TYPES = {"p256": KeyType.EC_P256, "rsa4096": KeyType.RSA_4096}


@dataclass(frozen=True)
class BenchPKI:
    """The paths one benchmark process needs, for one key type."""

    directory: Path

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def server_ca(self) -> Path:
        return self.directory / "server-ca.crt"

    @property
    def client_ca(self) -> Path:
        return self.directory / "client-ca.crt"

    @property
    def client_cert(self) -> Path:
        return self.directory / "clients" / f"{CLIENT_NAME}.crt"

    @property
    def client_key(self) -> Path:
        return self.directory / "clients" / f"{CLIENT_NAME}.key"


def create(parent: Path, keys: str) -> BenchPKI:
    """Create a PKI with ``keys`` ("p256" or "rsa4096") under ``parent``."""
    key_type = KEY_TYPES[keys]
    pki = PKI.create(parent / keys, list(SERVER_NAMES), key_type=key_type)
    pki.issue_client(CLIENT_NAME, key_type=key_type)
    return BenchPKI(pki.directory)
