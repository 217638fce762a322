"""
Assembly of the daemon's service from validated ``Settings``: the method
registry, the protocol factory, one ``mtls:`` endpoint per ``listen`` value,
and the start, reload and stop steps that twistd drives.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from netrpc import systemd
from netrpc.config import Settings
from netrpc.endpoints import (
    PREFIX,
    MutualTLSServerEndpoint,
    server_endpoint_from_options,
    split_description,
)
from netrpc.exceptions import ConfigurationError
from netrpc.methods import MethodRegistry, build_registry
from netrpc.passphrase import unlock_key
from netrpc.privileges import TargetUser, check_not_root, check_start_privileges, resolve_target_user
from netrpc.protocol import RPCServerFactory
from netrpc.system import SystemHandler
from netrpc.verify import describe_name

log = Logger(namespace="netrpc.daemon")

# Credentials that systemd's LoadCredential= hands to the service; they take
# the place of the key file and passphrase file named in the settings.
KEY_CREDENTIAL = "server.key"
PASSPHRASE_CREDENTIAL = "server.key.passphrase"

TLS_FLOOR = "TLS 1.2 minimum, TLS 1.3 preferred"


@dataclass
class Listener:
    """One ``listen`` value, its endpoint, and its port once listening."""

    description: str
    endpoint: MutualTLSServerEndpoint
    port: IListeningPort | None = None


def endpoint_options(description: str, settings: Settings) -> dict[str, str]:
    """
    Return the options of an ``mtls:`` description, completed from the PKI
    folder, systemd credentials and the limits in ``settings``.

    Options written in the description always win.
    """
    if description.partition(":")[0] != PREFIX:
        raise ConfigurationError(
            f"listen value {description!r} is not an {PREFIX}: endpoint; netrpc serves "
            f"mutual TLS only, so write it as {PREFIX}:port=PORT:interface=ADDRESS"
        )
    options = split_description(description)[1]

    key_credential = systemd.credential_path(KEY_CREDENTIAL)
    if key_credential is not None:
        options.setdefault("privateKey", str(key_credential))
    if settings.pki is not None:
        _fill_from_pki(options, settings.pki)

    limits = settings.limits
    options.setdefault("handshakeTimeout", str(limits.handshake_timeout))
    options.setdefault("maxConnections", str(limits.max_connections))
    return options


def _fill_from_pki(options: dict[str, str], pki: Path) -> None:
    if not pki.is_dir():
        raise ConfigurationError(
            f"PKI folder {str(pki)!r} not found; create it with 'netrpc certs init {pki} "
            "--server-name NAME' or pass the folder that holds server.crt"
        )
    options.setdefault("privateKey", str(pki / "server.key"))
    options.setdefault("certKey", str(pki / "server.crt"))
    options.setdefault("caCerts", str(pki / "client-ca.crt"))
    if (pki / "client-ca.crl").exists():
        options.setdefault("crl", str(pki / "client-ca.crl"))


def server_passphrase(options: dict[str, str], settings: Settings) -> bytes | None:
    """
    Unlock the server key named in ``options`` once, before any port opens.

    The sources, in order: ``passphraseFile`` in the endpoint, the
    ``passphrase_file`` setting, the systemd credential, and a prompt when
    standard input is a terminal. Returns None for an unencrypted key.
    """
    if "privateKey" not in options or "passphraseFile" in options:
        return None
    passphrase_file = settings.passphrase_file or systemd.credential_path(PASSPHRASE_CREDENTIAL)
    return unlock_key(options["privateKey"], passphrase_file=passphrase_file, environ={})


def build_listeners(reactor: Any, settings: Settings) -> list[Listener]:
    """Read and check the TLS files of every ``listen`` value; nothing listens yet."""
    listeners = []
    for description in settings.listen:
        options = endpoint_options(description, settings)
        passphrase = server_passphrase(options, settings)
        endpoint = server_endpoint_from_options(reactor, options, passphrase=passphrase)
        listeners.append(Listener(description, endpoint))
    return listeners


def build_registry_for(reactor: Any, settings: Settings, started: float) -> MethodRegistry:
    """Load the ``methods`` services and the ``system.`` methods."""
    registry = build_registry(settings.methods, reactor=reactor)
    system = SystemHandler(registry, instance=settings.instance, started=started, clock=reactor)
    registry.putSubHandler("system", system)
    return registry


def build_factory(reactor: Any, settings: Settings, registry: MethodRegistry) -> RPCServerFactory:
    """Build the protocol factory with the limits of ``settings``."""
    limits = settings.limits
    return RPCServerFactory(
        registry,
        max_message_size=limits.max_message_size,
        max_batch_length=limits.max_batch_length,
        max_in_flight=limits.max_in_flight,
        max_connections=limits.max_connections,
        call_timeout=limits.call_timeout,
        idle_timeout=limits.idle_timeout,
        max_unsent_bytes=limits.max_unsent_bytes,
        reactor=reactor,
    )


def build_service(settings: Settings, twistd_options: Any = None, reactor: Any = None) -> RPCService:
    """
    Build the daemon's service. Every file is read and checked here, while
    the process may still be root, so that later steps need no privileges.
    """
    if reactor is None:
        from twisted.internet import reactor

    target = resolve_target_user(settings.user, settings.group)
    twistd_uid = twistd_options.get("uid") if twistd_options is not None else None
    check_start_privileges(target, twistd_uid)
    if target is not None and twistd_options is not None and twistd_uid is None:
        # twistd switches to this user right after binding the ports.
        twistd_options["uid"], twistd_options["gid"] = target.uid, target.gid

    registry = build_registry_for(reactor, settings, started=reactor.seconds())
    factory = build_factory(reactor, settings, registry)
    listeners = build_listeners(reactor, settings)
    return RPCService(reactor, settings, listeners, factory, target)


def _listen_error(failure: Failure) -> str:
    socket_error = getattr(failure.value, "socketError", None)
    if isinstance(socket_error, OSError) and socket_error.strerror:
        return socket_error.strerror.lower()
    return failure.getErrorMessage()


class RPCService(MultiService):
    """
    The running daemon: it listens in ``privilegedStartService`` (as root if
    started so), checks that it no longer runs as root in ``startService``,
    reloads on SIGHUP and drains its connections in ``stopService``.
    """

    def __init__(
        self,
        reactor: Any,
        settings: Settings,
        listeners: list[Listener],
        factory: RPCServerFactory,
        target: TargetUser | None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.settings = settings
        self.listeners = listeners
        self.factory = factory
        self.target = target
        self.reloads = 0
        watchdog = systemd.watchdog_service()
        if watchdog is not None:
            watchdog.setServiceParent(self)

    def privilegedStartService(self) -> None:
        """Listen on every endpoint, or exit with one line naming the one that failed."""
        from netrpc.daemon import exit_with_error

        for listener in self.listeners:
            outcome: list[Any] = []
            listener.endpoint.listen(self.factory).addBoth(outcome.append)
            result = outcome[0] if outcome else None
            if isinstance(result, Failure):
                exit_with_error(
                    ConfigurationError(
                        f"cannot listen on {listener.description!r}: {_listen_error(result)}; "
                        "stop what uses the port or choose another one"
                    )
                )
            listener.port = result
        super().privilegedStartService()

    def startService(self) -> None:
        """Refuse to serve as root, then log the start and tell systemd."""
        from netrpc.daemon import exit_with_error

        try:
            check_not_root()
        except ConfigurationError as error:
            exit_with_error(error)

        super().startService()
        for listener in self.listeners:
            assert listener.port is not None
            address = listener.port.getHost()
            log.info(
                "Listening on {host} port {port} ({floor})",
                host=address.host,
                port=address.port,
                floor=TLS_FLOOR,
            )
        # SIGHUP's default action ends the process, so its handler goes in
        # before the start is announced; SIGTERM's must replace Twisted's,
        # which the reactor installs once it runs.
        signal.signal(signal.SIGHUP, self._sighup)
        self.reactor.callWhenRunning(signal.signal, signal.SIGTERM, self._sigterm)
        self._log_start()
        systemd.notify_ready(self._status())

    def _log_start(self) -> None:
        material = self.listeners[0].endpoint.server_tls.material
        crl = material.crl
        log.info(
            "securerpc{instance} started: client CA {ca}; CRL {crl}; {count} methods exposed",
            instance=f" {self.settings.instance}" if self.settings.instance else "",
            ca=", ".join(describe_name(ca.subject) for ca in material.ca_certificates),
            crl=f"{material.files.crl} ({len(list(crl))} revoked)" if crl is not None else "none",
            count=len(self.factory.registry),
        )

    def _status(self) -> str:
        ports = ", ".join(
            f"{listener.port.getHost().host}:{listener.port.getHost().port}"
            for listener in self.listeners
            if listener.port is not None
        )
        return f"Serving on {ports}"

    def _sigterm(self, signum: int, frame: Any) -> None:
        # Twisted's own SIGTERM handler makes twistd raise the signal again
        # once the reactor stops, so the process would end "killed by
        # SIGTERM". A drained, orderly stop is a success: exit status 0.
        log.info("Received SIGTERM")
        self.reactor.callFromThread(self.reactor.stop)

    def _sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """
        Re-read the TLS files of every endpoint. A file that fails its checks
        leaves every endpoint on its old material, and the error is logged.
        """
        systemd.notify_reloading()
        try:
            self._replace_material()
        except ConfigurationError as error:
            log.error("Reload failed, still serving on the old material: {error}", error=error)
        else:
            self.reloads += 1
            log.info("Reloaded TLS material (reload {count})", count=self.reloads)
        systemd.notify_ready(self._status())

    def _replace_material(self) -> None:
        for listener in self.listeners:
            server_tls = listener.endpoint.server_tls
            server_tls.replace(server_tls.material.files)

    @inlineCallbacks
    def stopService(self) -> Any:
        """Stop listening, let calls in flight finish, then close every connection."""
        systemd.notify_stopping()
        log.info("Stopping: draining calls for up to {grace} s", grace=self.settings.limits.shutdown_grace)
        for listener in self.listeners:
            if listener.port is not None:
                yield listener.port.stopListening()
        yield self.factory.drain(self.settings.limits.shutdown_grace)
        yield super().stopService()
        log.info("Stopped")
