"""
Why a TLS peer was rejected, in plain words.

Certificate verification happens inside OpenSSL's handshake, which reports
only a numeric X.509 error code. The verify callbacks built here turn that
code, and the checks OpenSSL does not make, into a ``Rejection``: a short
reason from ``Reason`` and a sentence naming the certificate. The callback
stores the first rejection of each connection in a ``RejectionRecorder``, so
the code that handles the failed handshake can log or raise it afterwards.

The callback checks, in this order: the chain against the trusted CAs
(OpenSSL, including the CRL when one is loaded), then on the leaf only the
extendedKeyUsage for the peer's role, then (client side only) the server's
name with service-identity. It does not check what the peer may do once
connected; the access policy decides that.

Nothing here logs: callers decide what to do with a rejection.
"""

from __future__ import annotations

import datetime
import enum
import ipaddress
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)

from netrpc.exceptions import TLSVerificationError
from netrpc.identity import format_serial

VerifyCallback = Callable[[SSL.Connection, crypto.X509, int, int, int], bool]


class Reason(enum.StrEnum):
    """The cause of a failed handshake, as a short phrase for logs, errors and counters."""

    NO_CERTIFICATE = "no certificate"
    UNKNOWN_CA = "unknown CA"
    SELF_SIGNED = "self-signed"
    EXPIRED = "expired"
    NOT_YET_VALID = "not yet valid"
    REVOKED = "revoked"
    WRONG_KEY_USAGE = "wrong key usage"
    NAME_MISMATCH = "name mismatch"
    BAD_SIGNATURE = "bad signature"
    CRL_UNUSABLE = "CRL unusable"
    REJECTED_BY_PEER = "rejected by peer"
    NOT_TLS = "not a TLS client hello"
    NOT_PROXY = "no valid PROXY header"
    HANDSHAKE_TIMEOUT = "handshake timed out"
    EVICTED = "evicted during handshake"
    CLOSED_BY_PEER = "closed before handshake"
    HANDSHAKE_FAILED = "handshake failed"


class Role(enum.Enum):
    """The role the peer's certificate must be issued for (its extendedKeyUsage)."""

    CLIENT = ExtendedKeyUsageOID.CLIENT_AUTH
    SERVER = ExtendedKeyUsageOID.SERVER_AUTH

    @property
    def usage_name(self) -> str:
        """The extendedKeyUsage name as RFC 5280 and OpenSSL write it."""
        return _USAGE_NAMES[self.value]


@dataclass(frozen=True)
class Rejection:
    """
    Why one handshake failed: the reason, a sentence of detail, and the
    subject and issuer of the certificate concerned, where there was one.
    """

    reason: Reason
    detail: str
    subject: str | None = None
    issuer: str | None = None

    def to_error(self, context: str) -> TLSVerificationError:
        """Build the error raised to the caller; ``context`` names the handshake that failed."""
        return TLSVerificationError(f"{context}: {self.detail}", str(self.reason))


_codes = SSL.X509VerificationCodes

_REASONS_BY_CODE: dict[int, Reason] = {
    _codes.ERR_CERT_HAS_EXPIRED: Reason.EXPIRED,
    _codes.ERR_CERT_NOT_YET_VALID: Reason.NOT_YET_VALID,
    _codes.ERR_CERT_REVOKED: Reason.REVOKED,
    _codes.ERR_DEPTH_ZERO_SELF_SIGNED_CERT: Reason.SELF_SIGNED,
    _codes.ERR_UNABLE_TO_GET_ISSUER_CERT: Reason.UNKNOWN_CA,
    _codes.ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY: Reason.UNKNOWN_CA,
    _codes.ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE: Reason.UNKNOWN_CA,
    _codes.ERR_SELF_SIGNED_CERT_IN_CHAIN: Reason.UNKNOWN_CA,
    _codes.ERR_CERT_UNTRUSTED: Reason.UNKNOWN_CA,
    _codes.ERR_INVALID_CA: Reason.UNKNOWN_CA,
    _codes.ERR_CERT_SIGNATURE_FAILURE: Reason.BAD_SIGNATURE,
    _codes.ERR_INVALID_PURPOSE: Reason.WRONG_KEY_USAGE,
    _codes.ERR_KEYUSAGE_NO_DIGITAL_SIGNATURE: Reason.WRONG_KEY_USAGE,
    _codes.ERR_UNABLE_TO_GET_CRL: Reason.CRL_UNUSABLE,
    _codes.ERR_CRL_HAS_EXPIRED: Reason.CRL_UNUSABLE,
    _codes.ERR_CRL_NOT_YET_VALID: Reason.CRL_UNUSABLE,
    _codes.ERR_CRL_SIGNATURE_FAILURE: Reason.CRL_UNUSABLE,
    _codes.ERR_UNABLE_TO_DECRYPT_CRL_SIGNATURE: Reason.CRL_UNUSABLE,
    _codes.ERR_HOSTNAME_MISMATCH: Reason.NAME_MISMATCH,
    _codes.ERR_IP_ADDRESS_MISMATCH: Reason.NAME_MISMATCH,
}

_USAGE_NAMES: dict[x509.ObjectIdentifier, str] = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}

# Words in OpenSSL's alert messages ("tlsv1 alert unknown ca", "sslv3 alert
# certificate expired", ...) and what they tell about our own certificate.
_REASONS_BY_ALERT: tuple[tuple[str, Reason], ...] = (
    ("unknown ca", Reason.UNKNOWN_CA),
    ("certificate expired", Reason.EXPIRED),
    ("certificate revoked", Reason.REVOKED),
    ("certificate required", Reason.NO_CERTIFICATE),
    ("unsupported certificate", Reason.WRONG_KEY_USAGE),
)

# OpenSSL's reason string when a server that requires a client certificate
# gets none (SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE).
_NO_PEER_CERTIFICATE = "peer did not return a certificate"


def describe_name(name: x509.Name) -> str:
    """Return ``name`` in RFC 4514 form, such as ``CN=alice``."""
    return name.rfc4514_string()


def _format_time(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def reject_certificate(error: int, depth: int, certificate: x509.Certificate) -> Rejection:
    """Describe the OpenSSL verify ``error`` raised for ``certificate`` at ``depth``."""
    reason = _REASONS_BY_CODE.get(error, Reason.HANDSHAKE_FAILED)
    subject = describe_name(certificate.subject)
    issuer = describe_name(certificate.issuer)
    where = "certificate" if depth == 0 else f"chain certificate at depth {depth}"

    if reason is Reason.EXPIRED:
        detail = f"{where} {subject} expired on {_format_time(certificate.not_valid_after_utc)}"
    elif reason is Reason.NOT_YET_VALID:
        detail = (
            f"{where} {subject} is not valid before "
            f"{_format_time(certificate.not_valid_before_utc)}"
        )
    elif reason is Reason.REVOKED:
        detail = f"{where} {subject} (serial {format_serial(certificate.serial_number)}) is revoked by the CRL"
    elif reason is Reason.SELF_SIGNED:
        detail = f"{where} {subject} is self-signed, not issued by a trusted CA"
    elif reason is Reason.UNKNOWN_CA:
        detail = f"{where} {subject} is issued by {issuer}, which is not a trusted CA"
    elif reason is Reason.BAD_SIGNATURE:
        detail = f"{where} {subject} has a signature that does not verify with the key of {issuer}"
    elif reason is Reason.WRONG_KEY_USAGE:
        detail = f"{where} {subject} is not issued for this use (keyUsage or extendedKeyUsage)"
    elif reason is Reason.CRL_UNUSABLE:
        detail = f"the CRL for {issuer} is missing, expired or invalid (X.509 error {error})"
    else:
        detail = f"{where} {subject} failed verification (X.509 error {error})"
    return Rejection(reason, detail, subject, issuer)


def check_extended_key_usage(certificate: x509.Certificate, role: Role) -> Rejection | None:
    """
    Return a rejection unless ``certificate`` carries extendedKeyUsage for ``role``.

    A certificate without the extension is rejected too, although RFC 5280
    allows any use then: netrpc's two CAs always set it, so its absence means
    the certificate was made for something else.
    """
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = x509.ExtendedKeyUsage([])
    if role.value in usages:
        return None

    subject = describe_name(certificate.subject)
    have = ", ".join(_USAGE_NAMES.get(usage, usage.dotted_string) for usage in usages) or "none"
    return Rejection(
        Reason.WRONG_KEY_USAGE,
        f"certificate {subject} lacks extendedKeyUsage {role.usage_name} (it has: {have})",
        subject,
        describe_name(certificate.issuer),
    )


def names_in_certificate(certificate: x509.Certificate) -> list[str]:
    """Return the DNS names and IP addresses of the subjectAltName, as text."""
    try:
        alt_names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        return []
    dns_names = alt_names.get_values_for_type(x509.DNSName)
    addresses = [str(address) for address in alt_names.get_values_for_type(x509.IPAddress)]
    return [*dns_names, *addresses]


def check_server_name(certificate: x509.Certificate, expected: str) -> Rejection | None:
    """
    Return a rejection unless ``certificate`` is valid for ``expected``, a DNS
    name or an IP address, by the rules of RFC 6125 (service-identity).

    It checks only the subjectAltName, never the CN, as RFC 6125 requires.
    """
    try:
        if is_ip_address(expected):
            verify_certificate_ip_address(certificate, expected)
        else:
            verify_certificate_hostname(certificate, expected)
    except (VerificationError, CertificateError):
        pass
    else:
        return None

    subject = describe_name(certificate.subject)
    names = ", ".join(names_in_certificate(certificate)) or "no subjectAltName at all"
    return Rejection(
        Reason.NAME_MISMATCH,
        f"certificate {subject} is not valid for the name {expected!r} (it is valid for: {names})",
        subject,
        describe_name(certificate.issuer),
    )


def is_ip_address(text: str) -> bool:
    """Tell whether ``text`` is an IPv4 or IPv6 address literal."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def reject_ssl_error(error: SSL.Error) -> Rejection:
    """Describe a handshake that failed in OpenSSL without a verify rejection."""
    messages = openssl_reasons(error)
    text = "; ".join(messages) or "no detail from OpenSSL"

    if any(_NO_PEER_CERTIFICATE in message for message in messages):
        return Rejection(Reason.NO_CERTIFICATE, "the peer sent no certificate")
    return rejected_by_peer(error) or Rejection(
        Reason.HANDSHAKE_FAILED, f"TLS handshake failed: {text}"
    )


def rejected_by_peer(error: SSL.Error) -> Rejection | None:
    """Return the rejection that an alert from the peer in ``error`` reports, if any."""
    for message in openssl_reasons(error):
        if "alert" in message:
            detail = f"the peer rejected the handshake with {message!r}"
            return Rejection(_reason_for_alert(message), detail)
    return None


def reason_for_verify_code(code: int) -> Reason:
    """Return the reason for OpenSSL's X.509 verify error ``code`` (stdlib ``ssl`` too)."""
    return _REASONS_BY_CODE.get(code, Reason.HANDSHAKE_FAILED)


def reason_for_alert(message: str) -> Reason:
    """Return the reason a TLS alert message such as "tlsv1 alert unknown ca" reports."""
    return _reason_for_alert(message)


def _reason_for_alert(message: str) -> Reason:
    for words, reason in _REASONS_BY_ALERT:
        if words in message:
            return reason
    return Reason.REJECTED_BY_PEER


def openssl_reasons(error: SSL.Error) -> list[str]:
    """Return the reason strings of the OpenSSL error queue carried by ``error``."""
    queue = error.args[0] if error.args else []
    if not isinstance(queue, list):
        return [str(queue)]
    return [str(entry[2]) for entry in queue if isinstance(entry, tuple) and len(entry) == 3]


class RejectionRecorder:
    """
    The first rejection of each TLS connection, kept until the connection
    object is garbage-collected.
    """

    def __init__(self) -> None:
        self._rejections: weakref.WeakKeyDictionary[SSL.Connection, Rejection] = (
            weakref.WeakKeyDictionary()
        )

    def record(self, connection: SSL.Connection, rejection: Rejection) -> None:
        """Keep ``rejection`` unless the connection already has one."""
        self._rejections.setdefault(connection, rejection)

    def rejection_for(self, connection: SSL.Connection) -> Rejection | None:
        """Return the first rejection recorded for ``connection``, if any."""
        return self._rejections.get(connection)


def make_verify_callback(
    recorder: RejectionRecorder, role: Role, server_name: str | None = None
) -> VerifyCallback:
    """
    Build an OpenSSL verify callback that keeps OpenSSL's chain verdict,
    requires extendedKeyUsage for ``role`` on the leaf, checks
    ``server_name`` when one is given, and records the first failure.
    """

    def verify(
        connection: SSL.Connection, certificate: crypto.X509, error: int, depth: int, ok: int
    ) -> bool:
        # An exception must not escape into OpenSSL: pyOpenSSL would re-raise
        # it from do_handshake, outside the handling of TLS errors. Failing
        # closed with the exception's text keeps the handshake rejected.
        try:
            rejection = _verify_one(certificate, error, depth, bool(ok), role, server_name)
        except Exception as unexpected:
            rejection = Rejection(
                Reason.HANDSHAKE_FAILED, f"certificate check failed unexpectedly: {unexpected!r}"
            )
        if rejection is None:
            return True
        recorder.record(connection, rejection)
        return False

    return verify


def _verify_one(
    certificate: crypto.X509,
    error: int,
    depth: int,
    ok: bool,
    role: Role,
    server_name: str | None,
) -> Rejection | None:
    converted = certificate.to_cryptography()
    if not ok and depth == 0 and error == _codes.ERR_INVALID_PURPOSE:
        # OpenSSL's purpose check found the wrong extendedKeyUsage; name it.
        return check_extended_key_usage(converted, role) or reject_certificate(
            error, depth, converted
        )
    if not ok:
        return reject_certificate(error, depth, converted)
    if depth > 0:
        return None

    rejection = check_extended_key_usage(converted, role)
    if rejection is None and server_name is not None:
        rejection = check_server_name(converted, server_name)
    return rejection
