"""
OpenSSL contexts for mutual TLS, and the connection creators that Twisted's
TLS layer calls for each new connection.

Both sides share one policy. TLS 1.2 is the minimum and TLS 1.3 is
preferred. TLS 1.2 uses only ECDHE key exchange with AEAD ciphers (AES-GCM,
ChaCha20-Poly1305). There is no compression, no renegotiation and no session
resumption. The peer certificate is required and verified against the given
CA file only, never the system trust store.

- ``ServerTLS`` verifies client certificates (and the CRL, when given) and
  lets the daemon swap its material while listening: ``replace()`` builds a
  new context for new connections, and open connections keep theirs.
- ``ClientTLS`` verifies the server's chain, then its extendedKeyUsage, then
  its name.

A rejected handshake leaves its reason in the creator's recorder:
``rejection_for(connection)`` returns it once the handshake has failed.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from netrpc.exceptions import ConfigurationError
from netrpc.tlsfiles import TLSFiles, TLSMaterial, load_material
from netrpc.verify import (
    Rejection,
    RejectionRecorder,
    Role,
    is_ip_address,
    make_verify_callback,
    reject_certificate,
)

# The oldest protocol version either side accepts, as the start log names it.
TLS_FLOOR = "TLS 1.2"

# Only forward-secret AEAD suites on TLS 1.2; TLS 1.3 suites are all AEAD
# with ephemeral key exchange, and these are OpenSSL's three defaults.
TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"
TLS13_CIPHERSUITES = b"TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"

# A leaf, an optional intermediate and the root: netrpc's CAs sign leaves
# directly, so a longer chain is a sign of a certificate made for elsewhere.
MAX_CHAIN_DEPTH = 3

# Without resumption each connection runs a full handshake, so a revoked
# certificate or a replaced CA takes effect for every new connection.
# NOTE: OpenSSL still sends 2 unusable TLS 1.3 tickets; pyOpenSSL 26.4 lacks SSL_CTX_set_num_tickets.
_OPTIONS = (
    SSL.OP_NO_COMPRESSION
    | SSL.OP_NO_RENEGOTIATION
    | SSL.OP_NO_TICKET
    | SSL.OP_CIPHER_SERVER_PREFERENCE
)

_SESSION_ID_CONTEXT = b"netrpc"


def _base_context(material: TLSMaterial) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(_OPTIONS)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    # Idle connections give their read and write buffers back, as Twisted's
    # own contexts do: about 30 MiB less per 1,000 idle connections.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.set_cipher_list(TLS12_CIPHERS)
    context.set_tls13_ciphersuites(TLS13_CIPHERSUITES)

    context.use_certificate(material.certificate)
    for extra in material.chain[1:]:
        context.add_extra_chain_cert(extra)
    context.use_privatekey(material.private_key)
    context.check_privatekey()

    store = context.get_cert_store()
    if store is None:
        raise ConfigurationError("OpenSSL created a context without a certificate store")
    for ca in material.ca_certificates:
        store.add_cert(crypto.X509.from_cryptography(ca))
    context.set_verify_depth(MAX_CHAIN_DEPTH)
    return context


def build_server_context(material: TLSMaterial, recorder: RejectionRecorder) -> SSL.Context:
    """Build the context that requires and verifies a client certificate."""
    context = _base_context(material)
    store = context.get_cert_store()
    assert store is not None
    if material.crl is not None:
        store.add_crl(material.crl)
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)

    # The CA names go into the CertificateRequest so that a client with
    # several certificates picks one that this server trusts.
    for ca in material.ca_certificates:
        context.add_client_ca(ca)
    # The session id context is required by OpenSSL whenever a server requests
    # client certificates, even with session caching off.
    context.set_session_id(_SESSION_ID_CONTEXT)
    context.set_verify(
        SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
        make_verify_callback(recorder, Role.CLIENT),
    )
    return context


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    The server side of mutual TLS, with material that can be replaced
    while listening.

    Build it with ``ServerTLS(files)``: the files are read and checked at
    once, so a problem raises ``ConfigurationError`` before anything
    listens.
    """

    def __init__(self, files: TLSFiles, *, now: datetime.datetime | None = None) -> None:
        self._recorder = RejectionRecorder()
        self._material = load_material(files, Role.SERVER, now)
        self._context = build_server_context(self._material, self._recorder)

    @property
    def material(self) -> TLSMaterial:
        """The material new connections use: for start logs and expiry checks."""
        return self._material

    def replace(self, files: TLSFiles, *, now: datetime.datetime | None = None) -> None:
        """
        Use the material of ``files`` for every new connection.

        Open connections keep the context they started with. If a file is
        wrong this raises ``ConfigurationError`` and changes nothing.
        """
        self.install(load_material(files, Role.SERVER, now))

    def install(self, material: TLSMaterial) -> None:
        """
        Use ``material``, already loaded and checked by ``load_material``,
        for every new connection. A reload of several endpoints loads all
        their files first and installs only when every one is valid.
        """
        context = build_server_context(material, self._recorder)
        self._material, self._context = material, context

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """Create the OpenSSL connection for one accepted TCP connection."""
        return SSL.Connection(self._context, None)

    def rejection_for(self, connection: SSL.Connection) -> Rejection | None:
        """Return why the certificate check rejected ``connection``, if it did."""
        return self._recorder.rejection_for(connection)

    def check_peer(self, certificate: x509.Certificate) -> Rejection | None:
        """
        Verify an already connected peer's ``certificate`` against the
        current CAs and CRL, for closing connections after a reload.

        It checks the chain, validity and revocation only; it does not
        repeat the extendedKeyUsage check of the handshake.
        """
        return verify_with_store(certificate, self._material)


def verify_with_store(certificate: x509.Certificate, material: TLSMaterial) -> Rejection | None:
    """Verify ``certificate`` against the CAs and CRL of ``material``, outside a handshake."""
    store = crypto.X509Store()
    for ca in material.ca_certificates:
        store.add_cert(crypto.X509.from_cryptography(ca))
    if material.crl is not None:
        store.add_crl(material.crl)
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)

    leaf = crypto.X509.from_cryptography(certificate)
    try:
        crypto.X509StoreContext(store, leaf).verify_certificate()
    except crypto.X509StoreContextError as error:
        code, depth = int(error.errors[0]), int(error.errors[1])
        return reject_certificate(code, depth, error.certificate.to_cryptography())
    return None


def build_client_context(
    material: TLSMaterial, recorder: RejectionRecorder, server_name: str
) -> SSL.Context:
    """Build the context that verifies the server's chain, usage and ``server_name``."""
    context = _base_context(material)
    context.set_verify(
        SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
        make_verify_callback(recorder, Role.SERVER, server_name),
    )
    return context


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLS:
    """
    The client side of mutual TLS for one server name.

    ``server_name`` is the DNS name or IP address the server's certificate
    must be valid for; a DNS name is also sent as SNI.
    """

    def __init__(
        self, files: TLSFiles, server_name: str, *, now: datetime.datetime | None = None
    ) -> None:
        self.server_name = _check_server_name(server_name)
        self._recorder = RejectionRecorder()
        self._material = load_material(files, Role.CLIENT, now)
        self._context = build_client_context(self._material, self._recorder, self.server_name)

    @property
    def material(self) -> TLSMaterial:
        """The client's key, certificate and trusted server CAs."""
        return self._material

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """Create the OpenSSL connection for one outgoing TCP connection."""
        connection = SSL.Connection(self._context, None)
        if not is_ip_address(self.server_name):
            connection.set_tlsext_host_name(self.server_name.encode("ascii"))
        return connection

    def rejection_for(self, connection: SSL.Connection) -> Rejection | None:
        """Return why the server's certificate was rejected on ``connection``, if it was."""
        return self._recorder.rejection_for(connection)


def _check_server_name(name: str) -> str:
    if not name or not name.isascii():
        raise ConfigurationError(
            f"invalid server name {name!r}: give a DNS name or an IP address "
            "(write internationalized names in their xn-- form)"
        )
    return name

