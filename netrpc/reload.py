"""
The steps of a reload without downtime, for ``RPCService.reload()``.

A reload runs in two phases. ``prepare_reload`` reads everything (the
config file's policy, the TLS files of every endpoint) and raises
``ConfigurationError`` at the first problem, having changed nothing.
Only when every file is valid does the service install the new material
and policy. Then ``connections_to_close`` lists the open connections whose
certificate the new material rejects.

Files are read again as the user the daemon runs as, which after a start as
root is the unprivileged ``--user``. A key file that user cannot read is
replaced by the key loaded at start (so a new certificate must keep the same
key until a restart); the certificate, CA and CRL files must be readable by
that user for a reload to succeed, and the daemon warns at start when they
are not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from netrpc.config import Settings
from netrpc.tls import ServerTLS
from netrpc.tlsfiles import TLSMaterial, load_material
from netrpc.verify import Role

__all__ = ["ReloadPlan", "connections_to_close", "prepare_reload"]

# Settings a reload applies. Everything else (listen addresses, limits,
# services, the audit log) is fixed at start.
RELOADED_SETTINGS = frozenset({"policy"})


@dataclass(frozen=True)
class ReloadPlan:
    """The settings and TLS material a reload installs, after every file has been checked."""

    settings: Settings
    materials: tuple[TLSMaterial, ...]
    # Names of changed settings that only take effect at the next start.
    needs_restart: tuple[str, ...]


def prepare_reload(
    current: Settings,
    server_tls: Sequence[ServerTLS],
    reread_settings: Callable[[], Settings] | None,
) -> ReloadPlan:
    """
    Read the config file again (when ``reread_settings`` is given) and the
    TLS files of every endpoint. Raise ``ConfigurationError`` naming the
    first file or key that is wrong; nothing is changed either way.
    """
    settings = current
    needs_restart: tuple[str, ...] = ()
    if reread_settings is not None:
        fresh = reread_settings()
        needs_restart = tuple(
            item.name
            for item in fields(Settings)
            if item.name not in RELOADED_SETTINGS
            and getattr(fresh, item.name) != getattr(current, item.name)
        )
        settings = Settings(
            **{
                item.name: getattr(fresh if item.name in RELOADED_SETTINGS else current, item.name)
                for item in fields(Settings)
            }
        )

    materials = tuple(
        load_material(tls.material.files, Role.SERVER, loaded_key=tls.material.private_key)
        for tls in server_tls
    )
    return ReloadPlan(settings, materials, needs_restart)


def connections_to_close(
    connections: Sequence[Any], server_tls_for: Callable[[Any], ServerTLS]
) -> list[tuple[Any, str]]:
    """
    Check the client certificate of every open connection against the CAs
    and CRL now installed, and return those rejected, each with the reason.

    ``server_tls_for`` returns the ``ServerTLS`` of the endpoint that
    accepted a connection. A connection without a peer certificate (not a
    TLS connection) is left alone.
    """
    rejected = []
    for connection in connections:
        get_certificate = getattr(connection.transport, "getPeerCertificate", None)
        certificate = get_certificate() if get_certificate is not None else None
        if certificate is None:
            continue
        rejection = server_tls_for(connection).check_peer(certificate.to_cryptography())
        if rejection is not None:
            reason = f"its certificate is now rejected: {rejection.reason}: {rejection.detail}"
            rejected.append((connection, reason))
    return rejected

