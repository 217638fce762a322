"""
Tests for netrpc.certs: certificate contents, the PKI directory, checks with
the openssl binary, and real TLS handshakes with the issued certificates.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import stat
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL

from netrpc.certs import (
    DEFAULT_CA_DAYS,
    DEFAULT_LEAF_DAYS,
    PKI,
    CertificateAuthority,
    CertificateRecord,
    KeyType,
    Usage,
    check_client_name,
    load_certificate,
    parse_server_name,
    revoked_entry,
    self_signed_certificate,
)
from netrpc.exceptions import ConfigurationError, PassphraseError
from netrpc.identity import format_serial
from netrpc.keyfiles import locked_directory

OPENSSL = "/usr/bin/openssl"
SERVER_NAMES = ["localhost", "127.0.0.1"]
HANDSHAKE_TIMEOUT = 10.0
DAY = datetime.timedelta(days=1)


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def extension(signed: x509.Certificate | x509.CertificateRevocationList, kind: type) -> x509.Extension:
    return signed.extensions.get_extension_for_class(kind)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def openssl(*arguments: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [OPENSSL, *map(str, arguments)], capture_output=True, text=True, timeout=30
    )


@pytest.fixture(scope="module")
def rsa_pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A PKI with RSA-4096 keys; built once because RSA key generation is slow."""
    pki = PKI.create(tmp_path_factory.mktemp("rsa") / "pki", SERVER_NAMES, key_type=KeyType.RSA_4096)
    pki.issue_client("alice", key_type=KeyType.RSA_4096)
    return pki


@pytest.fixture
def fresh_pki(tmp_path: Path) -> PKI:
    """A PKI of its own, for tests that revoke, renew or overwrite."""
    pki = PKI.create(tmp_path / "pki", SERVER_NAMES)
    pki.issue_client("alice")
    return pki


class TestKeyType:
    @pytest.mark.parametrize(
        ("key_type", "expected"),
        [
            (KeyType.EC_P256, ec.EllipticCurvePrivateKey),
            (KeyType.RSA_4096, rsa.RSAPrivateKey),
            (KeyType.ED25519, ed25519.Ed25519PrivateKey),
        ],
    )
    def test_generate(self, key_type: KeyType, expected: type) -> None:
        key = key_type.generate()
        assert isinstance(key, expected)

    def test_generate_sizes(self) -> None:
        ec_key = KeyType.EC_P256.generate()
        assert isinstance(ec_key, ec.EllipticCurvePrivateKey)
        assert ec_key.curve.name == "secp256r1"

    def test_parse(self) -> None:
        assert KeyType.parse("ed25519") is KeyType.ED25519

    def test_parse_unknown(self) -> None:
        with pytest.raises(ConfigurationError, match="unknown key type 'dsa'; choose one of ec-p256"):
            KeyType.parse("dsa")


class TestCertificateAuthority:
    def test_ca_extensions(self) -> None:
        certificate = CertificateAuthority.create("test CA").certificate
        constraints = extension(certificate, x509.BasicConstraints)
        assert constraints.critical
        assert constraints.value.ca
        assert constraints.value.path_length == 0
        usage = extension(certificate, x509.KeyUsage)
        assert usage.critical
        assert usage.value.key_cert_sign
        assert usage.value.crl_sign
        assert not usage.value.digital_signature

    def test_ca_key_identifiers(self) -> None:
        certificate = CertificateAuthority.create("test CA").certificate
        subject_id = extension(certificate, x509.SubjectKeyIdentifier).value.digest
        authority_id = extension(certificate, x509.AuthorityKeyIdentifier).value.key_identifier
        assert subject_id == authority_id

    def test_ca_default_validity(self) -> None:
        certificate = CertificateAuthority.create("test CA").certificate
        lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
        assert DEFAULT_CA_DAYS * DAY <= lifetime <= DEFAULT_CA_DAYS * DAY + datetime.timedelta(hours=1)

    @pytest.mark.parametrize("usage", list(Usage))
    def test_leaf_extensions(self, usage: Usage) -> None:
        authority = CertificateAuthority.create("test CA")
        certificate = authority.issue("leaf", usage=usage).certificate
        constraints = extension(certificate, x509.BasicConstraints)
        assert constraints.critical
        assert not constraints.value.ca
        key_usage = extension(certificate, x509.KeyUsage)
        assert key_usage.critical
        assert key_usage.value.digital_signature
        assert not key_usage.value.key_encipherment
        assert not key_usage.value.key_cert_sign

    @pytest.mark.parametrize(
        ("usage", "purpose"),
        [(Usage.SERVER, ExtendedKeyUsageOID.SERVER_AUTH), (Usage.CLIENT, ExtendedKeyUsageOID.CLIENT_AUTH)],
    )
    def test_leaf_extended_key_usage(self, usage: Usage, purpose: x509.ObjectIdentifier) -> None:
        certificate = CertificateAuthority.create("test CA").issue("leaf", usage=usage).certificate
        assert list(extension(certificate, x509.ExtendedKeyUsage).value) == [purpose]

    def test_leaf_chain_identifiers(self) -> None:
        authority = CertificateAuthority.create("test CA")
        certificate = authority.issue("leaf", usage=Usage.CLIENT).certificate
        ca_id = extension(authority.certificate, x509.SubjectKeyIdentifier).value.digest
        assert extension(certificate, x509.AuthorityKeyIdentifier).value.key_identifier == ca_id
        assert certificate.issuer == authority.certificate.subject
        certificate.verify_directly_issued_by(authority.certificate)

    def test_leaf_serial_and_hash(self) -> None:
        certificate = CertificateAuthority.create("test CA").issue("leaf", usage=Usage.CLIENT).certificate
        assert certificate.serial_number.bit_length() > 64
        assert isinstance(certificate.signature_hash_algorithm, hashes.SHA256)

    def test_leaf_default_validity(self) -> None:
        certificate = CertificateAuthority.create("test CA").issue("leaf", usage=Usage.CLIENT).certificate
        assert certificate.not_valid_before_utc <= now()
        lifetime = certificate.not_valid_after_utc - now()
        assert (DEFAULT_LEAF_DAYS - 1) * DAY < lifetime <= DEFAULT_LEAF_DAYS * DAY

    def test_leaf_explicit_window(self) -> None:
        start = now() - 10 * DAY
        end = now() - DAY
        certificate = CertificateAuthority.create("test CA").issue(
            "leaf", usage=Usage.CLIENT, not_before=start, not_after=end
        ).certificate
        assert certificate.not_valid_before_utc == start.replace(microsecond=0)
        assert certificate.not_valid_after_utc == end.replace(microsecond=0)

    def test_leaf_window_reversed(self) -> None:
        authority = CertificateAuthority.create("test CA")
        with pytest.raises(ConfigurationError, match="invalid validity window"):
            authority.issue("leaf", usage=Usage.CLIENT, not_before=now(), not_after=now() - DAY)

    @pytest.mark.parametrize("days", [0, -5])
    def test_leaf_days_invalid(self, days: int) -> None:
        authority = CertificateAuthority.create("test CA")
        with pytest.raises(ConfigurationError, match=f"invalid validity {days} days"):
            authority.issue("leaf", usage=Usage.CLIENT, days=days)

    def test_leaf_alt_names(self) -> None:
        authority = CertificateAuthority.create("test CA")
        certificate = authority.issue("srv", usage=Usage.SERVER, names=["rpc.example.com", "::1"]).certificate
        alt_names = extension(certificate, x509.SubjectAlternativeName).value
        assert alt_names.get_values_for_type(x509.DNSName) == ["rpc.example.com"]
        assert alt_names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]

    def test_rsa_leaf_key_encipherment(self, rsa_pki: PKI) -> None:
        certificate = load_certificate(rsa_pki.client_cert("alice"))
        assert extension(certificate, x509.KeyUsage).value.key_encipherment
        assert isinstance(certificate.public_key(), rsa.RSAPublicKey)
        assert certificate.public_key().key_size == 4096

    def test_ed25519_signature(self) -> None:
        authority = CertificateAuthority.create("test CA", key_type=KeyType.ED25519)
        certificate = authority.issue("leaf", usage=Usage.CLIENT, key_type=KeyType.ED25519).certificate
        assert certificate.signature_hash_algorithm is None
        certificate.verify_directly_issued_by(authority.certificate)

    def test_common_name_too_long(self) -> None:
        with pytest.raises(ConfigurationError, match="invalid common name"):
            CertificateAuthority.create("x" * 65)

    def test_self_signed(self) -> None:
        issued = self_signed_certificate("alice", usage=Usage.CLIENT)
        assert issued.certificate.issuer == issued.certificate.subject
        assert not extension(issued.certificate, x509.BasicConstraints).value.ca

    def test_crl_entries(self) -> None:
        authority = CertificateAuthority.create("test CA")
        serial = authority.issue("leaf", usage=Usage.CLIENT).certificate.serial_number
        crl = authority.sign_crl([revoked_entry(serial)], number=7, days=3)
        assert crl.is_signature_valid(authority.private_key.public_key())
        assert crl.get_revoked_certificate_by_serial_number(serial) is not None
        assert extension(crl, x509.CRLNumber).value.crl_number == 7
        assert crl.next_update_utc is not None
        assert 2 * DAY < crl.next_update_utc - now() <= 3 * DAY


class TestNames:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("localhost", x509.DNSName("localhost")),
            ("RPC.Example.com.", x509.DNSName("rpc.example.com")),
            ("*.example.com", x509.DNSName("*.example.com")),
            ("xn--bcher-kva.example", x509.DNSName("xn--bcher-kva.example")),
            ("127.0.0.1", x509.IPAddress(ipaddress.ip_address("127.0.0.1"))),
            ("::1", x509.IPAddress(ipaddress.ip_address("::1"))),
        ],
    )
    def test_server_name_valid(self, text: str, expected: x509.GeneralName) -> None:
        assert parse_server_name(text) == expected

    @pytest.mark.parametrize(
        "text",
        ["", "-bad.example", "bad-.example", "a..b", "spa ce", "bücher.example", "*.com", "a.*.b", "x" * 64, "a/b"],
    )
    def test_server_name_invalid(self, text: str) -> None:
        with pytest.raises(ConfigurationError, match="invalid server name"):
            parse_server_name(text)

    @pytest.mark.parametrize("name", ["alice", "web-01", "svc_2.prod", "A", "x" * 64])
    def test_client_name_valid(self, name: str) -> None:
        assert check_client_name(name) == name

    @pytest.mark.parametrize(
        "name", ["", ".hidden", "-rf", "../etc", "a/b", "a b", "x" * 65, "é", "a\0b", "_x"]
    )
    def test_client_name_invalid(self, name: str) -> None:
        with pytest.raises(ConfigurationError, match="invalid client name"):
            check_client_name(name)


class TestCreate:
    def test_layout(self, pki: PKI) -> None:
        names = sorted(path.name for path in pki.directory.iterdir())
        assert names == [
            "client-ca.crl",
            "client-ca.crt",
            "client-ca.key",
            "clients",
            "server-ca.crt",
            "server-ca.key",
            "server.crt",
            "server.key",
        ]

    def test_modes(self, pki: PKI) -> None:
        assert mode_of(pki.directory) == 0o700
        for key in (pki.server_ca_key, pki.client_ca_key, pki.server_key, pki.client_key("alice")):
            assert mode_of(key) == 0o400, key
        for public in (pki.server_ca_cert, pki.client_ca_cert, pki.crl, pki.server_cert):
            assert mode_of(public) == 0o644, public
        assert mode_of(pki.clients_directory) == 0o700

    def test_two_distinct_cas(self, pki: PKI) -> None:
        server_ca = load_certificate(pki.server_ca_cert)
        client_ca = load_certificate(pki.client_ca_cert)
        assert server_ca.subject != client_ca.subject
        assert server_ca.public_key() != client_ca.public_key()

    def test_server_certificate(self, pki: PKI) -> None:
        certificate = load_certificate(pki.server_cert)
        certificate.verify_directly_issued_by(load_certificate(pki.server_ca_cert))
        alt_names = extension(certificate, x509.SubjectAlternativeName).value
        assert alt_names.get_values_for_type(x509.DNSName) == ["localhost"]
        assert alt_names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]

    def test_empty_crl(self, fresh_pki: PKI) -> None:
        crl = fresh_pki.load_crl()
        assert len(crl) == 0
        assert crl.is_signature_valid(load_certificate(fresh_pki.client_ca_cert).public_key())

    def test_refuses_overwrite(self, fresh_pki: PKI) -> None:
        before = fresh_pki.client_ca_key.read_bytes()
        with pytest.raises(ConfigurationError, match="already contains CA files .* pass --force"):
            PKI.create(fresh_pki.directory, SERVER_NAMES)
        assert fresh_pki.client_ca_key.read_bytes() == before

    def test_force_replaces(self, fresh_pki: PKI) -> None:
        before = fresh_pki.client_ca_cert.read_bytes()
        PKI.create(fresh_pki.directory, SERVER_NAMES, force=True)
        assert fresh_pki.client_ca_cert.read_bytes() != before
        assert mode_of(fresh_pki.client_ca_key) == 0o400

    def test_invalid_server_name_writes_nothing(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigurationError, match="invalid server name 'bad name'"):
            PKI.create(tmp_path / "pki", ["localhost", "bad name"])
        assert not (tmp_path / "pki").exists()

    def test_no_server_name(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigurationError, match="no server name given"):
            PKI.create(tmp_path / "pki", [])

    def test_missing_parent(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigurationError, match="parent directory .* does not exist"):
            PKI.create(tmp_path / "a" / "pki", SERVER_NAMES)
        assert list(tmp_path.iterdir()) == []

    def test_directory_is_a_file(self, tmp_path: Path) -> None:
        (tmp_path / "pki").write_text("not a directory")
        with pytest.raises(ConfigurationError, match="is not a directory"):
            PKI.create(tmp_path / "pki", SERVER_NAMES)

    def test_existing_directory_made_private(self, tmp_path: Path) -> None:
        (tmp_path / "pki").mkdir(mode=0o755)
        PKI.create(tmp_path / "pki", SERVER_NAMES)
        assert mode_of(tmp_path / "pki") == 0o700

    def test_no_temporary_files_left(self, pki: PKI) -> None:
        leftovers = [path for path in pki.directory.rglob(".*")]
        assert leftovers == []

    @pytest.mark.parametrize(
        ("key_type", "expected"),
        [(KeyType.EC_P256, ec.EllipticCurvePublicKey), (KeyType.ED25519, ed25519.Ed25519PublicKey)],
    )
    def test_key_types(self, tmp_path: Path, key_type: KeyType, expected: type) -> None:
        pki = PKI.create(tmp_path / "pki", SERVER_NAMES, key_type=key_type)
        for path in (pki.server_ca_cert, pki.client_ca_cert, pki.server_cert):
            assert isinstance(load_certificate(path).public_key(), expected), path

    def test_rsa_key_type(self, rsa_pki: PKI) -> None:
        for path in (rsa_pki.server_ca_cert, rsa_pki.client_ca_cert, rsa_pki.server_cert):
            public_key = load_certificate(path).public_key()
            assert isinstance(public_key, rsa.RSAPublicKey), path
            assert public_key.key_size == 4096


class TestPassphrase:
    def test_encrypted_ca_keys(self, tmp_path: Path) -> None:
        pki = PKI.create(tmp_path / "pki", SERVER_NAMES, ca_passphrase=b"correct horse")
        assert pki.is_ca_key_encrypted(Usage.CLIENT)
        assert pki.is_ca_key_encrypted(Usage.SERVER)
        assert b"ENCRYPTED PRIVATE KEY" in pki.client_ca_key.read_bytes()
        assert b"ENCRYPTED" not in pki.server_key.read_bytes()

    def test_right_passphrase(self, tmp_path: Path) -> None:
        pki = PKI.create(tmp_path / "pki", SERVER_NAMES, ca_passphrase=b"correct horse")
        cert_path, _ = pki.issue_client("alice", ca_passphrase=b"correct horse")
        assert cert_path.exists()

    def test_wrong_passphrase(self, tmp_path: Path) -> None:
        pki = PKI.create(tmp_path / "pki", SERVER_NAMES, ca_passphrase=b"correct horse")
        with pytest.raises(PassphraseError, match="wrong passphrase for private key .*client-ca.key"):
            pki.issue_client("alice", ca_passphrase=b"battery staple")
        assert not pki.client_cert("alice").exists()

    def test_missing_passphrase(self, tmp_path: Path) -> None:
        pki = PKI.create(tmp_path / "pki", SERVER_NAMES, ca_passphrase=b"correct horse")
        with pytest.raises(PassphraseError, match="is encrypted and no passphrase was given"):
            pki.renew_server(SERVER_NAMES)

    def test_encrypted_client_key(self, tmp_path: Path) -> None:
        other = PKI.create(tmp_path / "pki", SERVER_NAMES)
        _, key_path = other.issue_client("carol", key_passphrase=b"client secret")
        assert b"ENCRYPTED PRIVATE KEY" in key_path.read_bytes()
        assert mode_of(key_path) == 0o400

    def test_encrypted_server_key(self, tmp_path: Path) -> None:
        pki = PKI.create(tmp_path / "pki", SERVER_NAMES, server_key_passphrase=b"server secret")
        assert b"ENCRYPTED PRIVATE KEY" in pki.server_key.read_bytes()
        assert not pki.is_ca_key_encrypted(Usage.CLIENT)


class TestIssue:
    def test_client_certificate(self, pki: PKI) -> None:
        certificate = load_certificate(pki.client_cert("alice"))
        assert certificate.subject.rfc4514_string() == "CN=alice"
        certificate.verify_directly_issued_by(load_certificate(pki.client_ca_cert))

    def test_rejects_issued_name(self, pki: PKI) -> None:
        before = pki.client_cert("alice").read_bytes()
        with pytest.raises(ConfigurationError, match="client 'alice' is already issued and not revoked"):
            pki.issue_client("alice")
        assert pki.client_cert("alice").read_bytes() == before

    @pytest.mark.parametrize("name", ["../server", "a/b", ".x", ""])
    def test_rejects_unsafe_name(self, pki: PKI, name: str) -> None:
        with pytest.raises(ConfigurationError, match="invalid client name"):
            pki.issue_client(name)

    def test_key_without_certificate(self, fresh_pki: PKI) -> None:
        fresh_pki.client_key("alice").rename(fresh_pki.client_key("stray"))
        with pytest.raises(ConfigurationError, match="stray.key' exists without its certificate"):
            fresh_pki.issue_client("stray")

    def test_reissue_after_revoke(self, fresh_pki: PKI) -> None:
        old_serial = load_certificate(fresh_pki.client_cert("alice")).serial_number
        fresh_pki.revoke_client("alice")
        fresh_pki.issue_client("alice")
        new_serial = load_certificate(fresh_pki.client_cert("alice")).serial_number
        assert new_serial != old_serial
        archived = fresh_pki.revoked_directory / f"alice-{format_serial(old_serial)}.crt"
        assert load_certificate(archived).serial_number == old_serial
        assert not fresh_pki.is_revoked("alice")

    def test_archive_named_before_serial_format(self, fresh_pki: PKI) -> None:
        """A pair archived under the older lowercase serial name is still listed as revoked."""
        old_serial = load_certificate(fresh_pki.client_cert("alice")).serial_number
        fresh_pki.revoke_client("alice")
        fresh_pki.issue_client("alice")
        archived = fresh_pki.revoked_directory / f"alice-{format_serial(old_serial)}.crt"
        archived.rename(fresh_pki.revoked_directory / f"alice-{old_serial:x}.crt")

        records = {record.name: record for record in fresh_pki.certificates()}
        old_record = records[f"alice-{old_serial:x}"]
        assert old_record.serial == old_serial
        assert old_record.status() == "revoked"
        assert records["alice"].status() == "valid"

    def test_days(self, fresh_pki: PKI) -> None:
        fresh_pki.issue_client("brief", days=2)
        lifetime = load_certificate(fresh_pki.client_cert("brief")).not_valid_after_utc - now()
        assert DAY < lifetime <= 2 * DAY

    def test_missing_directory(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigurationError, match="PKI directory .* does not exist"):
            PKI(tmp_path / "nowhere").issue_client("alice")

    def test_directory_without_ca(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigurationError, match="is not a netrpc PKI directory: client-ca.crt is missing"):
            PKI(tmp_path).issue_client("alice")

    def test_mismatched_ca_key(self, fresh_pki: PKI) -> None:
        os.replace(fresh_pki.server_ca_key, fresh_pki.client_ca_key)
        with pytest.raises(ConfigurationError, match="does not match certificate"):
            fresh_pki.issue_client("bob")


class TestRevoke:
    def test_revoke(self, fresh_pki: PKI) -> None:
        serial = load_certificate(fresh_pki.client_cert("alice")).serial_number
        assert fresh_pki.revoke_client("alice") is True
        crl = fresh_pki.load_crl()
        assert crl.get_revoked_certificate_by_serial_number(serial) is not None
        assert crl.is_signature_valid(load_certificate(fresh_pki.client_ca_cert).public_key())
        assert extension(crl, x509.CRLNumber).value.crl_number == 2
        assert fresh_pki.is_revoked("alice")

    def test_revoke_sets_next_update(self, fresh_pki: PKI) -> None:
        fresh_pki.revoke_client("alice", crl_days=10)
        next_update = fresh_pki.load_crl().next_update_utc
        assert next_update is not None
        assert 9 * DAY < next_update - now() <= 10 * DAY

    def test_revoke_twice(self, fresh_pki: PKI) -> None:
        fresh_pki.revoke_client("alice")
        before = fresh_pki.crl.read_bytes()
        assert fresh_pki.revoke_client("alice") is False
        assert fresh_pki.crl.read_bytes() == before

    def test_revoke_keeps_others(self, fresh_pki: PKI) -> None:
        fresh_pki.issue_client("bob")
        fresh_pki.revoke_client("alice")
        fresh_pki.revoke_client("bob")
        assert len(fresh_pki.load_crl()) == 2

    def test_revoke_unknown(self, fresh_pki: PKI) -> None:
        with pytest.raises(ConfigurationError, match="no client named 'nobody'"):
            fresh_pki.revoke_client("nobody")

    def test_revoke_after_force(self, fresh_pki: PKI) -> None:
        PKI.create(fresh_pki.directory, SERVER_NAMES, force=True)
        with pytest.raises(ConfigurationError, match="was not issued by the client CA"):
            fresh_pki.revoke_client("alice")

    def test_waits_for_lock(self, fresh_pki: PKI) -> None:
        """A revoke waits while another command holds the PKI directory lock."""
        before = fresh_pki.crl.read_bytes()
        with locked_directory(fresh_pki.directory):
            worker = threading.Thread(target=fresh_pki.revoke_client, args=("alice",))
            worker.start()
            worker.join(0.3)
            assert worker.is_alive()
            assert fresh_pki.crl.read_bytes() == before
        worker.join(HANDSHAKE_TIMEOUT)
        assert not worker.is_alive()
        assert fresh_pki.is_revoked("alice")

    def test_renew_crl(self, fresh_pki: PKI) -> None:
        fresh_pki.revoke_client("alice", crl_days=1)
        crl = fresh_pki.renew_crl(days=100)
        assert len(crl) == 1
        assert crl.next_update_utc is not None
        assert crl.next_update_utc - now() > 99 * DAY
        assert extension(crl, x509.CRLNumber).value.crl_number == 3


class TestRenewServer:
    def test_renew_keeps_cas(self, fresh_pki: PKI) -> None:
        cas_before = [path.read_bytes() for path in fresh_pki.ca_files()]
        server_before = fresh_pki.server_cert.read_bytes()
        fresh_pki.renew_server(["rpc.example.com", "10.0.0.1"], days=30)
        assert [path.read_bytes() for path in fresh_pki.ca_files()] == cas_before
        assert fresh_pki.server_cert.read_bytes() != server_before

    def test_renew_names(self, fresh_pki: PKI) -> None:
        fresh_pki.renew_server(["rpc.example.com", "10.0.0.1"])
        certificate = load_certificate(fresh_pki.server_cert)
        certificate.verify_directly_issued_by(load_certificate(fresh_pki.server_ca_cert))
        alt_names = extension(certificate, x509.SubjectAlternativeName).value
        assert alt_names.get_values_for_type(x509.DNSName) == ["rpc.example.com"]
        assert certificate.subject.rfc4514_string() == "CN=rpc.example.com"
        assert mode_of(fresh_pki.server_key) == 0o400

    def test_renew_invalid_name(self, fresh_pki: PKI) -> None:
        before = fresh_pki.server_cert.read_bytes()
        with pytest.raises(ConfigurationError, match="invalid server name 'a..b'"):
            fresh_pki.renew_server(["a..b"])
        assert fresh_pki.server_cert.read_bytes() == before


class TestCertificates:
    def test_list(self, pki: PKI) -> None:
        records = {record.name: record for record in pki.certificates()}
        assert set(records) == {"server-ca", "client-ca", "server", "alice", "bob", "mallory"}
        assert records["mallory"].revoked
        assert records["mallory"].status() == "revoked"
        assert records["alice"].status() == "valid"
        assert records["alice"].serial == load_certificate(pki.client_cert("alice")).serial_number

    def test_list_after_force(self, fresh_pki: PKI) -> None:
        """Clients of a replaced client CA show up as not issued by this PKI."""
        PKI.create(fresh_pki.directory, SERVER_NAMES, force=True)
        records = {record.name: record for record in fresh_pki.certificates()}
        assert records["alice"].status() == "not issued by this PKI"
        assert records["server"].status() == "valid"
        assert records["client-ca"].status() == "valid"

    @pytest.mark.parametrize(
        ("remaining", "expected"),
        [
            (-DAY, "expired"),
            (DAY + datetime.timedelta(hours=1), "expires in 1 day"),
            (10 * DAY + datetime.timedelta(hours=1), "expires in 10 days"),
            (31 * DAY, "valid"),
        ],
    )
    def test_status(self, remaining: datetime.timedelta, expected: str) -> None:
        record = CertificateRecord("x", "client", Path("x.crt"), 1, now() + remaining, revoked=False)
        assert record.status() == expected


class TestOpenSSL:
    """The openssl binary agrees with the library about chains and purposes."""

    def test_client_chain(self, pki: PKI) -> None:
        assert openssl("verify", "-CAfile", pki.client_ca_cert, pki.client_cert("alice")).returncode == 0
        assert openssl("verify", "-CAfile", pki.server_ca_cert, pki.client_cert("alice")).returncode != 0

    def test_server_chain(self, pki: PKI) -> None:
        assert openssl("verify", "-CAfile", pki.server_ca_cert, pki.server_cert).returncode == 0
        assert openssl("verify", "-CAfile", pki.client_ca_cert, pki.server_cert).returncode != 0

    def test_server_purpose(self, pki: PKI) -> None:
        output = openssl("x509", "-in", pki.server_cert, "-noout", "-purpose").stdout
        assert "SSL server : Yes" in output
        assert "SSL client : No" in output

    def test_client_purpose(self, pki: PKI) -> None:
        output = openssl("x509", "-in", pki.client_cert("alice"), "-noout", "-purpose").stdout
        assert "SSL client : Yes" in output
        assert "SSL server : No" in output

    def test_verify_purpose_flag(self, pki: PKI) -> None:
        """-purpose on verify rejects a client certificate used as a server."""
        ok = openssl("verify", "-purpose", "sslclient", "-CAfile", pki.client_ca_cert, pki.client_cert("alice"))
        wrong = openssl("verify", "-purpose", "sslserver", "-CAfile", pki.client_ca_cert, pki.client_cert("alice"))
        assert ok.returncode == 0
        assert wrong.returncode != 0

    def test_crl_check(self, fresh_pki: PKI) -> None:
        command = ["verify", "-crl_check", "-CRLfile", fresh_pki.crl, "-CAfile", fresh_pki.client_ca_cert]
        assert openssl(*command, fresh_pki.client_cert("alice")).returncode == 0
        fresh_pki.revoke_client("alice")
        result = openssl(*command, fresh_pki.client_cert("alice"))
        assert result.returncode != 0
        assert "certificate revoked" in result.stdout + result.stderr

    def test_rsa_chain(self, rsa_pki: PKI) -> None:
        assert openssl("verify", "-CAfile", rsa_pki.client_ca_cert, rsa_pki.client_cert("alice")).returncode == 0
        assert openssl("verify", "-CAfile", rsa_pki.server_ca_cert, rsa_pki.server_cert).returncode == 0

    def test_reads_encrypted_key(self, tmp_path: Path) -> None:
        pki = PKI.create(tmp_path / "pki", SERVER_NAMES, ca_passphrase=b"correct horse")
        right = openssl("pkey", "-in", pki.client_ca_key, "-noout", "-passin", "pass:correct horse")
        wrong = openssl("pkey", "-in", pki.client_ca_key, "-noout", "-passin", "pass:wrong")
        assert right.returncode == 0
        assert wrong.returncode != 0


@dataclass
class HandshakeOutcome:
    """The client's CN as the server saw it, or why either side failed."""

    peer: str | None = None
    error: str | None = None
    client_error: str | None = None


def server_context(pki: PKI) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=pki.client_ca_cert)
    context.load_verify_locations(cafile=pki.crl)
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


def client_context(pki: PKI, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=pki.server_ca_cert)
    context.load_cert_chain(cert, key)
    return context


def serve_once(listener: socket.socket, context: ssl.SSLContext, outcome: HandshakeOutcome) -> None:
    connection, _ = listener.accept()
    connection.settimeout(HANDSHAKE_TIMEOUT)
    try:
        with context.wrap_socket(connection, server_side=True) as tls:
            peer = tls.getpeercert()
            outcome.peer = dict(item[0] for item in peer["subject"])["commonName"] if peer else None
            tls.sendall(b"ok")
    except (ssl.SSLError, OSError) as error:
        outcome.error = getattr(error, "verify_message", None) or str(error)
        connection.close()


def handshake(pki: PKI, cert: Path, key: Path, server_name: str = "localhost") -> HandshakeOutcome:
    """Run one mutual-TLS handshake on loopback with stdlib ssl on both ends."""
    outcome = HandshakeOutcome()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(HANDSHAKE_TIMEOUT)
        thread = threading.Thread(target=serve_once, args=(listener, server_context(pki), outcome))
        thread.start()
        try:
            raw = socket.create_connection(listener.getsockname(), timeout=HANDSHAKE_TIMEOUT)
            with client_context(pki, cert, key).wrap_socket(raw, server_hostname=server_name) as tls:
                # With TLS 1.3 the client learns of a rejection only on its first read.
                tls.recv(2)
        except (ssl.SSLError, OSError) as error:
            outcome.client_error = getattr(error, "verify_message", None) or str(error)
        thread.join(HANDSHAKE_TIMEOUT)
    assert not thread.is_alive()
    return outcome


class TestHandshake:
    def test_issued_accepted_then_revoked_rejected(self, fresh_pki: PKI) -> None:
        cert, key = fresh_pki.client_cert("alice"), fresh_pki.client_key("alice")
        accepted = handshake(fresh_pki, cert, key)
        assert accepted.error is None
        assert accepted.peer == "alice"
        fresh_pki.revoke_client("alice")
        rejected = handshake(fresh_pki, cert, key)
        assert rejected.peer is None
        assert rejected.error == "certificate revoked"

    @pytest.mark.parametrize(
        ("name", "reason"),
        [
            ("expired", "certificate has expired"),
            ("not_yet_valid", "certificate is not yet valid"),
            ("self_signed", "self-signed certificate"),
            # The client sends the server CA along, because it trusts it and
            # OpenSSL completes the chain it sends from its trust store.
            ("from_server_ca", "self-signed certificate in certificate chain"),
            ("revoked", "certificate revoked"),
        ],
    )
    def test_bad_client_rejected(self, pki: PKI, bad_client_certs: object, name: str, reason: str) -> None:
        pair = getattr(bad_client_certs, name)
        outcome = handshake(pki, pair.cert, pair.key)
        assert outcome.peer is None
        assert outcome.error == reason

    def test_good_clients_accepted(self, pki: PKI) -> None:
        for name in ("alice", "bob"):
            outcome = handshake(pki, pki.client_cert(name), pki.client_key(name))
            assert outcome.peer == name, outcome.error

    def test_other_pki_client_rejected(self, pki: PKI, other_pki: PKI) -> None:
        outcome = handshake(pki, other_pki.client_cert("alice"), other_pki.client_key("alice"))
        assert outcome.error == "unable to get local issuer certificate"

    def test_server_name_checked(self, pki: PKI) -> None:
        """The server certificate does not pass for a name it was not issued for."""
        outcome = handshake(pki, pki.client_cert("alice"), pki.client_key("alice"), "other.example")
        assert outcome.peer is None
        assert outcome.client_error is not None
        assert "Hostname mismatch" in outcome.client_error

    def test_rsa(self, rsa_pki: PKI) -> None:
        outcome = handshake(rsa_pki, rsa_pki.client_cert("alice"), rsa_pki.client_key("alice"))
        assert outcome.peer == "alice", outcome.error

    def test_ed25519(self, tmp_path: Path) -> None:
        pki = PKI.create(tmp_path / "pki", SERVER_NAMES, key_type=KeyType.ED25519)
        cert, key = pki.issue_client("alice", key_type=KeyType.ED25519)
        outcome = handshake(pki, cert, key)
        assert outcome.peer == "alice", outcome.error


def pyopenssl_context(cert: Path, key: Path, ca: Path) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.use_certificate_file(str(cert))
    context.use_privatekey_file(str(key))
    context.load_verify_locations(str(ca))
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    return context


def pyopenssl_handshake(pki: PKI, cert: Path, key: Path) -> str:
    """Run a mutual-TLS handshake between two pyOpenSSL connections in memory; return the client CN."""
    server = SSL.Connection(pyopenssl_context(pki.server_cert, pki.server_key, pki.client_ca_cert))
    server.set_accept_state()
    client = SSL.Connection(pyopenssl_context(cert, key, pki.server_ca_cert))
    client.set_connect_state()

    for _ in range(10):
        for connection, peer in ((client, server), (server, client)):
            try:
                connection.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                peer.bio_write(connection.bio_read(65536))
            except SSL.WantReadError:
                pass
        if server.get_peer_certificate() is not None and client.get_peer_certificate() is not None:
            break
    peer_certificate = server.get_peer_certificate(as_cryptography=True)
    assert peer_certificate is not None
    return peer_certificate.subject.rfc4514_string()


class TestPyOpenSSLHandshake:
    """pyOpenSSL, which Twisted uses, accepts every key type the tool generates."""

    @pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.ED25519])
    def test_key_type(self, tmp_path: Path, key_type: KeyType) -> None:
        pki = PKI.create(tmp_path / "pki", SERVER_NAMES, key_type=key_type)
        cert, key = pki.issue_client("alice", key_type=key_type)
        assert pyopenssl_handshake(pki, cert, key) == "CN=alice"

    def test_rsa(self, rsa_pki: PKI) -> None:
        cert, key = rsa_pki.client_cert("alice"), rsa_pki.client_key("alice")
        assert pyopenssl_handshake(rsa_pki, cert, key) == "CN=alice"

    def test_unknown_ca_fails(self, pki: PKI, other_pki: PKI) -> None:
        with pytest.raises(SSL.Error):
            pyopenssl_handshake(pki, other_pki.client_cert("alice"), other_pki.client_key("alice"))
