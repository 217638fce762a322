"""
Worker processes that share the daemon's listening sockets, for a daemon
started by hand: ``twistd -n securerpc --workers N``.

The parent process binds each ``listen`` socket once and starts N worker
processes, each a ``twistd securerpc`` with the parent's options, so the
kernel spreads new connections among the workers. The variable
``NETRPC_WORKER`` gives a worker its name and the ``listen`` values to use
in place of the parent's: the same endpoints with ``fd=N`` in place of the
socket options, so each worker adopts the parent's sockets.

The parent serves no calls. It restarts a worker that exits, passes SIGHUP
on to every worker (each reloads its TLS files), and on SIGTERM stops every
worker, each draining its calls as a single daemon does. A worker also
stops when the parent ends in any other way, even by SIGKILL, because the
parent keeps the write end of the worker's standard input open.

Privileges: started as root, the parent stays root so that it can start a
worker again later. It reads the TLS files only to check them, and never
imports the services, whose code must not run as root. Each worker reads
its files as root, switches to ``--user`` and then imports the services,
as a single daemon does. A worker that cannot start, for example because
a service fails to import, writes its error and is restarted with a
growing delay. So the user comes from ``--user`` or ``user`` in the config
file; twistd's ``--uid`` and ``--gid`` would switch the parent too, and are
rejected.

Worker ``i`` is named ``INSTANCE-i`` (``worker-i`` without ``--instance``).
Workers write their logs to the parent's standard output and error, each
line with the worker's name in front of its namespace, such as
``[rpc-2 netrpc.server#error]``.

Under systemd, prefer one unit per instance (``securerpc@.socket`` and
``securerpc@.service``): systemd then restarts and reloads each instance
on its own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.error import (
    ConnectionDone,
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
    ReactorNotRunning,
)
from twisted.internet.interfaces import IProcessTransport, IReadDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.endpoints import quoteStringArgument
from twisted.logger import ILogObserver, LogEvent, Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from netrpc._plural import plural
from netrpc import systemd
from netrpc._backoff import Backoff
from netrpc.config import Settings
from netrpc.endpoints import (
    PREFIX,
    SOCKET_OPTIONS,
    EndpointDescriptionError,
    listening_socket_for,
    split_description,
)
from netrpc.exceptions import ConfigurationError
from netrpc.privileges import check_start_privileges, resolve_target_user
from netrpc.tlsfiles import key_needs_passphrase

log = Logger(namespace="netrpc.workers")

# Bound on --workers, against a typo such as 100 for 10.
MAX_WORKERS = 256

# A worker that ran this long before it exited counts as healthy and is
# restarted at once. One that exits sooner is restarted ever more slowly.
STABLE_SECONDS = 10.0
RESTART_BACKOFF = Backoff(initial=1.0, maximum=30.0, jitter=0.0)

# After SIGTERM, each worker drains for up to shutdown_grace seconds and then
# closes its connections; past this margin on top, it is killed.
STOP_MARGIN = 5.0

# The variable that makes a securerpc process a worker: a JSON object with
# the worker's name and its listen values.
WORKER_VARIABLE = "NETRPC_WORKER"

# Variables addressed to the parent process alone: systemd's notification
# socket and watchdog, and its socket activation.
_PARENT_VARIABLES = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)

# The twistd entry point, run by the same Python interpreter as the parent.
_TWISTD = "from twisted.scripts.twistd import run; run()"
# The twistd --logger of every worker.
_WORKER_LOGGER = "netrpc.workers.worker_log_observer"


@dataclass
class SharedSocket:
    """One ``listen`` value, the socket the parent holds for it, and the workers' description."""

    description: str
    options: dict[str, str]
    listener: socket.socket | None = None

    def worker_description(self) -> str:
        """Return the ``mtls:`` description that adopts the parent's socket."""
        assert self.listener is not None
        options = {
            name: value for name, value in self.options.items() if name not in SOCKET_OPTIONS
        }
        options["fd"] = str(self.listener.fileno())
        fields = [f"{name}={quoteStringArgument(value)}" for name, value in options.items()]
        return ":".join([PREFIX, *fields])


@dataclass
class Worker:
    """One worker process: its name, its process, and its restarts."""

    name: str
    process: IProcessTransport | None = None
    pid: int | None = None
    started_at: float = 0.0
    quick_exits: int = 0
    ended: defer.Deferred[None] = field(default_factory=defer.Deferred)


class _WorkerProtocol(ProcessProtocol):
    # The worker's standard input stays open and unused. When this process
    # ends, the pipe closes and the worker reads end of file and stops.

    def __init__(self, pool: WorkerPool, worker: Worker) -> None:
        self._pool = pool
        self._worker = worker

    def processEnded(self, reason: Failure) -> None:
        self._pool.worker_ended(self._worker, reason)


def is_worker(environ: Mapping[str, str]) -> bool:
    """Return whether this process was started by ``--workers`` as one of the workers."""
    return WORKER_VARIABLE in environ


def worker_settings(settings: Settings, environ: Mapping[str, str]) -> Settings:
    """
    Return ``settings`` with the name and listen values that
    ``NETRPC_WORKER`` gives a worker. Outside a worker, return ``settings``
    unchanged.
    """
    text = environ.get(WORKER_VARIABLE)
    if text is None:
        return settings
    try:
        assignment = json.loads(text)
        name = str(assignment["name"])
        listen = tuple(str(item) for item in assignment["listen"])
    except (ValueError, KeyError, TypeError):
        raise ConfigurationError(
            f"invalid {WORKER_VARIABLE}={text!r}: expected the JSON object that --workers "
            f"sets; unset {WORKER_VARIABLE} to start a single daemon"
        ) from None
    return replace(settings, listen=listen, instance=name)


@implementer(IReadDescriptor)
class _ParentPipe:
    """The read end of a worker's standard input, which reaches end of file when the parent ends."""

    def __init__(self, parent_gone: Callable[[], None]) -> None:
        self._parent_gone = parent_gone

    def fileno(self) -> int:
        return 0

    # Twisted's reactors expect an exception here, which is what its own
    # descriptors return; IReadDescriptor declares a Failure.
    def doRead(self) -> ConnectionDone | None:  # type: ignore[override]
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if data:
            return None
        # Returning a reason makes the reactor drop this reader.
        return ConnectionDone("the parent process ended")

    def connectionLost(self, reason: Failure) -> None:
        self._parent_gone()

    def logPrefix(self) -> str:
        return "parent"


class ParentWatch(Service):
    """Stops the reactor of a worker, which drains its calls, once the parent process ends."""

    def __init__(self, reactor: Any, name: str) -> None:
        self.reactor = reactor
        self.worker_name = name
        self._pipe = _ParentPipe(self._parent_gone)

    def startService(self) -> None:
        super().startService()
        self.reactor.addReader(self._pipe)

    def stopService(self) -> None:
        self.reactor.removeReader(self._pipe)
        super().stopService()

    def _parent_gone(self) -> None:
        if not self.running:
            return
        log.warn("The parent process ended; stopping worker {name}", name=self.worker_name)
        self.reactor.stop()


def watch_parent(service: MultiService, settings: Settings, reactor: Any = None) -> None:
    """Add a ``ParentWatch`` to the service of a worker; do nothing outside a worker."""
    if not is_worker(os.environ):
        return
    if reactor is None:
        from twisted.internet import reactor
    ParentWatch(reactor, settings.instance).setServiceParent(service)


@implementer(ILogObserver)
class NamedLogObserver:
    """Puts a worker's name in front of the system field of each event, then passes it on."""

    def __init__(self, name: str, observer: ILogObserver) -> None:
        self.name = name
        self.observer = observer

    def __call__(self, event: LogEvent) -> None:
        system = event.get("log_system")
        if system is None:
            # The field twistd's text format shows when an event has none.
            level = event.get("log_level")
            level_name = level.name if level is not None else "-"
            system = f"{event.get('log_namespace', '-')}#{level_name}"
        self.observer({**event, "log_system": f"{self.name} {system}"})


def worker_log_observer() -> ILogObserver:
    """
    Build a worker's twistd log observer: the daemon's usual one for
    standard output, with the worker's name in every line. Outside a
    worker it is that usual observer alone.
    """
    observer = systemd.journal_observer()
    name = worker_name(os.environ)
    if name is None:
        return observer
    return NamedLogObserver(name, observer)


def worker_name(environ: Mapping[str, str]) -> str | None:
    """
    Return the name ``NETRPC_WORKER`` gives this worker, or None outside a
    worker or when the variable is invalid (``worker_settings`` reports that).
    """
    text = environ.get(WORKER_VARIABLE)
    if text is None:
        return None
    try:
        return str(json.loads(text)["name"])
    except (ValueError, KeyError, TypeError):
        return None


def worker_environment(
    environ: Mapping[str, str], name: str, listen: Sequence[str]
) -> dict[str, str]:
    """
    Return the environment of worker ``name``: the parent's, without the
    variables systemd addressed to the parent, with ``NETRPC_WORKER`` added.
    """
    environment = {
        key: value for key, value in environ.items() if key not in _PARENT_VARIABLES
    }
    environment[WORKER_VARIABLE] = json.dumps({"name": name, "listen": list(listen)})
    return environment


def check_passphrase_source(options: Mapping[str, str], settings: Settings) -> None:
    """
    Reject an encrypted server key whose passphrase only a prompt could give,
    because workers have no terminal.
    """
    key = options.get("privateKey")
    if key is None or "passphraseFile" in options or settings.passphrase_file is not None:
        return
    from netrpc.server import PASSPHRASE_CREDENTIAL

    if systemd.credential_path(PASSPHRASE_CREDENTIAL) is not None:
        return
    if key_needs_passphrase(Path(key)):
        raise ConfigurationError(
            f"private key {key!r} is encrypted and --workers starts processes that cannot "
            "prompt for its passphrase; pass --passphrase-file with a file (mode 0600) "
            "that contains it"
        )


def check_no_twistd_switch(twistd_options: Mapping[str, Any] | None) -> None:
    """
    Reject twistd's ``--uid`` and ``--gid`` with ``--workers``: twistd would
    switch the parent, which then could not start its workers as root.
    """
    if twistd_options is None:
        return
    if twistd_options.get("uid") is None and twistd_options.get("gid") is None:
        return
    raise ConfigurationError(
        "twistd's --uid and --gid cannot be combined with --workers, because the parent "
        "process must keep its privileges to start workers; name the user with --user "
        "(or 'user' in the config file) instead, and each worker switches to it"
    )


def build_pool(
    settings: Settings,
    count: int,
    *,
    arguments: Sequence[str],
    twistd_options: Any = None,
    reactor: Any = None,
) -> WorkerPool:
    """
    Check everything a worker will read, as ``build_service`` does, and
    build the parent's service. Nothing listens yet. ``arguments`` are the
    parent's ``securerpc`` options, which every worker gets too.
    """
    from netrpc.server import build_listeners, endpoint_options

    if reactor is None:
        from twisted.internet import reactor
    if not 1 <= count <= MAX_WORKERS:
        raise ConfigurationError(
            f"invalid --workers {count!r}: expected a whole number from 1 to {MAX_WORKERS}"
        )

    if settings.metrics_listen:
        raise ConfigurationError(
            f"metrics_listen={settings.metrics_listen!r} cannot be combined with --workers, "
            "because every worker would bind that address; remove it, or run one instance "
            "per unit under systemd, each with its own metrics address"
        )

    # The workers switch users; this process stays as it started.
    check_no_twistd_switch(twistd_options)
    target = resolve_target_user(settings.user, settings.group)
    check_start_privileges(target, None, workers=True)

    for description in settings.listen:
        check_passphrase_source(endpoint_options(description, settings), settings)
    build_listeners(reactor, settings)

    sockets = [SharedSocket(d, split_description(d)[1]) for d in settings.listen]
    base = settings.instance or "worker"
    workers = [Worker(f"{base}-{number}") for number in range(1, count + 1)]
    return WorkerPool(reactor, settings, sockets, workers, arguments=arguments)


class WorkerPool(Service):
    """
    The parent process of ``--workers``: it binds the sockets in
    ``privilegedStartService``, starts the workers in ``startService`` and
    stops them in ``stopService``.
    """

    def __init__(
        self,
        reactor: Any,
        settings: Settings,
        sockets: list[SharedSocket],
        workers: list[Worker],
        *,
        arguments: Sequence[str],
    ) -> None:
        self.reactor = reactor
        self.settings = settings
        self.sockets = sockets
        self.workers = workers
        self._arguments = list(arguments)
        self._stopping = False
        self._restarts: dict[str, Any] = {}

    def privilegedStartService(self) -> None:
        """Bind or adopt every listening socket, or exit with one line naming the failed one."""
        from netrpc.daemon import exit_with_error

        for shared in self.sockets:
            try:
                shared.listener = listening_socket_for(self.reactor, shared.options)
            except EndpointDescriptionError as error:
                exit_with_error(error)
            except OSError as error:
                problem = (error.strerror or str(error)).lower()
                exit_with_error(
                    ConfigurationError(
                        f"cannot listen on {shared.description!r}: {problem}; "
                        "stop what uses the port or choose another one"
                    )
                )
            shared.listener.set_inheritable(True)
        super().privilegedStartService()

    def startService(self) -> None:
        """Start every worker and tell systemd."""
        super().startService()
        for shared in self.sockets:
            assert shared.listener is not None
            host, port = shared.listener.getsockname()[:2]
            log.info(
                "Listening on {host} port {port} for {workers}",
                host=host,
                port=port,
                workers=plural(len(self.workers), "worker"),
                count=len(self.workers),
            )
        for worker in self.workers:
            self._spawn(worker)

        signal.signal(signal.SIGHUP, self._sighup)
        self.reactor.callWhenRunning(signal.signal, signal.SIGTERM, self._sigterm)
        systemd.notify_ready(f"Supervising {plural(len(self.workers), 'worker')}")

    def _spawn(self, worker: Worker) -> None:
        self._restarts.pop(worker.name, None)
        listen = [shared.worker_description() for shared in self.sockets]
        command = [
            sys.executable,
            "-c",
            _TWISTD,
            "--nodaemon",
            "--pidfile=",
            f"--logger={_WORKER_LOGGER}",
            "securerpc",
            *self._arguments,
        ]
        child_descriptors: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        for shared in self.sockets:
            assert shared.listener is not None
            child_descriptors[shared.listener.fileno()] = shared.listener.fileno()

        worker.ended = defer.Deferred()
        worker.started_at = self.reactor.seconds()
        # SIGHUP's default action ends a process, and a new worker takes
        # a good part of a second to install its handler. The worker starts
        # with SIGHUP blocked, as the signal mask survives fork and exec, so
        # one sent meanwhile waits until the worker unblocks it after
        # installing its handler, and then reloads.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            worker.process = self.reactor.spawnProcess(
                _WorkerProtocol(self, worker),
                sys.executable,
                command,
                env=worker_environment(os.environ, worker.name, listen),
                childFDs=child_descriptors,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        worker.pid = worker.process.pid
        log.info("Started worker {name} (pid {pid})", name=worker.name, pid=worker.pid)

    def worker_ended(self, worker: Worker, reason: Failure) -> None:
        """Restart a worker that exited while the pool runs; count it as stopped otherwise."""
        pid = worker.pid
        worker.process = None
        # processEnded always carries ProcessDone or ProcessTerminated.
        ending = cast(ProcessDone | ProcessTerminated, reason.value)
        status = ending.exitCode
        if status is None:
            status = f"signal {ending.signal}"
        ended, worker.ended = worker.ended, defer.Deferred()
        if self._stopping:
            log.info(
                "Worker {name} (pid {pid}) stopped, exit status {status}",
                name=worker.name,
                pid=pid,
                status=status,
            )
            ended.callback(None)
            return

        ran_for = self.reactor.seconds() - worker.started_at
        worker.quick_exits = 0 if ran_for >= STABLE_SECONDS else worker.quick_exits + 1
        delay = RESTART_BACKOFF.delay(worker.quick_exits - 1) if worker.quick_exits else 0.0
        log.error(
            "Worker {name} (pid {pid}) exited unexpectedly, exit status {status}; "
            "restarting it in {delay:g} s",
            name=worker.name,
            pid=pid,
            status=status,
            delay=delay,
        )
        ended.callback(None)
        self._restarts[worker.name] = self.reactor.callLater(delay, self._spawn, worker)

    def _sigterm(self, signum: int, frame: Any) -> None:
        # As in the single daemon: an orderly stop after SIGTERM exits 0.
        # The stop has begun, so later SIGTERMs are ignored; one that came
        # while Python shuts down would otherwise end the process by the
        # signal instead of with exit status 0.
        log.info("Received SIGTERM")
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.reactor.callFromThread(self._stop_reactor)

    def _stop_reactor(self) -> None:
        # The reactor may be stopping already, as after SIGINT.
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass

    def _sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._signal_workers, "HUP")

    def _signal_workers(self, name: str) -> None:
        for worker in self.workers:
            if worker.process is None:
                continue
            try:
                worker.process.signalProcess(name)
            except ProcessExitedAlready:
                pass

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """Send every worker SIGTERM, so each drains its calls; kill any that takes too long."""
        self._stopping = True
        systemd.notify_stopping()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()

        running = [worker for worker in self.workers if worker.process is not None]
        log.info("Stopping {workers}", workers=plural(len(running), "worker"), count=len(running))
        ended = defer.DeferredList([worker.ended for worker in running])
        self._signal_workers("TERM")
        limit = self.settings.limits.shutdown_grace + STOP_MARGIN
        kill = self.reactor.callLater(limit, self._signal_workers, "KILL")
        yield ended
        if kill.active():
            kill.cancel()

        for shared in self.sockets:
            if shared.listener is not None:
                shared.listener.close()
        yield super().stopService()
        log.info("Stopped")
