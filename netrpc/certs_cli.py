"""
``netrpc certs``: create and run the two-CA PKI for mutual TLS.

Subcommands: ``init``, ``issue``, ``revoke``, ``server``, ``crl``,
``list`` and ``show``. The work happens in ``netrpc.certs``; this module reads
passphrases, calls the library and prints short summaries. Nothing here
prints key material or a passphrase.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import os
import stat
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, SignatureAlgorithmOID

from netrpc._plural import plural
from netrpc.certs import (
    DEFAULT_CA_DAYS,
    DEFAULT_CRL_DAYS,
    DEFAULT_LEAF_DAYS,
    EXPIRY_WARNING_DAYS,
    PKI,
    KeyType,
    Usage,
    check_server_names,
    load_certificate,
)
from netrpc.exceptions import ConfigurationError, NetrpcError
from netrpc.identity import format_serial
from netrpc.keyfiles import check_passphrase, is_encrypted_pem, read_file

KEY_TYPE_CHOICES = [key_type.value for key_type in KeyType]

# Names that openssl prints, for the algorithms and purposes this tool uses.
_OID_NAMES = {
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: "ecdsa-with-SHA256",
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: "ecdsa-with-SHA384",
    SignatureAlgorithmOID.RSA_WITH_SHA256: "sha256WithRSAEncryption",
    SignatureAlgorithmOID.RSA_WITH_SHA384: "sha384WithRSAEncryption",
    SignatureAlgorithmOID.RSA_WITH_SHA1: "sha1WithRSAEncryption",
    SignatureAlgorithmOID.ED25519: "ED25519",
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}

DESCRIPTION = """\
Create and run the PKI for netrpc's mutual TLS: a server CA that signs only
server certificates, a client CA that signs only client certificates, the
server certificate, one certificate per client, and the client CA's
revocation list. CA keys are encrypted unless --no-passphrase is given;
server and client keys are unencrypted unless --encrypt-key is given, so
services start unattended. Private keys are written with mode 0400 and the
PKI directory gets mode 0700.
"""

EPILOG = """\
example, a development PKI:
  netrpc certs init certs/dev --server-name localhost --server-name 127.0.0.1 --no-passphrase
  netrpc certs issue certs/dev demo
"""


def register(subparsers: Any) -> None:
    """Add ``certs`` and its subcommands to the ``netrpc`` parser."""
    parser = subparsers.add_parser(
        "certs",
        help="create and manage the CAs, server and client certificates",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(title="subcommands", metavar="SUBCOMMAND", required=True)
    _add_init(commands)
    _add_issue(commands)
    _add_revoke(commands)
    _add_server(commands)
    _add_crl(commands)
    _add_list(commands)
    _add_show(commands)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``netrpc certs`` on its own and return the exit status."""
    parser = argparse.ArgumentParser(prog="netrpc")
    register(parser.add_subparsers(required=True))
    arguments = parser.parse_args(["certs", *(sys.argv[1:] if argv is None else argv)])
    try:
        status: int = arguments.handler(arguments)
    except NetrpcError as error:
        print(f"netrpc: error: {error}", file=sys.stderr)
        return getattr(error, "exit_status", 1)
    return status


# Parsers


def _add_init(commands: Any) -> None:
    parser = commands.add_parser(
        "init",
        help="create both CAs, the server certificate and an empty CRL",
        description="Create server-ca.crt/.key, client-ca.crt/.key, client-ca.crl, "
        "server.crt and server.key in DIR. DIR is created if missing (its parent "
        "must exist) and set to mode 0700. Both CA keys are encrypted with the "
        "same passphrase, asked twice without echo unless --passphrase-file or "
        "--no-passphrase is given.",
    )
    parser.add_argument("directory", metavar="DIR", type=Path, help="the PKI directory to create")
    _add_server_name_option(parser)
    _add_key_type_option(parser)
    parser.add_argument(
        "--ca-days",
        type=int,
        default=DEFAULT_CA_DAYS,
        metavar="N",
        help="validity of both CA certificates in days (default: %(default)s)",
    )
    _add_days_option(parser, "the server certificate")
    _add_crl_days_option(parser)
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace existing CA files in DIR; certificates issued by the old CAs "
        "stop working",
    )

    _add_new_ca_passphrase_options(parser)
    _add_encrypt_key_options(parser, "the server key")
    parser.set_defaults(handler=run_init)


def _add_new_ca_passphrase_options(parser: argparse.ArgumentParser) -> None:
    secret = parser.add_mutually_exclusive_group()
    secret.add_argument(
        "--passphrase-file",
        type=Path,
        metavar="FILE",
        help="read the passphrase for both CA keys from the first line of FILE "
        "instead of asking for it",
    )
    secret.add_argument(
        "--no-passphrase",
        action="store_true",
        help="write the CA keys unencrypted (for development PKIs only)",
    )


def _add_issue(commands: Any) -> None:
    parser = commands.add_parser(
        "issue",
        help="issue a client certificate",
        description="Write DIR/clients/NAME.crt and DIR/clients/NAME.key with subject "
        "CN=NAME, signed by the client CA. NAME may be reused only after its "
        "certificate was revoked; the revoked pair then moves to DIR/clients/revoked/.",
    )
    _add_directory_argument(parser)
    parser.add_argument(
        "name",
        metavar="NAME",
        help="client name: 1 to 64 letters, digits, '.', '-' or '_', starting with "
        "a letter or digit",
    )
    _add_days_option(parser, "the client certificate")
    _add_key_type_option(parser)
    _add_ca_passphrase_option(parser, "client")
    _add_encrypt_key_options(parser, "the client key")
    parser.set_defaults(handler=run_issue)


def _add_revoke(commands: Any) -> None:
    parser = commands.add_parser(
        "revoke",
        help="revoke a client certificate",
        description="Add the serial of DIR/clients/NAME.crt to DIR/client-ca.crl and "
        "re-sign it. Revoking twice changes nothing. Copy the new CRL to every "
        "server afterwards.",
    )
    _add_directory_argument(parser)
    parser.add_argument("name", metavar="NAME", help="the client to revoke")
    _add_crl_days_option(parser)
    _add_ca_passphrase_option(parser, "client")
    parser.set_defaults(handler=run_revoke)


def _add_crl(commands: Any) -> None:
    parser = commands.add_parser(
        "crl",
        help="re-sign the revocation list before its next update date",
        description="Re-sign DIR/client-ca.crl with the same revoked serials and a new "
        "next update date. A server that checks the CRL rejects every client once "
        "that date has passed, so run this before it ('netrpc certs list' shows it) "
        "and copy the CRL to every server.",
    )
    _add_directory_argument(parser)
    _add_crl_days_option(parser)
    _add_ca_passphrase_option(parser, "client")
    parser.set_defaults(handler=run_crl)


def _add_server(commands: Any) -> None:
    parser = commands.add_parser(
        "server",
        help="renew the server certificate",
        description="Replace DIR/server.crt and DIR/server.key with a new key and a "
        "certificate from the server CA. Neither CA changes, so clients keep "
        "working without an update.",
    )
    _add_directory_argument(parser)
    _add_server_name_option(parser)
    _add_days_option(parser, "the server certificate")
    _add_key_type_option(parser)
    _add_ca_passphrase_option(parser, "server")
    _add_encrypt_key_options(parser, "the server key")
    parser.set_defaults(handler=run_server)


def _add_list(commands: Any) -> None:
    parser = commands.add_parser(
        "list",
        help="list the certificates in a PKI directory",
        description="List every certificate in DIR with its serial, expiry and status "
        f"(revoked, expired, or expiring within {EXPIRY_WARNING_DAYS} days), and "
        "when the CRL must be renewed.",
    )
    _add_directory_argument(parser)
    parser.set_defaults(handler=run_list)


def _add_show(commands: Any) -> None:
    parser = commands.add_parser(
        "show",
        help="describe a certificate, CRL or private key file",
        description="Print what FILE contains: for a certificate its subject, issuer, "
        "subjectAltNames, validity, key type and size and SHA-256 fingerprint; for a "
        "CRL the revoked serials with dates; for a private key its type and whether "
        "it is encrypted. Key material is never printed.",
    )
    parser.add_argument("file", metavar="FILE", type=Path, help="a PEM or DER file")
    parser.set_defaults(handler=run_show)


def _add_directory_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "directory", metavar="DIR", type=Path, help="a PKI directory made by 'netrpc certs init'"
    )


def _add_server_name_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server-name",
        dest="server_names",
        action="append",
        required=True,
        metavar="NAME",
        help="a DNS name or IP address that clients use to reach the server; "
        "repeat it for every name (the first one also becomes the subject CN)",
    )


def _add_key_type_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key-type",
        choices=KEY_TYPE_CHOICES,
        default=KeyType.EC_P256.value,
        help="type of the new private keys (default: %(default)s, whose handshakes "
        "cost a fraction of RSA's)",
    )


def _add_days_option(parser: argparse.ArgumentParser, target: str) -> None:
    parser.add_argument(
        "--days",
        type=int,
        default=DEFAULT_LEAF_DAYS,
        metavar="N",
        help=f"validity of {target} in days, starting now (default: %(default)s)",
    )


def _add_crl_days_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--crl-days",
        type=int,
        default=DEFAULT_CRL_DAYS,
        metavar="N",
        help="days from now until the revocation list's next update date, after which "
        "servers that check it reject every client (default: %(default)s)",
    )


def _add_ca_passphrase_option(parser: argparse.ArgumentParser, role: str) -> None:
    parser.add_argument(
        "--passphrase-file",
        type=Path,
        metavar="FILE",
        help=f"read the {role} CA key's passphrase from the first line of FILE; "
        "without it, the passphrase is asked for if the key is encrypted",
    )


def _add_encrypt_key_options(parser: argparse.ArgumentParser, target: str) -> None:
    parser.add_argument(
        "--encrypt-key",
        action="store_true",
        help=f"encrypt {target} with a passphrase (default: unencrypted, so that "
        "programs using it start without a prompt)",
    )
    parser.add_argument(
        "--key-passphrase-file",
        type=Path,
        metavar="FILE",
        help=f"with --encrypt-key, read the passphrase for {target} from the first "
        "line of FILE instead of asking for it",
    )


# Handlers


def run_init(arguments: argparse.Namespace) -> int:
    """Create a new PKI directory."""
    PKI(arguments.directory).check_can_create(arguments.server_names, force=arguments.force)
    ca_passphrase = None
    if not arguments.no_passphrase:
        ca_passphrase = _new_passphrase(arguments.passphrase_file, "the CA keys")
    key_passphrase = _leaf_passphrase(arguments, "the server key")

    pki = PKI.create(
        arguments.directory,
        arguments.server_names,
        key_type=KeyType.parse(arguments.key_type),
        ca_passphrase=ca_passphrase,
        server_key_passphrase=key_passphrase,
        force=arguments.force,
        ca_days=arguments.ca_days,
        server_days=arguments.days,
        crl_days=arguments.crl_days,
    )
    written = ", ".join(path.name for path in (*pki.ca_files(), pki.server_cert, pki.server_key))
    print(f"created {written} in {pki.directory}")
    print(
        "servers need server.crt, server.key, client-ca.crt and client-ca.crl; "
        "keep both CA keys on this machine"
    )
    return 0


def run_issue(arguments: argparse.Namespace) -> int:
    """Issue one client certificate."""
    pki = PKI(arguments.directory)
    pki.check_client_available(arguments.name)
    ca_passphrase = _ca_passphrase(pki, Usage.CLIENT, arguments.passphrase_file)
    key_passphrase = _leaf_passphrase(arguments, "the client key")

    cert_path, key_path = pki.issue_client(
        arguments.name,
        days=arguments.days,
        key_type=KeyType.parse(arguments.key_type),
        ca_passphrase=ca_passphrase,
        key_passphrase=key_passphrase,
    )
    certificate = pki.load_client_certificate(arguments.name)
    print(
        f"issued client {arguments.name!r}, serial {format_serial(certificate.serial_number)}, "
        f"expires {_date(certificate.not_valid_after_utc)}: {cert_path}, {key_path}"
    )
    print(f"the client needs both files and {pki.server_ca_cert.name}")
    return 0


def run_revoke(arguments: argparse.Namespace) -> int:
    """Revoke one client certificate."""
    pki = PKI(arguments.directory)
    if pki.is_revoked(arguments.name):
        print(f"client {arguments.name!r} is already revoked; {pki.crl} is unchanged")
        return 0

    ca_passphrase = _ca_passphrase(pki, Usage.CLIENT, arguments.passphrase_file)
    pki.revoke_client(arguments.name, ca_passphrase=ca_passphrase, crl_days=arguments.crl_days)
    serial = pki.load_client_certificate(arguments.name).serial_number
    print(f"revoked client {arguments.name!r}, serial {format_serial(serial)}")
    print(f"copy {pki.crl} to every server and reload them")
    return 0


def run_server(arguments: argparse.Namespace) -> int:
    """Renew the server certificate."""
    pki = PKI(arguments.directory)
    check_server_names(arguments.server_names)
    ca_passphrase = _ca_passphrase(pki, Usage.SERVER, arguments.passphrase_file)
    key_passphrase = _leaf_passphrase(arguments, "the server key")

    cert_path, key_path = pki.renew_server(
        arguments.server_names,
        days=arguments.days,
        key_type=KeyType.parse(arguments.key_type),
        ca_passphrase=ca_passphrase,
        key_passphrase=key_passphrase,
    )
    expiry = load_certificate(cert_path).not_valid_after_utc
    print(
        f"renewed the server certificate for {', '.join(arguments.server_names)}, "
        f"expires {_date(expiry)}: {cert_path}, {key_path}"
    )
    return 0


def run_crl(arguments: argparse.Namespace) -> int:
    """Re-sign the revocation list with a new next update date."""
    pki = PKI(arguments.directory)
    pki.load_crl()
    ca_passphrase = _ca_passphrase(pki, Usage.CLIENT, arguments.passphrase_file)
    crl = pki.renew_crl(ca_passphrase=ca_passphrase, days=arguments.crl_days)
    # sign_crl always sets nextUpdate, so it is never None here.
    next_update = crl.next_update_utc
    assert next_update is not None
    revoked = plural(len(crl), "revoked serial")
    print(f"re-signed {pki.crl} with {revoked}, next update {_date(next_update)}")
    print(f"copy {pki.crl} to every server and reload them")
    return 0


def run_list(arguments: argparse.Namespace) -> int:
    """Print a table of every certificate in the PKI directory."""
    pki = PKI(arguments.directory)
    records = pki.certificates()
    rows = [("NAME", "ROLE", "SERIAL", "EXPIRES", "STATUS")]
    rows += [
        (
            record.name,
            record.role,
            "-" if record.serial is None else format_serial(record.serial),
            "-" if record.not_after is None else _date(record.not_after),
            record.status(),
        )
        for record in records
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        print("  ".join([*cells, row[4]]))

    next_update = pki.load_crl().next_update_utc
    if next_update is not None:
        print(f"\n{pki.crl.name}: next update {_date(next_update)} ({_crl_status(next_update)})")
    return 0


def run_show(arguments: argparse.Namespace) -> int:
    """Describe a certificate, a CRL or a private key file."""
    path: Path = arguments.file
    data = read_file(path, "file")
    for line in describe_file(path, data):
        print(line)
    return 0


# Passphrases


def _new_passphrase(passphrase_file: Path | None, target: str) -> bytes:
    # A new passphrase is asked twice, so a typo cannot lock the key away.
    if passphrase_file is not None:
        return read_passphrase_file(passphrase_file)
    first = _prompt(f"New passphrase for {target}: ")
    second = _prompt(f"Repeat the passphrase for {target}: ")
    if first != second:
        raise ConfigurationError("the two passphrases differ; run the command again")
    check_passphrase(first)
    return first


def _ca_passphrase(pki: PKI, usage: Usage, passphrase_file: Path | None) -> bytes | None:
    if not pki.is_ca_key_encrypted(usage):
        return None
    if passphrase_file is not None:
        return read_passphrase_file(passphrase_file)
    return _prompt(f"Passphrase for {usage.value} CA key {pki.directory / (usage.value + '-ca.key')}: ")


def _leaf_passphrase(arguments: argparse.Namespace, target: str) -> bytes | None:
    if not arguments.encrypt_key:
        if arguments.key_passphrase_file is not None:
            raise ConfigurationError(
                "--key-passphrase-file was given without --encrypt-key; add --encrypt-key "
                "to encrypt the key, or drop --key-passphrase-file"
            )
        return None
    return _new_passphrase(arguments.key_passphrase_file, target)


def read_passphrase_file(path: Path) -> bytes:
    """Return the first line of ``path`` without its line ending."""
    lines = read_file(path, "passphrase file").splitlines()
    passphrase = lines[0] if lines else b""
    if not passphrase:
        raise ConfigurationError(
            f"passphrase file {str(path)!r} is empty; write the passphrase on its first line"
        )
    check_passphrase(passphrase)
    return passphrase


def _prompt(prompt: str) -> bytes:
    # Without a terminal, getpass only warns and then reads stdin with echo.
    # That would show the passphrase, so the warning becomes an error here.
    with warnings.catch_warnings():
        warnings.simplefilter("error", getpass.GetPassWarning)
        try:
            return getpass.getpass(prompt).encode()
        except getpass.GetPassWarning:
            raise ConfigurationError(
                "cannot ask for a passphrase without a terminal; "
                "use --passphrase-file (or --no-passphrase with 'init')"
            ) from None


# Descriptions for ``show`` and ``list``


def describe_file(path: Path, data: bytes) -> list[str]:
    """Describe the certificates, CRL or private key in ``data``."""
    if b"PRIVATE KEY-----" in data:
        return describe_private_key(path, data)
    if b"-----BEGIN X509 CRL-----" in data:
        return describe_crl(_parse(path, x509.load_pem_x509_crl, data))
    if b"-----BEGIN CERTIFICATE-----" in data:
        certificates = _parse(path, x509.load_pem_x509_certificates, data)
        lines: list[str] = []
        for certificate in certificates:
            lines += ([""] if lines else []) + describe_certificate(certificate)
        return lines
    return _describe_der(path, data)


def _describe_der(path: Path, data: bytes) -> list[str]:
    try:
        return describe_certificate(x509.load_der_x509_certificate(data))
    except ValueError:
        pass
    try:
        return describe_crl(x509.load_der_x509_crl(data))
    except ValueError:
        pass
    raise ConfigurationError(
        f"{str(path)!r} is not a certificate, CRL or private key in PEM or DER; "
        "check the path"
    )


def _parse(path: Path, loader: Any, data: bytes) -> Any:
    try:
        return loader(data)
    except ValueError as error:
        raise ConfigurationError(f"cannot parse {str(path)!r}: {error}; check the file") from error


def describe_certificate(certificate: x509.Certificate) -> list[str]:
    """Return the lines ``show`` prints for one certificate."""
    fingerprint = certificate.fingerprint(hashes.SHA256())
    return [
        f"subject:             {certificate.subject.rfc4514_string()}",
        f"issuer:              {certificate.issuer.rfc4514_string()}",
        f"serial:              {format_serial(certificate.serial_number)}",
        f"subjectAltName:      {_alt_names(certificate)}",
        f"valid from:          {_timestamp(certificate.not_valid_before_utc)}",
        f"valid until:         {_timestamp(certificate.not_valid_after_utc)}",
        f"key:                 {describe_public_key(certificate.public_key())}",
        f"CA:                  {_ca_flag(certificate)}",
        f"extendedKeyUsage:    {_extended_key_usage(certificate)}",
        f"signature:           {_oid_name(certificate.signature_algorithm_oid)}",
        f"SHA-256 fingerprint: {_colon_hex(fingerprint)}",
    ]


def describe_crl(crl: x509.CertificateRevocationList) -> list[str]:
    """Return the lines ``show`` prints for a CRL, one per revoked serial at the end."""
    next_update = crl.next_update_utc
    lines = [
        f"CRL issuer:   {crl.issuer.rfc4514_string()}",
        f"last update:  {_timestamp(crl.last_update_utc)}",
        f"next update:  {_timestamp(next_update) if next_update else 'none'}",
        f"revoked:      {plural(len(crl), 'certificate')}",
    ]
    for entry in crl:
        lines.append(f"  serial {format_serial(entry.serial_number)} revoked {_timestamp(entry.revocation_date_utc)}")
    return lines


def describe_private_key(path: Path, data: bytes) -> list[str]:
    """Return the lines ``show`` prints for a private key: never the key itself."""
    lines = [f"file mode:   {_file_mode(path)}"]
    if is_encrypted_pem(data):
        return [
            "private key: encrypted with a passphrase (type shown only after decryption)",
            *lines,
        ]

    key = _parse(path, lambda pem: serialization.load_pem_private_key(pem, None), data)
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return [
        "private key: UNENCRYPTED (anyone who can read the file can use it)",
        f"key:         {describe_public_key(key.public_key())}",
        f"public key SHA-256: {_colon_hex(digest.finalize())}",
        *lines,
    ]


def describe_public_key(key: Any) -> str:
    """Name the key type and size, such as "EC secp256r1, 256 bits"."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}, {key.curve.key_size} bits"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA, {key.key_size} bits"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519, 256 bits"
    return type(key).__name__


def _alt_names(certificate: x509.Certificate) -> str:
    try:
        alt_names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "none"
    dns = [f"DNS:{name}" for name in alt_names.get_values_for_type(x509.DNSName)]
    ips = [f"IP:{address}" for address in alt_names.get_values_for_type(x509.IPAddress)]
    return ", ".join(dns + ips) or "none"


def _ca_flag(certificate: x509.Certificate) -> str:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return "no basicConstraints"
    if not constraints.ca:
        return "no"
    return f"yes, pathlen {constraints.path_length}"


def _extended_key_usage(certificate: x509.Certificate) -> str:
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "none"
    return ", ".join(_oid_name(oid) for oid in usages)


def _oid_name(oid: x509.ObjectIdentifier) -> str:
    return _OID_NAMES.get(oid, oid.dotted_string)


def _file_mode(path: Path) -> str:
    mode = stat.S_IMODE(os.stat(path).st_mode)
    warning = " (readable by group or others: run chmod 400)" if mode & 0o077 else ""
    return f"{mode:04o}{warning}"


def _crl_status(next_update: datetime.datetime) -> str:
    remaining = next_update - datetime.datetime.now(datetime.timezone.utc)
    if remaining <= datetime.timedelta(0):
        return "EXPIRED: servers that check it reject every client; run 'netrpc certs crl' to re-sign it"
    return f"in {plural(remaining.days, 'day')}"


def _colon_hex(data: bytes) -> str:
    return ":".join(f"{byte:02X}" for byte in data)


def _date(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d")


def _timestamp(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
