"""
Shared fixtures: PKIs made by netrpc's own CA library, and the unusual
client certificates that TLS tests use as negative controls.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cryptography
import OpenSSL
import pytest
import twisted
from OpenSSL import SSL

from netrpc.certs import PKI, IssuedCertificate, Usage, self_signed_certificate
from tests.service_user import ServiceFiles

SERVER_NAMES = ("localhost", "127.0.0.1")


def pytest_report_header() -> list[str]:
    """Print the TLS stack versions, because handshake results depend on them."""
    openssl = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    return [
        f"OpenSSL: {openssl} (pyOpenSSL), {ssl.OPENSSL_VERSION} (stdlib ssl)",
        f"pyOpenSSL: {OpenSSL.__version__}, cryptography: {cryptography.__version__}, "
        f"Twisted: {twisted.__version__}",
    ]


@dataclass(frozen=True)
class CertPair:
    """Paths of a PEM certificate and its unencrypted private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class BadClientCerts:
    """Client certificates that a server verifying against ``pki`` must reject."""

    expired: CertPair
    not_yet_valid: CertPair
    self_signed: CertPair
    from_server_ca: CertPair
    revoked: CertPair


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """
    A PKI for localhost and 127.0.0.1 with unencrypted CA keys, valid
    clients ``alice`` and ``bob``, and client ``mallory`` on the CRL.
    """
    directory = tmp_path_factory.mktemp("pki") / "pki"
    pki = PKI.create(directory, SERVER_NAMES)
    pki.issue_client("alice")
    pki.issue_client("bob")
    pki.issue_client("mallory")
    pki.revoke_client("mallory")
    return pki


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A second, independent PKI whose CAs ``pki`` does not trust, with client ``alice``."""
    directory = tmp_path_factory.mktemp("other-pki") / "pki"
    other = PKI.create(directory, SERVER_NAMES)
    other.issue_client("alice")
    return other


@pytest.fixture(scope="session")
def bad_client_certs(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> BadClientCerts:
    """Client certificates named alice that ``pki``'s server must reject, one per reason."""
    directory = tmp_path_factory.mktemp("bad-clients")
    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    client_ca = pki.client_authority()

    def write(name: str, issued: IssuedCertificate) -> CertPair:
        pair = CertPair(directory / f"{name}.crt", directory / f"{name}.key")
        issued.write(pair.cert, pair.key)
        return pair

    return BadClientCerts(
        expired=write(
            "expired",
            client_ca.issue("alice", usage=Usage.CLIENT, not_before=now - 10 * day, not_after=now - day),
        ),
        not_yet_valid=write(
            "not-yet-valid",
            client_ca.issue("alice", usage=Usage.CLIENT, not_before=now + day, not_after=now + 10 * day),
        ),
        self_signed=write("self-signed", self_signed_certificate("alice", usage=Usage.CLIENT)),
        from_server_ca=write(
            "from-server-ca", pki.server_authority().issue("alice", usage=Usage.CLIENT)
        ),
        revoked=CertPair(pki.client_cert("mallory"), pki.client_key("mallory")),
    )


@pytest.fixture
def files(pki: PKI) -> Iterator[ServiceFiles]:
    """A copy of ``pki`` and an empty config file that the daemon's user may read, removed after the test."""
    service_files = ServiceFiles(pki)
    yield service_files
    service_files.remove()
