"""
Privilege rules of the daemon: RPC code never runs as root.

A daemon started as root must be given the user to become. twistd reads the
keys and binds the ports as root, then switches to that user before any RPC
code runs; ``check_not_root`` is the last guard once the switch should have
happened.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

from netrpc.exceptions import ConfigurationError


@dataclass(frozen=True)
class TargetUser:
    """The user and group the daemon switches to after binding its ports."""

    name: str
    uid: int
    gid: int


def resolve_target_user(user: str | None, group: str | None) -> TargetUser | None:
    """
    Look up the configured user and group; return ``None`` when none is set.

    Raises ``ConfigurationError`` when the user or group does not exist, or
    when the configured user is root itself.
    """
    if user is None:
        if group is not None:
            raise ConfigurationError(f"group {group!r} is set without a user; set user as well")
        return None

    try:
        entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise ConfigurationError(
            f"user {user!r} does not exist; create it (for example with systemd-sysusers) "
            "or name another unprivileged user"
        ) from None
    if entry.pw_uid == 0:
        raise ConfigurationError(f"user {user!r} is root; name an unprivileged user")

    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid if not group.isdigit() else int(group)
        except KeyError:
            raise ConfigurationError(f"group {group!r} does not exist; name an existing group") from None
    if gid == 0:
        # Group root can read files such as key material kept 0640 root:root.
        raise ConfigurationError(
            f"group {group or entry.pw_name!r} is root's group (gid 0); name an unprivileged group"
        )
    return TargetUser(entry.pw_name, entry.pw_uid, gid)


def switch_ids(
    target: TargetUser | None, twistd_uid: int | None, twistd_gid: int | None = None
) -> tuple[int, int] | None:
    """
    Return the ``(uid, gid)`` that a daemon started as root switches to
    after binding its ports, or None when it runs on as it started.

    twistd's own ``--uid`` wins over ``target``, as in ``build_service``.
    Without ``--gid``, twistd takes the primary group of the ``--uid`` user.
    """
    if os.geteuid() != 0:
        return None
    if twistd_uid is not None and twistd_uid != 0:
        if twistd_gid is not None:
            return twistd_uid, twistd_gid
        try:
            return twistd_uid, pwd.getpwuid(twistd_uid).pw_gid
        except KeyError:
            raise ConfigurationError(
                f"twistd's --uid {twistd_uid!r} names no user; pass --gid as well, "
                "or name the user with --user"
            ) from None
    if target is not None:
        return target.uid, target.gid
    return None


def check_start_privileges(
    target: TargetUser | None,
    twistd_uid: int | None,
    twistd_gid: int | None = None,
    *,
    workers: bool = False,
) -> None:
    """
    Reject a start as root that names no user to become, or root's group.

    ``twistd_uid`` and ``twistd_gid`` are the values of twistd's own
    ``--uid`` and ``--gid`` options, if given. ``workers`` is true for the
    parent of ``--workers``, which takes the user from ``--user`` only.
    """
    if twistd_gid == 0:
        raise ConfigurationError(
            "refusing to run RPC methods with root's group: twistd's --gid is 0; "
            "name an unprivileged group"
        )
    if os.geteuid() != 0 or target is not None or twistd_uid not in (None, 0):
        return
    advice = "name an unprivileged user with --user or 'user' in the config file"
    if not workers:
        advice += ", or with twistd's --uid/--gid"
    raise ConfigurationError(f"refusing to run RPC methods as root; {advice}")


def check_not_root() -> None:
    """Raise ``ConfigurationError`` if the process still runs as root or in root's group."""
    if os.geteuid() == 0 or os.getuid() == 0:
        raise ConfigurationError(
            "refusing to run RPC methods as root: the switch to an unprivileged user "
            "did not happen; name the user with --user or 'user' in the config file"
        )
    if 0 in (os.getgid(), os.getegid(), *os.getgroups()):
        raise ConfigurationError(
            "refusing to run RPC methods in root's group (gid 0); set an unprivileged "
            "group with --group or twistd's --gid, and take the user out of group root"
        )
