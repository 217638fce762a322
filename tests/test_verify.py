"""Reasons for rejected certificates, without a network."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from OpenSSL import SSL

from netrpc.certs import CertificateAuthority, Usage, self_signed_certificate
from netrpc.exceptions import TLSVerificationError
from netrpc.identity import format_serial
from netrpc.verify import (
    Reason,
    Rejection,
    Role,
    check_extended_key_usage,
    check_server_name,
    names_in_certificate,
    reject_certificate,
    reject_ssl_error,
    rejected_by_peer,
)

codes = SSL.X509VerificationCodes


@pytest.fixture(scope="module")
def authority() -> CertificateAuthority:
    return CertificateAuthority.create("test CA")


@pytest.fixture(scope="module")
def server_cert(authority: CertificateAuthority) -> x509.Certificate:
    issued = authority.issue("rpc", usage=Usage.SERVER, names=["rpc.example.com", "192.0.2.1"])
    return issued.certificate


class TestRejectCertificate:
    @pytest.mark.parametrize(
        ("code", "reason", "words"),
        [
            (codes.ERR_CERT_HAS_EXPIRED, Reason.EXPIRED, "expired on"),
            (codes.ERR_CERT_NOT_YET_VALID, Reason.NOT_YET_VALID, "is not valid before"),
            (codes.ERR_CERT_REVOKED, Reason.REVOKED, "is revoked by the CRL"),
            (codes.ERR_DEPTH_ZERO_SELF_SIGNED_CERT, Reason.SELF_SIGNED, "self-signed"),
            (codes.ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY, Reason.UNKNOWN_CA, "not a trusted CA"),
            (codes.ERR_INVALID_PURPOSE, Reason.WRONG_KEY_USAGE, "not issued for this use"),
            (codes.ERR_UNABLE_TO_GET_CRL, Reason.CRL_UNUSABLE, "CRL"),
            (codes.ERR_OUT_OF_MEM, Reason.HANDSHAKE_FAILED, "X.509 error"),
        ],
    )
    def test_reason(
        self, server_cert: x509.Certificate, code: int, reason: Reason, words: str
    ) -> None:
        rejection = reject_certificate(code, 0, server_cert)

        assert rejection.reason is reason
        assert words in rejection.detail
        assert rejection.subject == "CN=rpc"
        assert rejection.issuer == "CN=test CA"

    def test_revoked_serial(self, server_cert: x509.Certificate) -> None:
        rejection = reject_certificate(codes.ERR_CERT_REVOKED, 0, server_cert)

        assert f"(serial {format_serial(server_cert.serial_number)})" in rejection.detail

    def test_depth_named(self, server_cert: x509.Certificate) -> None:
        rejection = reject_certificate(codes.ERR_CERT_HAS_EXPIRED, 1, server_cert)

        assert rejection.detail.startswith("chain certificate at depth 1")


class TestExtendedKeyUsage:
    def test_matching_role(self, server_cert: x509.Certificate) -> None:
        assert check_extended_key_usage(server_cert, Role.SERVER) is None

    def test_other_role(self, server_cert: x509.Certificate) -> None:
        rejection = check_extended_key_usage(server_cert, Role.CLIENT)

        assert rejection is not None
        assert rejection.reason is Reason.WRONG_KEY_USAGE
        assert "lacks extendedKeyUsage clientAuth (it has: serverAuth)" in rejection.detail

    def test_no_extension(self, authority: CertificateAuthority) -> None:
        """A CA certificate has no extendedKeyUsage, so it is no client."""
        rejection = check_extended_key_usage(authority.certificate, Role.CLIENT)

        assert rejection is not None
        assert "(it has: none)" in rejection.detail


class TestServerName:
    @pytest.mark.parametrize("name", ["rpc.example.com", "192.0.2.1"])
    def test_match(self, server_cert: x509.Certificate, name: str) -> None:
        assert check_server_name(server_cert, name) is None

    @pytest.mark.parametrize("name", ["other.example.com", "192.0.2.2", "::1"])
    def test_mismatch(self, server_cert: x509.Certificate, name: str) -> None:
        rejection = check_server_name(server_cert, name)

        assert rejection is not None
        assert rejection.reason is Reason.NAME_MISMATCH
        assert f"{name!r}" in rejection.detail
        assert "rpc.example.com, 192.0.2.1" in rejection.detail

    def test_common_name_ignored(self) -> None:
        """Only the subjectAltName counts, as RFC 6125 requires."""
        issued = self_signed_certificate("rpc.example.com", usage=Usage.SERVER)

        rejection = check_server_name(issued.certificate, "rpc.example.com")

        assert rejection is not None
        assert names_in_certificate(issued.certificate) == []


class TestSSLErrors:
    def test_no_certificate(self) -> None:
        error = SSL.Error([("SSL routines", "", "peer did not return a certificate")])

        assert reject_ssl_error(error).reason is Reason.NO_CERTIFICATE

    @pytest.mark.parametrize(
        ("message", "reason"),
        [
            ("tlsv1 alert unknown ca", Reason.UNKNOWN_CA),
            ("sslv3 alert certificate expired", Reason.EXPIRED),
            ("tls alert certificate revoked", Reason.REVOKED),
            ("tlsv13 alert certificate required", Reason.NO_CERTIFICATE),
            ("tlsv1 alert decrypt error", Reason.REJECTED_BY_PEER),
        ],
    )
    def test_alert(self, message: str, reason: Reason) -> None:
        error = SSL.Error([("SSL routines", "", message)])

        rejection = rejected_by_peer(error)

        assert rejection is not None
        assert rejection.reason is reason
        assert reject_ssl_error(error).reason is reason

    def test_other_error(self) -> None:
        error = SSL.Error([("SSL routines", "", "no shared cipher")])

        rejection = reject_ssl_error(error)

        assert rejected_by_peer(error) is None
        assert rejection.reason is Reason.HANDSHAKE_FAILED
        assert "no shared cipher" in rejection.detail


def test_rejection_to_error() -> None:
    rejection = Rejection(Reason.EXPIRED, "certificate CN=x expired on 2020-01-01")

    error = rejection.to_error("TLS handshake with h:1 failed")

    assert isinstance(error, TLSVerificationError)
    assert error.reason == "expired"
    assert str(error) == "TLS handshake with h:1 failed: certificate CN=x expired on 2020-01-01"


def test_not_valid_before_formatted(authority: CertificateAuthority) -> None:
    start = datetime.datetime(2031, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)
    issued = authority.issue(
        "later", usage=Usage.CLIENT, not_before=start, not_after=start + datetime.timedelta(days=1)
    )

    rejection = reject_certificate(codes.ERR_CERT_NOT_YET_VALID, 0, issued.certificate)

    assert "2031-05-06 07:08:09 UTC" in rejection.detail
