"""
Assembly of the daemon's service from validated ``Settings``: the method
registry, the protocol factory with its access policy, audit log and
counters, one ``mtls:`` endpoint per ``listen`` value, and the start,
reload and stop steps that twistd drives.
"""

from __future__ import annotations

import importlib
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import partial
from pathlib import Path
from typing import Any, cast

from twisted.application.service import MultiService
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

import netrpc
from netrpc import systemd
from netrpc._plural import plural
from netrpc.audit import AuditLog
from netrpc.config import Settings
from netrpc.endpoints import (
    PREFIX,
    MutualTLSServerEndpoint,
    server_endpoint_from_options,
    split_description,
)
from netrpc.exceptions import ConfigurationError
from netrpc.expiry import ExpiryWatch
from netrpc.gate import CallGate, describe_identity
from netrpc.handshake import describe_address
from netrpc.methods import DEFAULT_SERVICE, MethodRegistry, detached_threadpool
from netrpc.passphrase import unlock_key
from netrpc.privileges import (
    TargetUser,
    check_not_root,
    check_start_privileges,
    resolve_target_user,
    switch_ids,
)
from netrpc.policy import Policy
from netrpc.protocol import RPCServerFactory, RPCServerProtocol
from netrpc.reload import connections_to_close, prepare_reload
from netrpc.stats import ServerStats, build_metrics_resource, snapshot
from netrpc.system import SystemHandler
from netrpc.tls import ServerTLS
from netrpc.tlsfiles import TLSFiles
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


def _tcp_address(port: IListeningPort) -> IPv4Address | IPv6Address:
    # Every mtls: listener is a TCP port, bound here or adopted from systemd.
    return cast(IPv4Address | IPv6Address, port.getHost())


def _describe_listening(address: IAddress) -> str:
    """Return ``host:port`` of a TCP address or the path of a UNIX socket."""
    if isinstance(address, UNIXAddress):
        name = address.name
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    return describe_address(address)


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
    crl = pki / "client-ca.crl"
    if "crl" not in options and not crl.exists():
        # Serving without the CRL would admit every revoked client: never
        # drop the revocation check silently.
        raise ConfigurationError(
            f"CRL {str(crl)!r} not found in the PKI folder; create it with "
            f"'netrpc certs crl {pki}', or name the files in the mtls: endpoint "
            "to serve without revocation checks"
        )
    options.setdefault("crl", str(crl))


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


def preload_own_services(specs: Sequence[str]) -> None:
    """
    Import the services that are part of netrpc itself, such as the demo,
    while the files may still be read with the start's rights.

    netrpc's own modules are the daemon's code, imported as root anyway, so
    the demo keeps working from a checkout that only root may enter. Any
    other service is imported after the switch to the service user.
    """
    for spec in specs:
        module_name = spec.partition(":")[0]
        if module_name.split(".")[0] != "netrpc":
            continue
        try:
            importlib.import_module(module_name)
        except ImportError:
            # load_service reports it later, with the name and the fix.
            continue


def build_registry_for(
    reactor: Any,
    settings: Settings,
    started: float,
    *,
    gate: CallGate,
    stats: Callable[[], dict[str, Any]],
) -> MethodRegistry:
    """
    Build the registry with the ``system.`` methods. The services named by
    ``methods`` are loaded later by ``RPCService.startService``.
    """
    registry = MethodRegistry(reactor=reactor, threadpool=detached_threadpool(reactor))
    system = SystemHandler(
        registry,
        instance=settings.instance,
        started=started,
        clock=reactor,
        stats=stats,
        access_of=gate.access_of,
    )
    registry.putSubHandler("system", system)
    return registry


def build_gate(
    reactor: Any, settings: Settings, audit_owner: tuple[int, int] | None = None
) -> CallGate:
    """
    Build the observer that enforces the policy, writes the audit log and counts.

    ``audit_owner`` is the ``(uid, gid)`` the daemon switches to after the
    start as root; the audit file goes to it, so that reloads can reopen it.
    """
    audit = None
    if settings.audit is not None:
        audit = AuditLog(settings.audit, owner=audit_owner)
    return CallGate(settings.policy, clock=reactor, stats=ServerStats(), audit=audit)


def read_counters(
    reactor: Any, started: float, gate: CallGate, listeners: list[Listener]
) -> dict[str, Any]:
    """Return the counters of the whole daemon, for ``system.stats`` and Prometheus."""
    return snapshot(
        gate.stats,
        uptime=reactor.seconds() - started,
        open_connections=gate.open_connections,
        calls_in_flight=gate.calls_in_flight,
        handshakes=[listener.endpoint.stats for listener in listeners],
    )


def build_factory(
    reactor: Any, settings: Settings, registry: MethodRegistry, gate: CallGate | None = None
) -> RPCServerFactory:
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
        observer=gate,
        reactor=reactor,
    )


def build_service(
    settings: Settings,
    twistd_options: Any = None,
    reactor: Any = None,
    reread_settings: Callable[[], Settings] | None = None,
) -> RPCService:
    """
    Build the daemon's service. Every file is read and checked here, while
    the process may still be root, so that later steps need no privileges.
    ``reread_settings`` reads the config file again for a reload.
    """
    if reactor is None:
        from twisted.internet import reactor

    target = resolve_target_user(settings.user, settings.group)
    twistd_uid = twistd_options.get("uid") if twistd_options is not None else None
    twistd_gid = twistd_options.get("gid") if twistd_options is not None else None
    check_start_privileges(target, twistd_uid, twistd_gid)
    owner = switch_ids(target, twistd_uid, twistd_gid)
    if target is not None and twistd_options is not None and twistd_uid is None:
        # twistd switches to this user right after binding the ports.
        twistd_options["uid"], twistd_options["gid"] = target.uid, target.gid

    started = reactor.seconds()
    gate = build_gate(reactor, settings, audit_owner=owner)
    listeners = build_listeners(reactor, settings)
    read_stats = partial(read_counters, reactor, started, gate, listeners)
    preload_own_services(settings.methods or (DEFAULT_SERVICE,))
    registry = build_registry_for(reactor, settings, started, gate=gate, stats=read_stats)
    factory = build_factory(reactor, settings, registry, gate)
    metrics = build_metrics_resource(read_stats) if settings.metrics_listen else None
    return RPCService(
        reactor,
        settings,
        listeners,
        factory,
        target,
        gate=gate,
        reread_settings=reread_settings,
        metrics=metrics,
    )


def _warn_unreadable_installation() -> None:
    # Runs after the switch to the service user. Python imports some modules
    # only when first needed, so an installation that user cannot read
    # fails later, on the first such import, far from its cause.
    import twisted

    folders = {Path(module.__file__).parent.parent for module in (netrpc, twisted) if module.__file__}
    unreadable = sorted(str(folder) for folder in folders if not os.access(folder, os.R_OK | os.X_OK))
    if unreadable:
        log.warn(
            "This process cannot read its own installation in {folders}; a module first "
            "imported later will fail. Install netrpc where the service user can read it",
            folders=", ".join(unreadable),
        )


def _reloaded_paths(files: TLSFiles) -> list[Path]:
    """Return the files a reload reads again; the key may stay unreadable."""
    paths = [files.certificate, files.ca_certificates]
    if files.crl is not None:
        paths.append(files.crl)
    return paths


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

    ``gate`` enforces the access policy and counts; ``metrics`` is the
    Prometheus resource served on ``metrics_listen``, if any.
    """

    def __init__(
        self,
        reactor: Any,
        settings: Settings,
        listeners: list[Listener],
        factory: RPCServerFactory,
        target: TargetUser | None,
        *,
        gate: CallGate,
        reread_settings: Callable[[], Settings] | None = None,
        metrics: Any = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.settings = settings
        self.listeners = listeners
        self.factory = factory
        self.target = target
        self.gate = gate
        self.reread_settings = reread_settings
        self.metrics = metrics
        self.metrics_port: IListeningPort | None = None
        self.expiry = ExpiryWatch(
            self._materials, clock=reactor, warning_days=settings.expiry_warning_days
        )
        self.expiry.setServiceParent(self)
        watchdog = systemd.watchdog_service()
        if watchdog is not None:
            watchdog.setServiceParent(self)

    @property
    def reloads(self) -> int:
        """Successful reloads since the start."""
        return self.gate.stats.reloads

    def _materials(self) -> list[Any]:
        return [listener.endpoint.server_tls.material for listener in self.listeners]

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
        if self.metrics is not None:
            self._listen_for_metrics()
        super().privilegedStartService()

    def _listen_for_metrics(self) -> None:
        from twisted.web.server import Site

        from netrpc.daemon import exit_with_error

        description = self.settings.metrics_listen
        outcome: list[Any] = []
        serverFromString(self.reactor, description).listen(Site(self.metrics)).addBoth(outcome.append)
        result = outcome[0] if outcome else None
        if isinstance(result, Failure) or result is None:
            reason = _listen_error(result) if isinstance(result, Failure) else "no port"
            exit_with_error(ConfigurationError(f"cannot listen on metrics_listen {description!r}: {reason}"))
        self.metrics_port = result

    def startService(self) -> None:
        """Refuse to serve as root, then log the start and tell systemd."""
        from netrpc.daemon import exit_with_error

        try:
            check_not_root()
            self._load_services()
        except ConfigurationError as error:
            exit_with_error(error)

        super().startService()
        for listener in self.listeners:
            assert listener.port is not None
            address = _tcp_address(listener.port)
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
        # A worker of --workers starts with SIGHUP blocked until now; one
        # that came meanwhile is delivered here and reloads.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        self.reactor.callWhenRunning(signal.signal, signal.SIGTERM, self._sigterm)
        if self.metrics_port is not None:
            log.info(
                "Serving counters for Prometheus on {address}",
                address=_describe_listening(self.metrics_port.getHost()),
            )
        self._log_start()
        self._log_policy()
        self._warn_unreadable_files()
        _warn_unreadable_installation()
        systemd.notify_ready(self._status())

    def _warn_unreadable_files(self) -> None:
        # Runs after the switch to the service user: what it cannot read
        # now, a SIGHUP reload cannot read either.
        unreadable = sorted(
            {
                str(path)
                for listener in self.listeners
                for path in _reloaded_paths(listener.endpoint.server_tls.material.files)
                if not os.access(path, os.R_OK)
            }
        )
        if unreadable:
            log.warn(
                "Reloads will fail: this process cannot read {files}; make them readable "
                "by the service user, for example through its group",
                files=", ".join(unreadable),
            )

    def _load_services(self) -> None:
        # Importing a service module runs its code, so it happens here, after
        # twistd has switched to the unprivileged user, never as root.
        registry = self.factory.registry
        for spec in self.settings.methods or (DEFAULT_SERVICE,):
            try:
                registry.load_service(spec)
            except ConfigurationError as error:
                if self.target is None:
                    raise
                raise ConfigurationError(
                    f"{error} (services are imported as user {self.target.name!r}, so the "
                    "module and every folder above it must be readable by that user)"
                ) from error

    def _log_start(self) -> None:
        material = self.listeners[0].endpoint.server_tls.material
        crl = material.crl
        log.info(
            "securerpc{instance} started: client CA {ca}; CRL {crl}; {methods} exposed",
            instance=f" {self.settings.instance}" if self.settings.instance else "",
            ca=", ".join(describe_name(ca.subject) for ca in material.ca_certificates),
            crl=f"{material.files.crl} ({len(list(crl))} revoked)" if crl is not None else "none",
            methods=plural(len(self.factory.registry), "method"),
            count=len(self.factory.registry),
        )
        if crl is None:
            log.warn(
                "No CRL configured: revoked client certificates are accepted; "
                "add crl=PATH to the mtls: endpoint to check revocations"
            )

    def _log_policy(self) -> None:
        policy = self.settings.policy
        if policy is None:
            log.warn(
                "No access policy: every certificate from the client CA may call every "
                "method; add [[policy.rule]] tables to the config file to restrict callers"
            )
            return
        log.info(
            "Access policy: {rules}; methods open to every client: {public}",
            rules=plural(len(policy.rules), "rule"),
            count=len(policy.rules),
            public=", ".join(policy.public_methods) or "none",
        )
        self._warn_unmatched_patterns(policy)

    def _warn_unmatched_patterns(self, policy: Policy) -> None:
        names = self.factory.registry.method_names()
        for number, rule in enumerate(policy.rules, start=1):
            for pattern in rule.methods:
                if not any(fnmatchcase(name, pattern) for name in names):
                    log.warn(
                        "Method pattern {pattern!r} in [[policy.rule]] number {number} matches "
                        "no published method; check it for typos",
                        pattern=pattern,
                        number=number,
                    )

    def _status(self) -> str:
        ports = ", ".join(
            f"{_tcp_address(listener.port).host}:{_tcp_address(listener.port).port}"
            for listener in self.listeners
            if listener.port is not None
        )
        return f"Serving on {ports}"

    def _sigterm(self, signum: int, frame: Any) -> None:
        # Twisted's own SIGTERM handler makes twistd raise the signal again
        # once the reactor stops, so the process would end "killed by
        # SIGTERM". A drained, orderly stop is a success: exit status 0.
        log.info("Received SIGTERM")
        # A worker of --workers gets SIGTERM twice when a signal reaches its
        # whole process group (systemd's default KillMode, timeout(1)) and its
        # parent passes one on as well. The stop has begun, so later ones
        # are ignored: one that came while Python shuts down would otherwise
        # end the process by the signal instead of with exit status 0.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.reactor.callFromThread(self._stop_reactor)

    def _stop_reactor(self) -> None:
        # The reactor may be stopping already, as when the parent of a
        # worker ended first.
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass

    def _sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """
        Re-read the TLS files of every endpoint and the config file's access
        policy. Nothing changes unless every file is valid. After a reload,
        new connections use the new material. Open connections are closed
        when their certificate is now rejected or their identity lost every
        policy rule. Last, the audit file is reopened; when that fails, the
        error is logged and audit lines go on to the old file.
        """
        systemd.notify_reloading()
        stats = self.gate.stats
        try:
            plan = prepare_reload(self.settings, self._server_tls(), self.reread_settings)
        except ConfigurationError as error:
            stats.failed_reloads += 1
            log.error("Reload failed, still serving on the old material: {error}", error=error)
            systemd.notify_ready(self._status())
            return

        for server_tls, material in zip(self._server_tls(), plan.materials):
            server_tls.install(material)
        self.settings = plan.settings
        to_close = self.gate.replace_policy(plan.settings.policy)
        to_close += connections_to_close(self.gate.connections(), self._server_tls_of)
        stats.reloads += 1
        log.info(
            "Reloaded TLS material and access policy (reload {count})", count=stats.reloads
        )
        self._close_after_reload(to_close)
        self._reopen_audit_file()
        if plan.needs_restart:
            log.warn(
                "Changed settings take effect only after a restart: {names}",
                names=", ".join(plan.needs_restart),
            )
        self._log_policy()
        self.expiry.check()
        systemd.notify_ready(self._status())

    def _reopen_audit_file(self) -> None:
        # Apart from the TLS and policy reload: a log file that cannot be
        # reopened must not keep a new CRL or policy from taking effect.
        if self.gate.audit is None:
            return
        try:
            self.gate.audit.reopen()
        except ConfigurationError as error:
            log.error(
                "Reloaded, but the audit file was not reopened, so audit lines still go "
                "to the old file: {error}",
                error=error,
            )

    def _server_tls(self) -> list[ServerTLS]:
        return [listener.endpoint.server_tls for listener in self.listeners]

    def _server_tls_of(self, connection: RPCServerProtocol) -> ServerTLS:
        """Return the ``ServerTLS`` of the endpoint that accepted ``connection``."""
        assert connection.transport is not None
        host = connection.transport.getHost()
        for listener in self.listeners:
            if listener.port is not None and listener.port.getHost() == host:
                return listener.endpoint.server_tls
        # An adopted or systemd socket may report its address differently;
        # the first endpoint's CAs are then the best guess.
        return self.listeners[0].endpoint.server_tls

    def _close_after_reload(self, to_close: list[tuple[RPCServerProtocol, str]]) -> None:
        closed: set[RPCServerProtocol] = set()
        for connection, reason in to_close:
            if connection in closed:
                continue
            closed.add(connection)
            log.warn(
                "Closing connection from {peer} of {identity} after reload: {reason}",
                peer=connection.peer,
                identity=describe_identity(connection.caller),
                reason=reason,
            )
            self.gate.stats.closed_by_reload += 1
            connection.abort()

    @inlineCallbacks
    def stopService(self) -> Any:
        """Stop listening, let calls in flight finish, then close every connection."""
        systemd.notify_stopping()
        log.info("Stopping: draining calls for up to {grace} s", grace=self.settings.limits.shutdown_grace)
        for listener in self.listeners:
            if listener.port is not None:
                yield listener.port.stopListening()
        if self.metrics_port is not None:
            yield self.metrics_port.stopListening()
        yield self.factory.drain(self.settings.limits.shutdown_grace)
        yield super().stopService()
        if self.gate.audit is not None:
            self.gate.audit.close()
        log.info("Stopped")
