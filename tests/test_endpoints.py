"""The mtls: endpoint parsers, tested through Twisted's serverFromString and clientFromString."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    clientFromString,
    serverFromString,
)
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory

from netrpc.certs import PKI
from netrpc.endpoints import (
    EndpointDescriptionError,
    MutualTLSClientEndpoint,
    MutualTLSServerEndpoint,
    ReusePortServerEndpoint,
    client_endpoint,
    listening_socket_for,
    server_endpoint,
    split_description,
)
from netrpc.exceptions import ConfigurationError, ConnectionFailed, PassphraseError

from tlstest import EchoClient, client_description, echo_factory, quote, server_description, with_timeout


def listen_and_echo(endpoint: Any, pki: PKI, host: str = "127.0.0.1", *extra: str) -> Any:
    """Listen on ``endpoint``, connect alice, check one echo and close everything."""

    @pytest_twisted.inlineCallbacks
    def run() -> Any:
        listening = yield endpoint.listen(echo_factory())
        port = listening.getHost().port
        client = yield with_timeout(
            clientFromString(
                reactor, client_description(pki, "alice", port, *extra, host=host)
            ).connect(Factory.forProtocol(EchoClient))
        )
        reply = yield client.echo(b"ping")
        client.transport.loseConnection()
        yield with_timeout(client.closed)
        yield listening.stopListening()
        return reply

    return run()


class TestServerParser:
    def test_builds_endpoint(self, pki: PKI) -> None:
        endpoint = serverFromString(reactor, server_description(pki, "backlog=7"))

        assert isinstance(endpoint, MutualTLSServerEndpoint)
        assert isinstance(endpoint.listen_endpoint, TCP4ServerEndpoint)
        assert endpoint.server_tls.material.crl is not None
        assert endpoint.handshake_timeout == 10.0

    def test_limits(self, pki: PKI) -> None:
        endpoint = serverFromString(
            reactor, server_description(pki, "handshakeTimeout=2.5", "maxConnections=3")
        )

        assert endpoint.handshake_timeout == 2.5
        assert endpoint.max_connections == 3

    @pytest.mark.parametrize(
        ("extra", "message"),
        [
            ("colour=blue", "unknown option 'colour' in the mtls: server endpoint"),
            ("port=70000", r"invalid port='70000': expected a whole number from 0 to 65535"),
            ("backlog=many", r"invalid backlog='many'"),
            ("handshakeTimeout=0", r"invalid handshakeTimeout='0': expected a number of seconds"),
            ("maxConnections=-1", r"invalid maxConnections='-1'"),
            ("reusePort=perhaps", r"invalid reusePort='perhaps': expected true or false"),
            ("fd=3", "exactly one of port, fd, systemdIndex, systemdName; it got port, fd"),
        ],
    )
    def test_bad_option(self, pki: PKI, extra: str, message: str) -> None:
        with pytest.raises(EndpointDescriptionError, match=message):
            serverFromString(reactor, server_description(pki, extra))

    def test_missing_option(self, pki: PKI) -> None:
        description = f"mtls:port=0:privateKey={quote(pki.server_key)}:certKey={quote(pki.server_cert)}"

        with pytest.raises(EndpointDescriptionError, match=r"needs caCerts=\.\.\."):
            serverFromString(reactor, description)

    def test_no_socket(self, pki: PKI) -> None:
        description = server_description(pki).replace("port=0:", "")

        with pytest.raises(EndpointDescriptionError, match="it got none"):
            serverFromString(reactor, description)

    def test_positional_argument(self, pki: PKI) -> None:
        description = server_description(pki).replace("mtls:port=0", "mtls:8700")

        with pytest.raises(EndpointDescriptionError, match="'8700': write each option as name=value"):
            serverFromString(reactor, description)

    def test_interface_not_an_address(self, pki: PKI) -> None:
        description = server_description(pki).replace("interface=127.0.0.1", "interface=localhost")

        with pytest.raises(EndpointDescriptionError, match="invalid interface='localhost'"):
            serverFromString(reactor, description)

    def test_error_is_value_error(self, pki: PKI) -> None:
        """Callers of serverFromString catch ValueError; the daemon catches ConfigurationError."""
        with pytest.raises(ValueError) as caught:
            serverFromString(reactor, server_description(pki, "colour=blue"))

        assert isinstance(caught.value, ConfigurationError)

    def test_file_error_at_parse(self, pki: PKI, tmp_path: Path) -> None:
        description = server_description(pki).replace(
            quote(pki.client_ca_cert), quote(tmp_path / "missing.crt")
        )

        with pytest.raises(ConfigurationError, match="missing.crt' is missing"):
            serverFromString(reactor, description)

    @pytest_twisted.inlineCallbacks
    def test_ipv6_interface(self, pki: PKI) -> Any:
        if not _ipv6_loopback():
            pytest.skip("no IPv6 loopback on this machine")
        description = server_description(pki).replace("interface=127.0.0.1", r"interface=\:\:1")
        endpoint = serverFromString(reactor, description)

        reply = yield listen_and_echo(endpoint, pki, "::1", "serverName=localhost")

        assert isinstance(endpoint.listen_endpoint, TCP6ServerEndpoint)
        assert reply == b"ping"


class TestSockets:
    @pytest_twisted.inlineCallbacks
    def test_reuse_port(self, pki: PKI) -> Any:
        """Two reusePort endpoints listen on the same port at once."""
        first = serverFromString(reactor, server_description(pki, "reusePort=true"))
        listening = yield first.listen(echo_factory())
        port = listening.getHost().port
        description = server_description(pki, "reusePort=true").replace("port=0", f"port={port}")
        second = serverFromString(reactor, description)

        reply = yield listen_and_echo(second, pki)
        yield listening.stopListening()

        assert isinstance(second.listen_endpoint, ReusePortServerEndpoint)
        assert reply == b"ping"

    @pytest_twisted.inlineCallbacks
    def test_port_in_use(self, pki: PKI) -> Any:
        first = serverFromString(reactor, server_description(pki))
        listening = yield first.listen(echo_factory())
        port = listening.getHost().port
        second = serverFromString(
            reactor, server_description(pki, "reusePort=true").replace("port=0", f"port={port}")
        )

        with pytest.raises(CannotListenError):
            yield second.listen(echo_factory())
        yield listening.stopListening()

    @pytest_twisted.inlineCallbacks
    def test_adopt_fd(self, pki: PKI) -> Any:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        descriptor = listener.detach()
        description = server_description(pki).replace("port=0:interface=127.0.0.1", f"fd={descriptor}")
        endpoint = serverFromString(reactor, description)

        reply = yield listen_and_echo(endpoint, pki)

        assert isinstance(endpoint.listen_endpoint, AdoptedStreamServerEndpoint)
        assert reply == b"ping"

    def test_fd_not_listening(self, pki: PKI) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as unbound:
            description = server_description(pki).replace(
                "port=0:interface=127.0.0.1", f"fd={unbound.fileno()}"
            )

            with pytest.raises(EndpointDescriptionError, match="not a listening stream socket"):
                serverFromString(reactor, description)

    def test_fd_not_a_socket(self, pki: PKI, tmp_path: Path) -> None:
        with open(tmp_path / "plain", "wb") as plain:
            description = server_description(pki).replace(
                "port=0:interface=127.0.0.1", f"fd={plain.fileno()}"
            )

            with pytest.raises(EndpointDescriptionError, match="is not an open socket"):
                serverFromString(reactor, description)

    def test_fd_with_interface(self, pki: PKI) -> None:
        description = server_description(pki).replace("port=0", "fd=3")

        with pytest.raises(EndpointDescriptionError, match="interface= works only with port="):
            serverFromString(reactor, description)

    def test_systemd_socket_missing(self, pki: PKI) -> None:
        description = server_description(pki).replace(
            "port=0:interface=127.0.0.1", "systemdName=rpc"
        )

        with pytest.raises(EndpointDescriptionError, match="systemd passed no socket named 'rpc'"):
            serverFromString(reactor, description)

    @pytest.mark.parametrize("option", ["systemdName=rpc", "systemdIndex=0"])
    def test_systemd_socket(self, pki: PKI, option: str) -> None:
        """A process started with LISTEN_FDS adopts the socket at descriptor 3."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        expected = listener.getsockname()[1]
        description = server_description(pki).replace("port=0:interface=127.0.0.1", option)

        with listener:
            result = _run_socket_activated(listener, description)

        assert result == {"port": expected, "type": "AdoptedStreamServerEndpoint"}


def _run_socket_activated(listener: socket.socket, description: str) -> Any:
    # The child moves the socket to descriptor 3 and sets the variables of
    # systemd socket activation before it imports Twisted, as systemd would.
    script = textwrap.dedent(
        f"""
        import json, os
        os.dup2({listener.fileno()}, 3)
        os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="rpc")
        from twisted.internet import reactor
        from twisted.internet.endpoints import serverFromString
        from twisted.internet.protocol import Factory
        endpoint = serverFromString(reactor, {description!r})
        port = endpoint.listen(Factory()).result
        print(json.dumps({{"port": port.getHost().port,
                          "type": type(endpoint.listen_endpoint).__name__}}))
        """
    )
    completed = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        pass_fds=[listener.fileno()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


class TestListeningSocketFor:
    """The socket that a --workers parent binds or adopts for its workers."""

    def test_binds_port(self) -> None:
        listener = listening_socket_for(reactor, {"port": "0", "interface": "127.0.0.1", "backlog": "7"})
        with listener:
            assert listener.getsockname()[0] == "127.0.0.1"
            assert listener.getsockname()[1] > 0
            assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
            assert listener.getblocking() is False

    def test_reuse_port(self) -> None:
        options = {"port": "0", "interface": "127.0.0.1", "reusePort": "true"}
        with listening_socket_for(reactor, options) as listener:
            assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1

    def test_adopts_descriptor(self) -> None:
        with socket.socket() as inherited:
            inherited.bind(("127.0.0.1", 0))
            inherited.listen()
            adopted = listening_socket_for(reactor, {"fd": str(inherited.fileno())})
            try:
                assert adopted.fileno() == inherited.fileno()
                assert adopted.getsockname() == inherited.getsockname()
            finally:
                adopted.detach()

    def test_port_in_use(self) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            options = {"port": str(taken.getsockname()[1]), "interface": "127.0.0.1"}
            with pytest.raises(OSError):
                listening_socket_for(reactor, options)

    def test_invalid_options(self) -> None:
        with pytest.raises(EndpointDescriptionError, match="exactly one of"):
            listening_socket_for(reactor, {"port": "0", "fd": "3"})


class TestPassphrase:
    @pytest.fixture
    def encrypted(self, pki: PKI, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
        key = serialization.load_pem_private_key(pki.server_key.read_bytes(), None)
        key_path = tmp_path / "server.key"
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"open sesame"),
            )
        )
        key_path.chmod(0o600)
        passphrase_path = tmp_path / "passphrase"
        passphrase_path.write_bytes(b"open sesame\n")
        passphrase_path.chmod(0o600)
        yield key_path, passphrase_path

    def description(self, pki: PKI, key: Path, *extra: str) -> str:
        return server_description(pki, *extra).replace(quote(pki.server_key), quote(key))

    def test_passphrase_file(self, pki: PKI, encrypted: tuple[Path, Path]) -> None:
        key, passphrase = encrypted

        endpoint = serverFromString(
            reactor, self.description(pki, key, f"passphraseFile={quote(passphrase)}")
        )

        assert endpoint.server_tls.material.files.private_key == key

    def test_passphrase_argument(self, pki: PKI, encrypted: tuple[Path, Path]) -> None:
        key, _ = encrypted

        endpoint = server_endpoint(reactor, self.description(pki, key), passphrase=b"open sesame")

        assert endpoint.server_tls.material.files.private_key == key

    def test_no_passphrase(self, pki: PKI, encrypted: tuple[Path, Path]) -> None:
        key, _ = encrypted

        with pytest.raises(PassphraseError, match="is encrypted; add passphraseFile=PATH"):
            serverFromString(reactor, self.description(pki, key))

    def test_wrong_passphrase(self, pki: PKI, encrypted: tuple[Path, Path]) -> None:
        key, _ = encrypted

        with pytest.raises(PassphraseError, match="wrong passphrase"):
            server_endpoint(reactor, self.description(pki, key), passphrase=b"close sesame")


class TestClientParser:
    def test_builds_endpoint(self, pki: PKI) -> None:
        endpoint = clientFromString(reactor, client_description(pki, "alice", 8700, "timeout=3"))

        assert isinstance(endpoint, MutualTLSClientEndpoint)
        assert endpoint.client_tls.server_name == "127.0.0.1"
        assert endpoint.server == "127.0.0.1:8700"
        assert endpoint.timeout == 3.0

    def test_server_name(self, pki: PKI) -> None:
        endpoint = clientFromString(
            reactor, client_description(pki, "alice", 8700, "serverName=localhost")
        )

        assert endpoint.client_tls.server_name == "localhost"

    @pytest.mark.parametrize(
        ("description", "message"),
        [
            ("mtls:port=8700", r"needs host=\.\.\."),
            ("mtls:host=localhost", r"needs port=\.\.\."),
            ("mtls:host=localhost:port=0", r"invalid port='0': expected a whole number from 1"),
            ("mtls:host=localhost:port=1:timeout=soon", r"invalid timeout='soon'"),
            ("mtls:host=localhost:port=1:crl=x", "unknown option 'crl' in the mtls: client endpoint"),
        ],
    )
    def test_bad_option(self, description: str, message: str) -> None:
        with pytest.raises(EndpointDescriptionError, match=message):
            clientFromString(reactor, description)

    def test_own_certificate_checked(self, pki: PKI, bad_client_certs: Any) -> None:
        """A client refuses to start with its own expired certificate."""
        description = client_description(pki, "alice", 8700).replace(
            quote(pki.client_cert("alice")), quote(bad_client_certs.expired.cert)
        ).replace(quote(pki.client_key("alice")), quote(bad_client_certs.expired.key))

        with pytest.raises(ConfigurationError, match="expired on"):
            clientFromString(reactor, description)

    @pytest_twisted.inlineCallbacks
    def test_connection_refused(self, pki: PKI) -> Any:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free_port = probe.getsockname()[1]
        endpoint = client_endpoint(reactor, client_description(pki, "alice", free_port))

        with pytest.raises(ConnectionFailed, match=f"cannot connect to 127.0.0.1:{free_port}"):
            yield with_timeout(endpoint.connect(Factory.forProtocol(EchoClient)))


class TestSplitDescription:
    def test_escapes(self) -> None:
        prefix, options = split_description(r"mtls:interface=\:\:1:certKey=C\:\\dir\\a.crt")

        assert prefix == "mtls"
        assert options == {"interface": "::1", "certKey": "C:\\dir\\a.crt"}

    def test_same_as_twisted(self, pki: PKI, tmp_path: Path) -> None:
        """A path with a colon reaches the same file through both parsers."""
        odd = tmp_path / "odd:name"
        odd.mkdir()
        ca = odd / "client-ca.crt"
        shutil.copy(pki.client_ca_cert, ca)
        description = server_description(pki).replace(quote(pki.client_ca_cert), quote(ca))

        ours = server_endpoint(reactor, description)
        twisted = serverFromString(reactor, description)

        assert ours.server_tls.material.files == twisted.server_tls.material.files
        assert ours.server_tls.material.files.ca_certificates == ca

    def test_wrong_prefix(self) -> None:
        with pytest.raises(EndpointDescriptionError, match="start it with 'mtls:'"):
            server_endpoint(reactor, "tcp:port=0")


def test_plugin_has_no_package_file() -> None:
    """twisted/plugins must stay a namespace without __init__.py."""
    plugins = Path(__file__).resolve().parent.parent / "twisted" / "plugins"

    assert (plugins / "netrpc_endpoints.py").is_file()
    assert not (plugins / "__init__.py").exists()
