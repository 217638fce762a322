"""
The certificate authority behind ``netrpc certs``: two CAs, leaf
certificates, the client CA's revocation list, and the PKI directory that
contains them.

Two layers:

- ``CertificateAuthority`` works in memory. It issues leaves with the
  identity as arguments and everything else keyword-only, including explicit
  validity windows, which tests use to build expired or not-yet-valid
  certificates.
- ``PKI`` is a directory in the layout ``netrpc certs`` creates, with
  production defaults and safe file writing (see ``netrpc.keyfiles``).

The server CA signs only server certificates and the client CA only client
certificates, so a client certificate can never pass as a server.
"""

from __future__ import annotations

import datetime
import enum
import functools
import ipaddress
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from netrpc._plural import plural
from netrpc.exceptions import ConfigurationError
from netrpc.identity import format_serial
from netrpc.keyfiles import (
    PRIVATE_KEY_MODE,
    PUBLIC_FILE_MODE,
    PrivateKey,
    encode_private_key,
    ensure_private_directory,
    is_key_file_encrypted,
    load_private_key,
    locked_directory,
    read_file,
    staged_files,
    write_file,
)

# Validity defaults, in days. CAs live long because replacing one means
# redistributing it to every machine; leaves are renewed about once a year.
DEFAULT_CA_DAYS = 3650
DEFAULT_LEAF_DAYS = 365
# A server that checks the CRL rejects every client once the CRL's nextUpdate
# has passed, so the CRL is valid as long as a leaf and re-signed on revoke.
DEFAULT_CRL_DAYS = 365
# ``PKI.certificates()`` flags certificates that expire within this many days.
EXPIRY_WARNING_DAYS = 30

# Certificates start this far in the past so that a verifier whose clock is
# slightly behind the issuing machine accepts them at once.
CLOCK_SKEW = datetime.timedelta(minutes=5)

# X.509 limits the commonName attribute to 64 characters (RFC 5280, ub-common-name).
MAX_COMMON_NAME_LENGTH = 64

# Client names become file names, so only letters, digits, dot, dash and
# underscore, starting with a letter or digit.
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_MAX_DNS_NAME_LENGTH = 253


class KeyType(enum.Enum):
    """The private key algorithms the CA tool generates."""

    EC_P256 = "ec-p256"
    RSA_4096 = "rsa-4096"
    ED25519 = "ed25519"

    def generate(self) -> PrivateKey:
        """Generate a new private key of this type."""
        if self is KeyType.EC_P256:
            return ec.generate_private_key(ec.SECP256R1())
        if self is KeyType.RSA_4096:
            return rsa.generate_private_key(public_exponent=65537, key_size=4096)
        return ed25519.Ed25519PrivateKey.generate()

    @classmethod
    def parse(cls, text: str) -> KeyType:
        """Return the key type named ``text``, as on the command line."""
        try:
            return cls(text)
        except ValueError:
            choices = ", ".join(key_type.value for key_type in cls)
            raise ConfigurationError(
                f"unknown key type {text!r}; choose one of {choices}"
            ) from None


class Usage(enum.Enum):
    """Purpose of a leaf certificate, written into its extendedKeyUsage."""

    SERVER = "server"
    CLIENT = "client"


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate together with its private key, both in memory."""

    certificate: x509.Certificate
    private_key: PrivateKey

    def certificate_pem(self) -> bytes:
        """Return the certificate as PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def private_key_pem(self, passphrase: bytes | None = None) -> bytes:
        """Return the private key as PKCS#8 PEM, encrypted if ``passphrase`` is given."""
        return encode_private_key(self.private_key, passphrase)

    def write(self, cert_path: Path, key_path: Path, *, passphrase: bytes | None = None) -> None:
        """Write the certificate (mode 0644) and the key (mode 0400) atomically."""
        with staged_files() as files:
            files.add(Path(cert_path), self.certificate_pem(), PUBLIC_FILE_MODE)
            files.add(Path(key_path), self.private_key_pem(passphrase), PRIVATE_KEY_MODE)


class CertificateAuthority:
    """
    A CA certificate and its private key, able to issue leaves and sign CRLs.

    It keeps no state beyond the two. The serials it has issued and revoked
    are in the files that ``PKI`` manages.
    """

    def __init__(self, certificate: x509.Certificate, private_key: PrivateKey) -> None:
        self.certificate = certificate
        self.private_key = private_key

    @classmethod
    def create(
        cls,
        common_name: str,
        *,
        key_type: KeyType = KeyType.EC_P256,
        days: int = DEFAULT_CA_DAYS,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> CertificateAuthority:
        """Create a self-signed CA that may sign leaves but no further CAs."""
        key = key_type.generate()
        name = _name(common_name)
        builder = _builder(name, name, key.public_key(), _validity(days, not_before, not_after))
        builder = (
            builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(_authority_key_identifier(key), critical=False)
        )
        return cls(_sign(builder, key), key)

    @classmethod
    def load(
        cls, cert_path: Path, key_path: Path, *, passphrase: bytes | None = None
    ) -> CertificateAuthority:
        """Load a CA from its PEM certificate and private key files."""
        certificate = load_certificate(Path(cert_path))
        key = load_private_key(Path(key_path), passphrase)
        if key.public_key() != certificate.public_key():
            raise ConfigurationError(
                f"private key {str(key_path)!r} does not match certificate "
                f"{str(cert_path)!r}; restore the key that belongs to this CA"
            )
        return cls(certificate, key)

    def certificate_pem(self) -> bytes:
        """Return the CA certificate as PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def private_key_pem(self, passphrase: bytes | None = None) -> bytes:
        """Return the CA key as PKCS#8 PEM, encrypted if ``passphrase`` is given."""
        return encode_private_key(self.private_key, passphrase)

    def issue(
        self,
        common_name: str,
        *,
        usage: Usage,
        names: Sequence[str] = (),
        key_type: KeyType = KeyType.EC_P256,
        days: int = DEFAULT_LEAF_DAYS,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> IssuedCertificate:
        """
        Issue a leaf certificate with subject CN=``common_name`` and a new key.

        ``names`` become the subjectAltName (DNS names and IP addresses);
        ``not_before`` and ``not_after`` override the window of ``days``
        starting now, so tests can build expired or future certificates.
        """
        key = key_type.generate()
        builder = _builder(
            _name(common_name),
            self.certificate.subject,
            key.public_key(),
            _validity(days, not_before, not_after),
        )
        builder = _add_leaf_extensions(builder, key, usage, names)
        builder = builder.add_extension(_authority_key_identifier(self.private_key), critical=False)
        return IssuedCertificate(_sign(builder, self.private_key), key)

    def sign_crl(
        self,
        revoked: Iterable[x509.RevokedCertificate],
        *,
        number: int,
        days: int = DEFAULT_CRL_DAYS,
    ) -> x509.CertificateRevocationList:
        """Sign a CRL with sequence ``number`` listing ``revoked``, valid for ``days``."""
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now - CLOCK_SKEW)
            .next_update(now + datetime.timedelta(days=_check_days(days)))
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(_authority_key_identifier(self.private_key), critical=False)
        )
        for entry in revoked:
            builder = builder.add_revoked_certificate(entry)
        return builder.sign(self.private_key, _signature_hash(self.private_key))


def self_signed_certificate(
    common_name: str,
    *,
    usage: Usage,
    names: Sequence[str] = (),
    key_type: KeyType = KeyType.EC_P256,
    days: int = DEFAULT_LEAF_DAYS,
) -> IssuedCertificate:
    """Make a self-signed leaf; tests use it as a certificate no CA vouches for."""
    key = key_type.generate()
    name = _name(common_name)
    builder = _builder(name, name, key.public_key(), _validity(days, None, None))
    builder = _add_leaf_extensions(builder, key, usage, names)
    return IssuedCertificate(_sign(builder, key), key)


def revoked_entry(serial: int, when: datetime.datetime | None = None) -> x509.RevokedCertificate:
    """Build the CRL entry that revokes ``serial`` at ``when`` (default: now)."""
    return (
        x509.RevokedCertificateBuilder()
        .serial_number(serial)
        .revocation_date(when or _now())
        .build()
    )


def parse_server_name(text: str) -> x509.GeneralName:
    """
    Turn a server name into a subjectAltName entry: an IP address (v4 or v6)
    or a DNS name, optionally with a wildcard as its whole leftmost label.
    """
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass

    labels = text.lower().rstrip(".").split(".")
    if labels[0] == "*" and len(labels) > 2:
        labels = labels[1:]
    valid = (
        0 < len(text) <= _MAX_DNS_NAME_LENGTH
        and text.isascii()
        and all(_DNS_LABEL.fullmatch(label) for label in labels)
    )
    if not valid:
        raise ConfigurationError(
            f"invalid server name {text!r}: expected a DNS name such as "
            "'rpc.example.com' or an IP address such as '127.0.0.1' "
            "(write internationalized names in their xn-- form)"
        )
    return x509.DNSName(text.lower().rstrip("."))


def check_server_names(server_names: Sequence[str]) -> None:
    """Raise ConfigurationError unless there is at least one name and every name is valid."""
    if not server_names:
        raise ConfigurationError(
            "no server name given; give at least one DNS name or IP address "
            "that clients use to reach the server"
        )
    for name in server_names:
        parse_server_name(name)


def check_client_name(name: str) -> str:
    """Return ``name`` if it is safe as a file name and a commonName, else raise."""
    if not _CLIENT_NAME.fullmatch(name):
        raise ConfigurationError(
            f"invalid client name {name!r}: use 1 to 64 letters, digits, '.', '-' "
            "or '_', starting with a letter or digit"
        )
    return name


def load_certificate(path: Path) -> x509.Certificate:
    """Load a PEM certificate, raising ConfigurationError if it is missing or invalid."""
    data = read_file(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as error:
        raise ConfigurationError(
            f"{str(path)!r} is not a PEM certificate; check the path"
        ) from error


def load_crl(path: Path) -> x509.CertificateRevocationList:
    """Load a PEM CRL, raising ConfigurationError if it is missing or invalid."""
    data = read_file(path, "revocation list")
    try:
        return x509.load_pem_x509_crl(data)
    except ValueError as error:
        raise ConfigurationError(
            f"{str(path)!r} is not a PEM certificate revocation list; check the path"
        ) from error


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _check_days(days: int) -> int:
    if days < 1:
        raise ConfigurationError(f"invalid validity {days!r} days; give at least 1 day")
    return days


def _validity(
    days: int,
    not_before: datetime.datetime | None,
    not_after: datetime.datetime | None,
) -> tuple[datetime.datetime, datetime.datetime]:
    now = _now()
    start = not_before if not_before is not None else now - CLOCK_SKEW
    end = not_after if not_after is not None else now + datetime.timedelta(days=_check_days(days))
    if end <= start:
        raise ConfigurationError(
            f"invalid validity window {start.isoformat()} to {end.isoformat()}; "
            "the end must come after the start"
        )
    return start, end


def _name(common_name: str) -> x509.Name:
    if not 0 < len(common_name) <= MAX_COMMON_NAME_LENGTH:
        raise ConfigurationError(
            f"invalid common name {common_name!r}: give 1 to "
            f"{MAX_COMMON_NAME_LENGTH} characters"
        )
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey,
    validity: tuple[datetime.datetime, datetime.datetime],
) -> x509.CertificateBuilder:
    # random_serial_number() gives 159 random bits, above the 64 that the
    # CA/Browser Forum baseline requires against chosen-prefix collisions.
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_key_usage(key: PrivateKey) -> x509.KeyUsage:
    # RSA key exchange (TLS 1.2 without ECDHE) encrypts to the key; the other
    # key types only ever sign.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=isinstance(key, rsa.RSAPrivateKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _add_leaf_extensions(
    builder: x509.CertificateBuilder, key: PrivateKey, usage: Usage, names: Sequence[str]
) -> x509.CertificateBuilder:
    purpose = ExtendedKeyUsageOID.SERVER_AUTH if usage is Usage.SERVER else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(key), critical=True)
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
    )
    if names:
        alt_names = [parse_server_name(name) for name in names]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return builder


def _authority_key_identifier(issuer_key: PrivateKey) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())


def _signature_hash(key: PrivateKey) -> hashes.SHA256 | None:
    # Ed25519 hashes internally, and cryptography requires None for it.
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _sign(builder: x509.CertificateBuilder, key: PrivateKey) -> x509.Certificate:
    return builder.sign(key, _signature_hash(key))


@dataclass(frozen=True)
class CertificateRecord:
    """One certificate found in a PKI directory, as ``netrpc certs list`` shows it."""

    name: str
    role: str
    path: Path
    # None when the file could not be read as a certificate; see ``problem``.
    serial: int | None
    not_after: datetime.datetime | None
    revoked: bool
    # False when the CA that should have signed it did not, as after ``init --force``.
    issued_here: bool = True
    # Why the file was not read, such as "unreadable: not a PEM certificate".
    problem: str | None = None

    def status(self, now: datetime.datetime | None = None) -> str:
        """
        Return the problem, "not issued by this PKI", "revoked", "expired",
        "expires in N days" (within 30 days) or "valid", the first that applies.
        """
        if self.problem is not None:
            return self.problem
        assert self.not_after is not None
        if not self.issued_here:
            return "not issued by this PKI"
        if self.revoked:
            return "revoked"
        remaining = self.not_after - (now or _now())
        if remaining <= datetime.timedelta(0):
            return "expired"
        if remaining <= datetime.timedelta(days=EXPIRY_WARNING_DAYS):
            return f"expires in {plural(remaining.days, 'day')}"
        return "valid"


_Parameters = ParamSpec("_Parameters")
_Result = TypeVar("_Result")


def _exclusive(
    method: Callable[Concatenate[PKI, _Parameters], _Result],
) -> Callable[Concatenate[PKI, _Parameters], _Result]:
    # Run a PKI method that changes files while holding the directory lock.
    @functools.wraps(method)
    def locked(pki: PKI, /, *args: _Parameters.args, **kwargs: _Parameters.kwargs) -> _Result:
        pki._check_exists()
        with locked_directory(pki.directory):
            return method(pki, *args, **kwargs)

    return locked


class PKI:
    """
    A PKI directory in the layout that ``netrpc certs`` creates::

        server-ca.crt  server-ca.key    the CA that signs server certificates
        client-ca.crt  client-ca.key    the CA that signs client certificates
        client-ca.crl                   clients revoked by the client CA
        server.crt     server.key       the server's certificate and key
        clients/NAME.crt  clients/NAME.key
        clients/revoked/NAME-SERIAL.crt  replaced after revocation

    ``ca_passphrase=None`` means the CA keys are unencrypted. The command
    line encrypts them unless ``--no-passphrase`` is given.
    """

    def __init__(self, directory: os.PathLike[str] | str) -> None:
        self.directory = Path(directory)

    @property
    def server_ca_cert(self) -> Path:
        return self.directory / "server-ca.crt"

    @property
    def server_ca_key(self) -> Path:
        return self.directory / "server-ca.key"

    @property
    def client_ca_cert(self) -> Path:
        return self.directory / "client-ca.crt"

    @property
    def client_ca_key(self) -> Path:
        return self.directory / "client-ca.key"

    @property
    def crl(self) -> Path:
        return self.directory / "client-ca.crl"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def clients_directory(self) -> Path:
        return self.directory / "clients"

    @property
    def revoked_directory(self) -> Path:
        return self.clients_directory / "revoked"

    def client_cert(self, name: str) -> Path:
        """Return the path of client ``name``'s certificate."""
        return self.clients_directory / f"{check_client_name(name)}.crt"

    def client_key(self, name: str) -> Path:
        """Return the path of client ``name``'s private key."""
        return self.clients_directory / f"{check_client_name(name)}.key"

    def ca_files(self) -> tuple[Path, ...]:
        """Return the paths that ``create`` refuses to overwrite without ``force``."""
        return (
            self.server_ca_cert,
            self.server_ca_key,
            self.client_ca_cert,
            self.client_ca_key,
            self.crl,
        )

    @classmethod
    def create(
        cls,
        directory: os.PathLike[str] | str,
        server_names: Sequence[str],
        *,
        key_type: KeyType = KeyType.EC_P256,
        ca_passphrase: bytes | None = None,
        server_key_passphrase: bytes | None = None,
        force: bool = False,
        ca_days: int = DEFAULT_CA_DAYS,
        server_days: int = DEFAULT_LEAF_DAYS,
        crl_days: int = DEFAULT_CRL_DAYS,
    ) -> PKI:
        """
        Create both CAs, the server certificate and an empty CRL in ``directory``.

        The directory is created (its parent must exist) and set to mode
        0700. Raise ConfigurationError if it already contains CA files,
        unless ``force`` is true; forcing makes earlier client certificates
        worthless, because they were signed by the replaced client CA.
        """
        pki = cls(directory)
        pki.check_can_create(server_names, force=force)

        server_ca = CertificateAuthority.create(_ca_common_name("server"), key_type=key_type, days=ca_days)
        client_ca = CertificateAuthority.create(_ca_common_name("client"), key_type=key_type, days=ca_days)
        server = server_ca.issue(
            _server_common_name(server_names),
            usage=Usage.SERVER,
            names=server_names,
            key_type=key_type,
            days=server_days,
        )
        crl = client_ca.sign_crl([], number=1, days=crl_days)

        created = ensure_private_directory(pki.directory)
        try:
            with staged_files() as files:
                files.add(pki.server_ca_cert, server_ca.certificate_pem(), PUBLIC_FILE_MODE)
                files.add(pki.server_ca_key, server_ca.private_key_pem(ca_passphrase), PRIVATE_KEY_MODE)
                files.add(pki.client_ca_cert, client_ca.certificate_pem(), PUBLIC_FILE_MODE)
                files.add(pki.client_ca_key, client_ca.private_key_pem(ca_passphrase), PRIVATE_KEY_MODE)
                files.add(pki.crl, crl.public_bytes(serialization.Encoding.PEM), PUBLIC_FILE_MODE)
                files.add(pki.server_cert, server.certificate_pem(), PUBLIC_FILE_MODE)
                files.add(pki.server_key, server.private_key_pem(server_key_passphrase), PRIVATE_KEY_MODE)
        except BaseException:
            if created:
                pki.directory.rmdir()
            raise
        return pki

    def check_can_create(self, server_names: Sequence[str], *, force: bool = False) -> None:
        """Raise ConfigurationError if ``create`` would fail on these arguments."""
        check_server_names(server_names)

        existing = [path.name for path in self.ca_files() if path.exists()]
        if existing and not force:
            raise ConfigurationError(
                f"{str(self.directory)!r} already contains CA files ({', '.join(existing)}); "
                "choose another directory, or pass --force to replace both CAs"
            )

    def server_authority(self, passphrase: bytes | None = None) -> CertificateAuthority:
        """Load the server CA; ``passphrase`` decrypts its key if it is encrypted."""
        self._check_exists(self.server_ca_cert, self.server_ca_key)
        return CertificateAuthority.load(self.server_ca_cert, self.server_ca_key, passphrase=passphrase)

    def client_authority(self, passphrase: bytes | None = None) -> CertificateAuthority:
        """Load the client CA; ``passphrase`` decrypts its key if it is encrypted."""
        self._check_exists(self.client_ca_cert, self.client_ca_key)
        return CertificateAuthority.load(self.client_ca_cert, self.client_ca_key, passphrase=passphrase)

    def is_ca_key_encrypted(self, usage: Usage) -> bool:
        """Tell whether the key of the server CA or the client CA is encrypted."""
        if usage is Usage.SERVER:
            cert_path, key_path = self.server_ca_cert, self.server_ca_key
        else:
            cert_path, key_path = self.client_ca_cert, self.client_ca_key
        self._check_exists(cert_path, key_path)
        return is_key_file_encrypted(key_path)

    def _check_exists(self, *paths: Path) -> None:
        if not self.directory.is_dir():
            raise ConfigurationError(
                f"PKI directory {str(self.directory)!r} does not exist; "
                "check the path or create it with 'netrpc certs init'"
            )
        for path in paths:
            if not path.exists():
                raise ConfigurationError(
                    f"{str(self.directory)!r} is not a netrpc PKI directory: {path.name} "
                    "is missing; check the path or create one with 'netrpc certs init'"
                )

    @_exclusive
    def issue_client(
        self,
        name: str,
        *,
        days: int = DEFAULT_LEAF_DAYS,
        key_type: KeyType = KeyType.EC_P256,
        ca_passphrase: bytes | None = None,
        key_passphrase: bytes | None = None,
    ) -> tuple[Path, Path]:
        """
        Issue a client certificate with CN=``name``; return its (cert, key) paths.

        Raise ConfigurationError if ``name`` is not a safe file name or is
        already issued and not revoked. A revoked certificate of the same
        name moves to ``clients/revoked/`` first.
        """
        cert_path, key_path = self.client_cert(name), self.client_key(name)
        previous = self.check_client_available(name)
        authority = self.client_authority(ca_passphrase)
        issued = authority.issue(name, usage=Usage.CLIENT, key_type=key_type, days=days)

        ensure_private_directory(self.clients_directory)
        with staged_files() as files:
            files.add(cert_path, issued.certificate_pem(), PUBLIC_FILE_MODE)
            files.add(key_path, issued.private_key_pem(key_passphrase), PRIVATE_KEY_MODE)
            if previous is not None:
                self._archive_client(name, previous)
        return cert_path, key_path

    def check_client_available(self, name: str) -> x509.Certificate | None:
        """
        Raise ConfigurationError unless a certificate for ``name`` may be issued.

        Return the revoked certificate that a new one would replace, or None.
        """
        cert_path, key_path = self.client_cert(name), self.client_key(name)
        if not cert_path.exists():
            if key_path.exists():
                raise ConfigurationError(
                    f"{str(key_path)!r} exists without its certificate; "
                    "remove it or choose another client name"
                )
            return None

        certificate = load_certificate(cert_path)
        if certificate.serial_number not in self.revoked_serials():
            raise ConfigurationError(
                f"client {name!r} is already issued and not revoked ({str(cert_path)!r}); "
                f"revoke it first with 'netrpc certs revoke' or choose another name"
            )
        return certificate

    def _archive_client(self, name: str, certificate: x509.Certificate) -> None:
        ensure_private_directory(self.revoked_directory)
        stem = f"{name}-{format_serial(certificate.serial_number)}"
        archived = self.revoked_directory / f"{stem}.crt"
        os.replace(self.client_cert(name), archived)
        if self.client_key(name).exists():
            os.replace(self.client_key(name), self.revoked_directory / f"{stem}.key")

    @_exclusive
    def revoke_client(
        self,
        name: str,
        *,
        ca_passphrase: bytes | None = None,
        crl_days: int = DEFAULT_CRL_DAYS,
    ) -> bool:
        """
        Add client ``name``'s serial to the CRL and re-sign it, valid for ``crl_days``.

        Return False, changing nothing, if it was already revoked. Raise
        ConfigurationError if no client ``name`` was issued from this PKI.
        """
        cert_path = self.client_cert(name)
        certificate = self.load_client_certificate(name)
        crl = self.load_crl()
        if crl.get_revoked_certificate_by_serial_number(certificate.serial_number) is not None:
            return False

        authority = self.client_authority(ca_passphrase)
        self._check_issued_by(certificate, cert_path, authority)
        entries = [*crl, revoked_entry(certificate.serial_number)]
        self._write_crl(authority, entries, _crl_number(crl) + 1, crl_days)
        return True

    @_exclusive
    def renew_crl(
        self, *, ca_passphrase: bytes | None = None, days: int = DEFAULT_CRL_DAYS
    ) -> x509.CertificateRevocationList:
        """
        Re-sign the CRL with the same entries and a nextUpdate ``days`` from now.

        A server that checks the CRL rejects every client once nextUpdate has
        passed, so this must run before that date.
        """
        crl = self.load_crl()
        authority = self.client_authority(ca_passphrase)
        return self._write_crl(authority, list(crl), _crl_number(crl) + 1, days)

    def _write_crl(
        self,
        authority: CertificateAuthority,
        entries: Sequence[x509.RevokedCertificate],
        number: int,
        days: int,
    ) -> x509.CertificateRevocationList:
        crl = authority.sign_crl(entries, number=number, days=days)
        write_file(self.crl, crl.public_bytes(serialization.Encoding.PEM), PUBLIC_FILE_MODE)
        return crl

    def _check_issued_by(
        self, certificate: x509.Certificate, path: Path, authority: CertificateAuthority
    ) -> None:
        if not _is_issued_by(certificate, authority.certificate):
            raise ConfigurationError(
                f"{str(path)!r} was not issued by the client CA in {str(self.directory)!r} "
                "(was the CA replaced with --force?); remove the file by hand"
            )

    @_exclusive
    def renew_server(
        self,
        server_names: Sequence[str],
        *,
        days: int = DEFAULT_LEAF_DAYS,
        key_type: KeyType = KeyType.EC_P256,
        ca_passphrase: bytes | None = None,
        key_passphrase: bytes | None = None,
    ) -> tuple[Path, Path]:
        """Replace the server certificate and key, touching neither CA; return their paths."""
        check_server_names(server_names)

        authority = self.server_authority(ca_passphrase)
        issued = authority.issue(
            _server_common_name(server_names),
            usage=Usage.SERVER,
            names=server_names,
            key_type=key_type,
            days=days,
        )
        issued.write(self.server_cert, self.server_key, passphrase=key_passphrase)
        return self.server_cert, self.server_key

    def load_crl(self) -> x509.CertificateRevocationList:
        """Load the client CA's CRL."""
        self._check_exists(self.crl)
        return load_crl(self.crl)

    def revoked_serials(self) -> dict[int, datetime.datetime]:
        """Return the revoked serials with their revocation dates."""
        return {entry.serial_number: entry.revocation_date_utc for entry in self.load_crl()}

    def load_client_certificate(self, name: str) -> x509.Certificate:
        """Load client ``name``'s current certificate, raising if none was issued."""
        cert_path = self.client_cert(name)
        self._check_exists(self.crl)
        if not cert_path.exists():
            raise ConfigurationError(
                f"no client named {name!r} in {str(self.directory)!r} "
                f"({cert_path.name} is missing); 'netrpc certs list' shows the issued names"
            )
        return load_certificate(cert_path)

    def is_revoked(self, name: str) -> bool:
        """Tell whether client ``name``'s current certificate is on the CRL."""
        certificate = self.load_client_certificate(name)
        return certificate.serial_number in self.revoked_serials()

    def certificates(self) -> list[CertificateRecord]:
        """List every certificate in the directory: CAs, server, clients, archived clients."""
        self._check_exists(self.crl, self.server_ca_cert, self.client_ca_cert)
        revoked = self.revoked_serials()
        server_ca = load_certificate(self.server_ca_cert)
        client_ca = load_certificate(self.client_ca_cert)
        found = [
            ("server-ca", "server CA", self.server_ca_cert, server_ca),
            ("client-ca", "client CA", self.client_ca_cert, client_ca),
            ("server", "server", self.server_cert, server_ca),
        ]
        client_paths = [
            *sorted(self.clients_directory.glob("*.crt")),
            *sorted(self.revoked_directory.glob("*.crt")),
        ]
        found += [(path.stem, "client", path, client_ca) for path in client_paths]

        records = []
        for name, role, path, issuer in found:
            if os.path.lexists(path):
                records.append(_certificate_record(name, role, path, issuer, revoked))
        return records


def _certificate_record(
    name: str, role: str, path: Path, issuer: x509.Certificate, revoked: dict[int, datetime.datetime]
) -> CertificateRecord:
    """
    Describe the certificate at ``path``, or why it cannot be read. A path
    that is not a regular file is never opened: a FIFO would block the read.
    """
    kind = _file_kind(path)
    if kind is not None:
        return CertificateRecord(name, role, path, None, None, False, problem=f"skipped: {kind}")
    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as error:
        reason = (error.strerror or str(error)).lower()
        return CertificateRecord(name, role, path, None, None, False, problem=f"unreadable: {reason}")
    except ValueError:
        problem = "unreadable: not a PEM certificate"
        return CertificateRecord(name, role, path, None, None, False, problem=problem)

    return CertificateRecord(
        name=name,
        role=role,
        path=path,
        serial=certificate.serial_number,
        not_after=certificate.not_valid_after_utc,
        revoked=role == "client" and certificate.serial_number in revoked,
        issued_here=_is_issued_by(certificate, issuer),
    )


def _file_kind(path: Path) -> str | None:
    """Name what ``path`` is when it is not a regular file, such as "directory"; else None."""
    mode = path.lstat().st_mode
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    return "not a regular file"


def _is_issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _ca_common_name(role: str) -> str:
    # A random suffix keeps the issuer names of two PKIs apart, so a verifier
    # never mistakes one PKI's CA for the other's.
    return f"netrpc {role} CA {secrets.token_hex(4)}"


def _server_common_name(server_names: Sequence[str]) -> str:
    # Clients match the subjectAltName; the CN only helps people reading it.
    first = server_names[0]
    return first if len(first) <= MAX_COMMON_NAME_LENGTH else "netrpc server"


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0
