"""
Load and check the PEM files of a TLS endpoint before any connection uses
them.

Every problem an operator can fix is found here, at start or reload, and
raised as one ``ConfigurationError`` that names the file and the fix: a
missing or unreadable file, a wrong passphrase, a key that does not match its
certificate, a certificate outside its validity period, a CA file that contains
no CA, a private key readable by group or others, a CRL that the CA did not
sign or that has expired.
"""

from __future__ import annotations

import datetime
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from netrpc.exceptions import ConfigurationError, PassphraseError
from netrpc.keyfiles import PrivateKey, is_encrypted_pem, load_private_key, read_file
from netrpc.verify import Role, check_extended_key_usage, describe_name

# Group and other permission bits. A private key or passphrase file with any
# of them set is rejected, as ssh rejects such identity files.
_GROUP_OTHER_BITS = 0o077


@dataclass(frozen=True)
class TLSFiles:
    """
    The paths of one side's TLS material, and the passphrase of its key.

    ``ca_certificates`` contains the only CAs trusted for the peer: the client
    CA on a server, the server CA on a client. ``crl`` is used on a server
    only.
    """

    private_key: Path
    certificate: Path
    ca_certificates: Path
    crl: Path | None = None
    passphrase: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class TLSMaterial:
    """The checked contents of ``TLSFiles``, ready to build an OpenSSL context."""

    files: TLSFiles
    private_key: PrivateKey
    chain: Sequence[x509.Certificate]
    ca_certificates: Sequence[x509.Certificate]
    crl: x509.CertificateRevocationList | None = None

    @property
    def certificate(self) -> x509.Certificate:
        """The leaf certificate, first in the chain file."""
        return self.chain[0]


def load_material(
    files: TLSFiles,
    role: Role,
    now: datetime.datetime | None = None,
    *,
    loaded_key: PrivateKey | None = None,
) -> TLSMaterial:
    """
    Read and check every file of ``files`` for a local endpoint of ``role``.

    ``role`` is this side's role: its own certificate must carry
    extendedKeyUsage for it, because the peer requires that. Raise
    ``ConfigurationError`` (``PassphraseError`` for a passphrase problem)
    naming the first file that is wrong.

    ``loaded_key`` is the key read earlier, used when this process may no
    longer read the key file: after a daemon started as root has switched
    to its unprivileged user, a root-only key stays root-only.
    """
    moment = now or datetime.datetime.now(datetime.timezone.utc)

    if loaded_key is not None and not os.access(files.private_key, os.R_OK):
        private_key = loaded_key
    else:
        check_private_file_mode(files.private_key, "private key")
        private_key = load_private_key(files.private_key, files.passphrase)
    chain = load_certificate_chain(files.certificate)
    check_key_matches(private_key, chain[0], files)
    check_validity(chain[0], files.certificate, "certificate", moment)
    check_own_usage(chain[0], files.certificate, role)

    ca_certificates = load_ca_certificates(files.ca_certificates, moment)
    crl = None
    if files.crl is not None:
        crl = load_checked_crl(files.crl, ca_certificates, files.ca_certificates, moment)
    return TLSMaterial(files, private_key, tuple(chain), tuple(ca_certificates), crl)


def check_private_file_mode(path: Path, what: str) -> None:
    """Raise ``ConfigurationError`` if group or others may access ``path``."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        # Reading the file reports a missing or unreadable file in detail.
        return
    if mode & _GROUP_OTHER_BITS:
        raise ConfigurationError(
            f"permissions {mode:04o} for {what} {str(path)!r} are too open: "
            f"it must not be accessible by group or others; run chmod 600 {path}"
        )


def read_passphrase_file(path: Path) -> bytes:
    """
    Return the passphrase stored in ``path``, without its final line break.

    The file must be private, like the key it unlocks.
    """
    check_private_file_mode(path, "passphrase file")
    data = read_file(path, "passphrase file")
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise PassphraseError(
            f"passphrase file {str(path)!r} is empty; write the key's passphrase into it"
        )
    return data


def key_needs_passphrase(path: Path) -> bool:
    """Tell whether the private key at ``path`` is encrypted with a passphrase."""
    return is_encrypted_pem(read_file(path, "private key"))


def load_certificate_chain(path: Path) -> list[x509.Certificate]:
    """Load the certificates of a PEM file: the leaf first, then its chain."""
    data = read_file(path, "certificate")
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError as error:
        raise ConfigurationError(
            f"certificate file {str(path)!r} contains no PEM certificate; check the path"
        ) from error
    return chain


def check_key_matches(key: PrivateKey, certificate: x509.Certificate, files: TLSFiles) -> None:
    """Raise ``ConfigurationError`` unless ``key`` is the key of ``certificate``."""
    if key.public_key() == certificate.public_key():
        return
    raise ConfigurationError(
        f"private key {str(files.private_key)!r} does not match certificate "
        f"{str(files.certificate)!r} ({describe_name(certificate.subject)}); "
        "give the key that was issued with this certificate"
    )


def check_validity(
    certificate: x509.Certificate, path: Path, what: str, now: datetime.datetime
) -> None:
    """Raise ``ConfigurationError`` if ``certificate`` is expired or not yet valid at ``now``."""
    subject = describe_name(certificate.subject)
    if now > certificate.not_valid_after_utc:
        raise ConfigurationError(
            f"{what} {str(path)!r} ({subject}) expired on "
            f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC; renew it"
        )
    if now < certificate.not_valid_before_utc:
        raise ConfigurationError(
            f"{what} {str(path)!r} ({subject}) is not valid before "
            f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC; "
            "check this machine's clock or wait until then"
        )


def check_own_usage(certificate: x509.Certificate, path: Path, role: Role) -> None:
    """Raise ``ConfigurationError`` unless ``certificate`` is issued for ``role``."""
    rejection = check_extended_key_usage(certificate, role)
    if rejection is None:
        return
    kind = "server" if role is Role.SERVER else "client"
    raise ConfigurationError(
        f"certificate {str(path)!r}: {rejection.detail}, so peers reject it; "
        f"give a {kind} certificate"
    )


def load_ca_certificates(path: Path, now: datetime.datetime) -> list[x509.Certificate]:
    """Load the trusted CA certificates of ``path``, each of which must be a valid CA."""
    certificates = load_certificate_chain(path)
    for certificate in certificates:
        if not _is_ca(certificate):
            raise ConfigurationError(
                f"CA file {str(path)!r} contains {describe_name(certificate.subject)}, "
                "which is not a CA certificate (no basicConstraints CA:TRUE); "
                "give the CA certificate that issued the peers' certificates, "
                "not a leaf certificate"
            )
        check_validity(certificate, path, "CA certificate", now)
    return certificates


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return False
    return constraints.value.ca


def load_checked_crl(
    path: Path,
    ca_certificates: Sequence[x509.Certificate],
    ca_path: Path,
    now: datetime.datetime,
) -> x509.CertificateRevocationList:
    """Load the CRL at ``path`` and check that a trusted CA signed it and it is current."""
    data = read_file(path, "CRL")
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as error:
        raise ConfigurationError(
            f"{str(path)!r} is not a PEM certificate revocation list; check the path"
        ) from error

    if not any(_signed_by(crl, ca) for ca in ca_certificates):
        raise ConfigurationError(
            f"CRL {str(path)!r} (issuer {describe_name(crl.issuer)}) is not signed by "
            f"a CA in {str(ca_path)!r}; give the CRL of that CA"
        )
    next_update = crl.next_update_utc
    if next_update is not None and now > next_update:
        raise ConfigurationError(
            f"CRL {str(path)!r} expired on {next_update:%Y-%m-%d %H:%M:%S} UTC, "
            "so every client would be rejected; issue a new CRL from the client CA"
        )
    return crl


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    if crl.issuer != ca.subject:
        return False
    public_key = ca.public_key()
    try:
        return crl.is_signature_valid(public_key)  # type: ignore[arg-type]
    except TypeError:
        # A CA key type that cannot sign CRLs (such as X25519) signed nothing.
        return False
