"""
Mutual TLS as plain Twisted sets it up, for the bound and the raw clients.

These contexts do what any correct mutual-TLS service must do and nothing
more: present a certificate, require and verify the peer's against one CA,
and (client side) check the server's name. Twisted's defaults choose the
protocol versions and ciphers (TLS 1.3 here).
"""

from __future__ import annotations

from twisted.internet import ssl

from bench.pki import BenchPKI


def _private_certificate(cert: object, key: object) -> ssl.PrivateCertificate:
    with open(cert, "rb") as cert_file, open(key, "rb") as key_file:
        return ssl.PrivateCertificate.loadPEM(cert_file.read() + key_file.read())


def _authority(path: object) -> ssl.Certificate:
    with open(path, "rb") as stream:
        return ssl.Certificate.loadPEM(stream.read())


def server_options(pki: BenchPKI) -> ssl.CertificateOptions:
    """Server side: require a client certificate signed by the client CA."""
    own = _private_certificate(pki.server_cert, pki.server_key)
    return ssl.CertificateOptions(
        privateKey=own.privateKey.original,
        certificate=own.original,
        trustRoot=ssl.trustRootFromCertificates([_authority(pki.client_ca)]),
    )


def client_options(pki: BenchPKI) -> object:
    """Client side: present the client certificate, verify the server as ``localhost``."""
    return ssl.optionsForClientTLS(
        "localhost",
        trustRoot=ssl.trustRootFromCertificates([_authority(pki.server_ca)]),
        clientCertificate=_private_certificate(pki.client_cert, pki.client_key),
    )
