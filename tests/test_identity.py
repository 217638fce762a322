"""
Tests for netrpc.identity: serial formatting checked against the openssl
binary, and the identity taken from a certificate.
"""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from netrpc.certs import PKI, load_certificate
from netrpc.identity import PeerIdentity, format_serial

OPENSSL = "/usr/bin/openssl"


def openssl_serial(path: Path) -> str:
    """Return the serial that ``openssl x509 -noout -serial`` prints for ``path``."""
    output = subprocess.run(
        [OPENSSL, "x509", "-noout", "-serial", "-in", str(path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()
    assert output.startswith("serial=")
    return output.removeprefix("serial=")


def certificate_with_serial(serial: int, path: Path) -> Path:
    """Write a self-signed certificate with ``serial`` to ``path``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "serial test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


class TestFormatSerial:
    @pytest.mark.parametrize(
        ("serial", "expected"),
        [
            (1, "01"),
            (0xABC, "0ABC"),
            (0x80, "80"),
            (0x1F2E, "1F2E"),
            (-0x5, "-05"),
        ],
    )
    def test_digits(self, serial: int, expected: str) -> None:
        assert format_serial(serial) == expected

    @pytest.mark.parametrize(
        "serial",
        [1, 0x80, 0xFF, 0x100, 0x0BDC51F2E3A4, 0x7F << 150, (1 << 159) - 1],
    )
    def test_matches_openssl(self, tmp_path: Path, serial: int) -> None:
        path = certificate_with_serial(serial, tmp_path / "cert.pem")
        assert format_serial(serial) == openssl_serial(path)

    def test_issued_client_matches_openssl(self, tmp_path: Path) -> None:
        """A certificate from PKI.issue_client prints as openssl prints it."""
        pki = PKI.create(tmp_path / "pki", ["localhost"])
        pki.issue_client("alice")
        path = pki.client_cert("alice")
        serial = load_certificate(path).serial_number

        assert format_serial(serial) == openssl_serial(path)


class TestPeerIdentity:
    def test_from_certificate(self, pki: PKI) -> None:
        certificate = load_certificate(pki.client_cert("alice"))
        identity = PeerIdentity.from_certificate(certificate, "127.0.0.1:5000")

        assert identity.common_name == "alice"
        assert identity.serial == certificate.serial_number
        assert identity.address == "127.0.0.1:5000"

    def test_as_dict_serial(self, pki: PKI) -> None:
        """``whoami``-style data shows the serial as openssl prints it."""
        path = pki.client_cert("alice")
        identity = PeerIdentity.from_certificate(load_certificate(path))

        assert identity.as_dict()["serial"] == openssl_serial(path)
