"""
The servers a client connects to: endpoints built from ``mtls:`` strings,
endpoint objects or the three PEM files, each with the name that messages
use for it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

from netrpc.endpoints import (
    DEFAULT_CONNECT_TIMEOUT,
    PREFIX,
    MutualTLSClientEndpoint,
    client_endpoint_from_options,
    split_description,
)
from netrpc.passphrase import unlock_key
from netrpc.tls import ClientTLS
from netrpc.tlsfiles import TLSFiles


@dataclass(frozen=True)
class Server:
    """A server to connect to: its endpoint and the name used for it in messages."""

    endpoint: IStreamClientEndpoint
    name: str


# One server as connect() accepts it: an endpoint string, an endpoint object
# or a Server.
ServerSpec = str | IStreamClientEndpoint | Server


def mtls_servers(
    reactor: IReactorTime,
    addresses: Iterable[tuple[str, int]],
    *,
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str],
    ca: str | os.PathLike[str],
    server_name: str | None = None,
    passphrase: bytes | str | None = None,
    passphrase_file: str | os.PathLike[str] | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> list[Server]:
    """
    Build a ``Server`` for each ``(host, port)`` with the same client files,
    for ``connect()`` with failover.

    Each server's certificate must carry ``server_name``, or its own host
    name when ``server_name`` is None.
    """
    unlocked = unlock_key(key, passphrase=passphrase, passphrase_file=passphrase_file)
    files = TLSFiles(Path(key), Path(cert), Path(ca), passphrase=unlocked)
    creators: dict[str, ClientTLS] = {}
    servers = []
    for host, port in addresses:
        name = server_name or host
        if name not in creators:
            creators[name] = ClientTLS(files, name)
        endpoint = MutualTLSClientEndpoint(
            reactor, host, port, creators[name], timeout=connect_timeout
        )
        servers.append(Server(endpoint, endpoint.server))
    return servers


def servers_from(
    reactor: IReactorTime,
    endpoint: ServerSpec | Sequence[ServerSpec],
) -> list[Server]:
    """Turn the ``endpoint`` argument of ``connect()`` into a list of servers."""
    if isinstance(endpoint, (str, Server)) or IStreamClientEndpoint.providedBy(endpoint):
        items: Sequence[Any] = [endpoint]
    else:
        items = list(endpoint)
    if not items:
        raise ValueError("no server given; pass at least one endpoint")
    return [_server_from(reactor, item) for item in items]


def _server_from(reactor: IReactorTime, item: ServerSpec) -> Server:
    if isinstance(item, Server):
        return item
    if isinstance(item, str):
        endpoint = _endpoint_from_string(reactor, item)
    elif IStreamClientEndpoint.providedBy(item):
        endpoint = item
    else:
        raise TypeError(
            f"server {item!r} is neither an endpoint string, an endpoint object nor a Server"
        )
    name = getattr(endpoint, "server", None)
    return Server(endpoint, name if isinstance(name, str) else repr(endpoint))


def _endpoint_from_string(reactor: IReactorTime, description: str) -> IStreamClientEndpoint:
    prefix, options = split_description(description)
    if prefix != PREFIX:
        return cast(IStreamClientEndpoint, clientFromString(reactor, description))

    # Unlock the key here rather than in the endpoint parser, so that an
    # encrypted key may also be unlocked from the environment or a prompt,
    # and only once per process.
    passphrase = None
    key = options.get("privateKey")
    if key:
        passphrase = unlock_key(
            key,
            passphrase_file=options.pop("passphraseFile", None),
            hint="add passphraseFile=PATH to the endpoint string",
        )
    return client_endpoint_from_options(reactor, options, passphrase=passphrase)
