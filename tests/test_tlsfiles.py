"""Startup checks of TLS files: each problem is one ConfigurationError naming the file and the fix."""

from __future__ import annotations

import datetime
import os
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from netrpc.certs import PKI, CertificateAuthority, Usage
from netrpc.exceptions import ConfigurationError, PassphraseError
from netrpc.tlsfiles import (
    TLSFiles,
    check_private_file_mode,
    key_needs_passphrase,
    load_material,
    read_passphrase_file,
)
from netrpc.verify import Role

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def server_files(pki: PKI, **changes: object) -> TLSFiles:
    files = {
        "private_key": pki.server_key,
        "certificate": pki.server_cert,
        "ca_certificates": pki.client_ca_cert,
        "crl": pki.crl,
    }
    files.update(changes)
    return TLSFiles(**files)  # type: ignore[arg-type]


def write_server(directory: Path, authority: CertificateAuthority, **validity: object) -> tuple[Path, Path]:
    issued = authority.issue("localhost", usage=Usage.SERVER, names=["localhost"], **validity)  # type: ignore[arg-type]
    cert, key = directory / "server.crt", directory / "server.key"
    issued.write(cert, key)
    return cert, key


class TestLoadMaterial:
    def test_valid_server(self, pki: PKI) -> None:
        material = load_material(server_files(pki), Role.SERVER)

        assert material.certificate.subject.rfc4514_string() == "CN=localhost"
        assert len(material.ca_certificates) == 1
        assert material.crl is not None

    def test_missing_file(self, pki: PKI, tmp_path: Path) -> None:
        missing = tmp_path / "nothing.crt"

        with pytest.raises(ConfigurationError, match="is missing; check the path") as caught:
            load_material(server_files(pki, certificate=missing), Role.SERVER)

        assert str(missing) in str(caught.value)

    def test_unreadable_file(self, pki: PKI, tmp_path: Path) -> None:
        """A directory in place of a file cannot be read, even by root."""
        with pytest.raises(ConfigurationError, match="cannot read") as caught:
            load_material(server_files(pki, ca_certificates=tmp_path), Role.SERVER)

        assert str(tmp_path) in str(caught.value)

    def test_not_pem(self, pki: PKI, tmp_path: Path) -> None:
        garbage = tmp_path / "garbage.crt"
        garbage.write_bytes(b"not a certificate\n")

        with pytest.raises(ConfigurationError, match="contains no PEM certificate"):
            load_material(server_files(pki, certificate=garbage), Role.SERVER)

    def test_key_mismatch(self, pki: PKI) -> None:
        files = server_files(pki, private_key=pki.client_key("alice"))

        with pytest.raises(ConfigurationError, match="does not match certificate") as caught:
            load_material(files, Role.SERVER)

        assert str(pki.client_key("alice")) in str(caught.value)
        assert str(pki.server_cert) in str(caught.value)

    @pytest.mark.parametrize(
        ("validity", "message"),
        [
            ({"not_before": NOW - 10 * DAY, "not_after": NOW - DAY}, "expired on .*; renew it"),
            ({"not_before": NOW + DAY, "not_after": NOW + 10 * DAY}, "is not valid before"),
        ],
        ids=["expired", "not-yet-valid"],
    )
    def test_server_validity(
        self, pki: PKI, tmp_path: Path, validity: dict[str, object], message: str
    ) -> None:
        cert, key = write_server(tmp_path, pki.server_authority(), **validity)

        with pytest.raises(ConfigurationError, match=message):
            load_material(server_files(pki, certificate=cert, private_key=key), Role.SERVER)

    def test_client_certificate_as_server(self, pki: PKI) -> None:
        files = server_files(
            pki, certificate=pki.client_cert("alice"), private_key=pki.client_key("alice")
        )

        with pytest.raises(ConfigurationError, match="serverAuth.*give a server certificate"):
            load_material(files, Role.SERVER)

    def test_ca_file_not_a_ca(self, pki: PKI) -> None:
        with pytest.raises(ConfigurationError, match="not a CA certificate") as caught:
            load_material(server_files(pki, ca_certificates=pki.client_cert("bob")), Role.SERVER)

        assert "CN=bob" in str(caught.value)

    def test_key_readable_by_others(self, pki: PKI, tmp_path: Path) -> None:
        key = tmp_path / "server.key"
        shutil.copy(pki.server_key, key)
        key.chmod(0o644)

        with pytest.raises(ConfigurationError) as caught:
            load_material(server_files(pki, private_key=key), Role.SERVER)

        assert f"permissions 0644 for private key '{key}' are too open" in str(caught.value)
        assert f"run chmod 600 {key}" in str(caught.value)

    def test_crl_of_other_ca(self, pki: PKI, other_pki: PKI) -> None:
        with pytest.raises(ConfigurationError, match="is not signed by a CA in") as caught:
            load_material(server_files(pki, crl=other_pki.crl), Role.SERVER)

        assert str(other_pki.crl) in str(caught.value)

    def test_crl_not_pem(self, pki: PKI, tmp_path: Path) -> None:
        crl = tmp_path / "client-ca.crl"
        crl.write_bytes(b"nonsense")

        with pytest.raises(ConfigurationError, match="not a PEM certificate revocation list"):
            load_material(server_files(pki, crl=crl), Role.SERVER)

    def test_crl_expired(self, pki: PKI, tmp_path: Path) -> None:
        crl = tmp_path / "client-ca.crl"
        signed = pki.client_authority().sign_crl([], number=7, days=1)
        crl.write_bytes(signed.public_bytes(serialization.Encoding.PEM))

        with pytest.raises(ConfigurationError, match="CRL .* expired on"):
            load_material(server_files(pki, crl=crl), Role.SERVER, now=NOW + 2 * DAY)


class TestPassphrase:
    @pytest.fixture
    def encrypted_key(self, pki: PKI, tmp_path: Path) -> Path:
        key = serialization.load_pem_private_key(pki.server_key.read_bytes(), None)
        path = tmp_path / "server.key"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"correct horse"),
            )
        )
        path.chmod(0o600)
        return path

    def test_right_passphrase(self, pki: PKI, encrypted_key: Path) -> None:
        files = server_files(pki, private_key=encrypted_key, passphrase=b"correct horse")

        material = load_material(files, Role.SERVER)

        assert key_needs_passphrase(encrypted_key)
        assert material.private_key.public_key() == material.certificate.public_key()

    def test_wrong_passphrase(self, pki: PKI, encrypted_key: Path) -> None:
        files = server_files(pki, private_key=encrypted_key, passphrase=b"wrong")

        with pytest.raises(PassphraseError, match="wrong passphrase"):
            load_material(files, Role.SERVER)

    def test_passphrase_file(self, tmp_path: Path) -> None:
        path = tmp_path / "passphrase"
        path.write_bytes(b"correct horse\n")
        path.chmod(0o600)

        assert read_passphrase_file(path) == b"correct horse"

    def test_passphrase_file_too_open(self, tmp_path: Path) -> None:
        path = tmp_path / "passphrase"
        path.write_bytes(b"correct horse\n")
        path.chmod(0o640)

        with pytest.raises(ConfigurationError, match="permissions 0640 for passphrase file"):
            read_passphrase_file(path)

    def test_empty_passphrase_file(self, tmp_path: Path) -> None:
        path = tmp_path / "passphrase"
        path.write_bytes(b"\n")
        path.chmod(0o600)

        with pytest.raises(PassphraseError, match="is empty"):
            read_passphrase_file(path)


def test_private_mode_accepts_0600(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"")
    os.chmod(path, 0o600)

    check_private_file_mode(path, "private key")
