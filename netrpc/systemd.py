"""
systemd integration for the daemon, without libsystemd.

Covers the parts of systemd's service interface that the daemon uses:
readiness, reload, stop and status notifications and watchdog pings over the
``sd_notify`` datagram protocol (``$NOTIFY_SOCKET``), service credentials
(``$CREDENTIALS_DIRECTORY``), sockets passed by socket activation
(``$LISTEN_FDS``, ``$LISTEN_PID``, ``$LISTEN_FDNAMES``) and detection of a
journal connection (``$JOURNAL_STREAM``).

Every function reads the process environment unless it is given an
``environ`` mapping, and does nothing when the process does not run under
systemd: notifications return False, lookups return None or an empty list.
The daemon can therefore call them unconditionally.

The protocols are described in sd_notify(3), sd_listen_fds(3),
systemd.exec(5) ("Credentials" and "Environment Variables in Spawned
Processes") and systemd.socket(5).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from twisted.application.internet import TimerService
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    eventAsText,
    textFileLogObserver,
)

from netrpc._plural import plural

__all__ = [
    "ListenFD",
    "credential_path",
    "journal_observer",
    "listen_fds",
    "notify",
    "notify_ready",
    "notify_reloading",
    "notify_status",
    "notify_stopping",
    "notify_watchdog",
    "under_journal",
    "watchdog_interval",
    "watchdog_service",
]

# systemd passes sockets starting at this descriptor (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3

# systemd reads the notification socket as soon as a datagram arrives; a send
# that blocks longer than this means the manager is stuck, and the daemon's
# reactor must not hang with it.
NOTIFY_SEND_TIMEOUT = 5.0

# sd_notify(3) field names are upper-case ASCII words such as READY or STATUS.
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]*")

# Credential names are file names inside $CREDENTIALS_DIRECTORY.
_CREDENTIAL_NAME = re.compile(r"[A-Za-z0-9_.@+-]+")

# journald reads a "<N>" syslog priority prefix at the start of each line
# (SyslogLevelPrefix=yes, the default), see sd-daemon(3).
_JOURNAL_PRIORITY = {
    LogLevel.debug: 7,
    LogLevel.info: 6,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}


class ListenFD(NamedTuple):
    """A listening socket passed by systemd, with the name its unit gave it."""

    fd: int
    name: str


def notify(environ: Mapping[str, str] | None = None, **fields: object) -> bool:
    """
    Send ``fields`` to systemd as one sd_notify(3) message.

    Field names are the protocol's upper-case names (``READY=1``,
    ``STATUS="..."``). Returns False without sending when ``$NOTIFY_SOCKET``
    is unset, which means the process does not run as a ``Type=notify``
    service. Raises ValueError for a field that cannot be encoded and
    OSError when the socket rejects the message.
    """
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False

    message = _encode_fields(fields)
    target = _notify_address(address)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(NOTIFY_SEND_TIMEOUT)
        try:
            sock.sendto(message, target)
        except OSError as error:
            raise OSError(
                error.errno,
                f"Could not send {message!r} to systemd's notification socket "
                f"{address!r}: {error.strerror}",
            ) from error
    return True


def notify_ready(
    status: str | None = None, environ: Mapping[str, str] | None = None
) -> bool:
    """Tell systemd that the service has started, or finished a reload."""
    return notify(environ, READY=1, **_status_field(status))


def notify_reloading(
    status: str | None = None, environ: Mapping[str, str] | None = None
) -> bool:
    """
    Tell systemd that the service is reloading its configuration.

    Send ``notify_ready()`` when the reload is done. ``MONOTONIC_USEC`` lets
    systemd 253 and later (``Type=notify-reload``) match the two messages;
    older versions ignore it.
    """
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(environ, RELOADING=1, MONOTONIC_USEC=now_usec, **_status_field(status))


def notify_stopping(
    status: str | None = None, environ: Mapping[str, str] | None = None
) -> bool:
    """Tell systemd that the service has begun to shut down."""
    return notify(environ, STOPPING=1, **_status_field(status))


def notify_status(text: str, environ: Mapping[str, str] | None = None) -> bool:
    """Set the one-line status that ``systemctl status`` shows."""
    return notify(environ, **_status_field(text))


def notify_watchdog(environ: Mapping[str, str] | None = None) -> bool:
    """Send one watchdog keep-alive ping."""
    return notify(environ, WATCHDOG=1)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """
    Return how often to ping the watchdog, in seconds, or None when it is off.

    That is half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises.
    The watchdog is off for this process when ``$WATCHDOG_PID`` names
    another process. Raises ValueError for a malformed variable.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None

    pid = env.get("WATCHDOG_PID")
    if pid and _parse_positive(pid, "WATCHDOG_PID") != os.getpid():
        return None
    return _parse_positive(usec, "WATCHDOG_USEC") / 2_000_000


def watchdog_service(environ: Mapping[str, str] | None = None) -> TimerService | None:
    """
    Return a service that pings the watchdog while the reactor runs.

    The pings come from the reactor thread, so a reactor that hangs stops
    them and systemd restarts the service (with ``Restart=on-failure`` or
    ``on-watchdog``). Returns None when the watchdog is off.
    """
    interval = watchdog_interval(environ)
    if interval is None:
        return None
    service = TimerService(interval, notify_watchdog, environ)
    service.setName("systemd-watchdog")
    return service


def credential_path(name: str, environ: Mapping[str, str] | None = None) -> Path | None:
    """
    Return the path of the service credential ``name``, or None.

    None means that ``$CREDENTIALS_DIRECTORY`` is unset or contains no such
    credential (``LoadCredential=name:...`` in the unit creates it). Raises
    ValueError for a name that is not a plain file name.
    """
    if not _CREDENTIAL_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"Invalid credential name {name!r}: expected a file name made of "
            f"letters, digits and . _ - @ +, as in LoadCredential=NAME:PATH"
        )

    env = os.environ if environ is None else environ
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    return path if path.is_file() else None


def listen_fds(environ: Mapping[str, str] | None = None) -> list[ListenFD]:
    """
    Return the sockets systemd passed to this process by socket activation.

    The list is empty unless ``$LISTEN_PID`` is this process, which keeps a
    child that inherited the variables from using its parent's sockets.
    Names come from ``FileDescriptorName=`` (the socket unit's name by
    default); without ``$LISTEN_FDNAMES`` each is ``"unknown"``, as in
    sd_listen_fds_with_names(3). The descriptors get close-on-exec. The
    environment is left unchanged, so several endpoints can each look up
    their socket. Raises ValueError for malformed variables.
    """
    env = os.environ if environ is None else environ
    pid = env.get("LISTEN_PID")
    if not pid or _parse_positive(pid, "LISTEN_PID") != os.getpid():
        return []

    count = _parse_count(env.get("LISTEN_FDS", "0"))
    names = _parse_names(env.get("LISTEN_FDNAMES"), count)
    passed = [ListenFD(LISTEN_FDS_START + index, names[index]) for index in range(count)]
    for listen_fd in passed:
        _set_cloexec(listen_fd.fd)
    return passed


def under_journal(fd: int = 1, environ: Mapping[str, str] | None = None) -> bool:
    """
    Return True when descriptor ``fd`` is systemd's connection to the journal.

    systemd sets ``$JOURNAL_STREAM`` to the device and inode of that
    connection; comparing them with ``fd`` shows whether the output still
    goes there, and not to a file or pipe the process was started with.
    """
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False

    try:
        stat = os.fstat(fd)
    except OSError:
        return False
    return (stat.st_dev, stat.st_ino) == (int(device), int(inode))


def journal_observer() -> ILogObserver:
    """
    Build the twistd log observer for standard output.

    When standard output is the journal, each line carries its priority and
    no timestamp, because journald adds its own. Otherwise this is twistd's
    usual timestamped text observer. Use it with
    ``twistd --logger=netrpc.systemd.journal_observer``.
    """
    if under_journal(sys.stdout.fileno()):
        return FileLogObserver(sys.stdout, format_journal_event)
    return textFileLogObserver(sys.stdout)


def format_journal_event(event: LogEvent) -> str | None:
    """
    Format a log event as journal lines: ``<priority>[system] text``.

    Every line of a multi-line event (a traceback) gets the prefix, because
    journald stores each line as its own entry.
    """
    text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    if not text:
        return None

    system = event.get("log_system") or event.get("log_namespace", "-")
    priority = _JOURNAL_PRIORITY.get(event.get("log_level", LogLevel.info), 6)
    first, *rest = text.rstrip("\n").split("\n")
    lines = [f"<{priority}>[{system}] {first}"]
    lines.extend(f"<{priority}>{line}" for line in rest)
    return "\n".join(lines) + "\n"


def _encode_fields(fields: Mapping[str, object]) -> bytes:
    if not fields:
        raise ValueError("A notification needs at least one field, such as READY=1")

    lines = []
    for name, value in fields.items():
        text = str(value)
        if not _FIELD_NAME.fullmatch(name):
            raise ValueError(
                f"Invalid sd_notify field name {name!r}: expected upper-case "
                f"letters, digits and underscores, such as READY or STATUS"
            )
        if "\n" in text:
            raise ValueError(
                f"Invalid value {text!r} for sd_notify field {name}: a value "
                f"must fit on one line"
            )
        lines.append(f"{name}={text}")
    return "\n".join(lines).encode("utf-8")


def _notify_address(address: str) -> str:
    """Turn ``$NOTIFY_SOCKET`` into an address for ``sendto``."""
    if address.startswith("@"):
        # A leading "@" names a socket in Linux's abstract namespace, which
        # Python addresses with a leading NUL byte.
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    raise OSError(
        errno.EAFNOSUPPORT,
        f"Unsupported NOTIFY_SOCKET={address!r}: expected an absolute path or "
        f"an abstract socket name starting with '@'",
    )


def _status_field(status: str | None) -> dict[str, str]:
    """Return a STATUS field, with line breaks turned into spaces."""
    if status is None:
        return {}
    return {"STATUS": " ".join(status.splitlines())}


def _parse_positive(value: str, variable: str) -> int:
    if not value.isdigit() or int(value) == 0:
        raise ValueError(f"Invalid ${variable}={value!r}: expected a positive integer")
    return int(value)


def _parse_count(value: str) -> int:
    if not value.isdigit():
        raise ValueError(f"Invalid $LISTEN_FDS={value!r}: expected a count of descriptors")
    return int(value)


def _parse_names(value: str | None, count: int) -> list[str]:
    if value is None:
        return ["unknown"] * count

    names = value.split(":") if count else []
    if len(names) != count:
        raise ValueError(
            f"Invalid $LISTEN_FDNAMES={value!r}: expected {plural(count, 'name')} "
            f"separated by ':', one per descriptor in $LISTEN_FDS"
        )
    return names


def _set_cloexec(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
