"""
Expiry warnings for the daemon's TLS material: its own certificate, the
client CAs it trusts and the CRL's next-update date.

Once the server certificate has expired clients reject the server, and once
a CA has expired or the CRL's next update has passed the server rejects
every client. ``find_expiring()`` finds what ends within the warning
window. ``ExpiryWatch`` runs that check at start and once a day and logs a
warning for each date inside the window and an error for each date already
passed.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from netrpc._plural import plural
from netrpc.tlsfiles import TLSMaterial
from netrpc.verify import describe_name

__all__ = ["CHECK_INTERVAL", "ExpiryNotice", "ExpiryWatch", "find_expiring"]

CHECK_INTERVAL = 24 * 60 * 60.0

log = Logger(namespace="netrpc.expiry")


@dataclass(frozen=True)
class ExpiryNotice:
    """One date inside the warning window or already passed."""

    what: str
    path: Path
    ends: datetime.datetime
    now: datetime.datetime
    advice: str

    @property
    def passed(self) -> bool:
        """Whether the date is already behind ``now``."""
        return self.ends <= self.now

    @property
    def days_left(self) -> int:
        """Whole days from ``now`` to the date, 0 on the last day; negative once passed."""
        return (self.ends - self.now) // datetime.timedelta(days=1)

    def describe(self) -> str:
        """Return a log line that names the file, the date and what to do."""
        date = f"{self.ends:%Y-%m-%d %H:%M} UTC"
        if self.passed:
            return f"{self.what} in {str(self.path)!r} ended on {date}; {self.advice}"
        days = "less than a day" if self.days_left == 0 else plural(self.days_left, "day")
        return f"{self.what} in {str(self.path)!r} ends in {days}, on {date}; {self.advice}"


def find_expiring(
    material: TLSMaterial, *, now: datetime.datetime, warning_days: int
) -> list[ExpiryNotice]:
    """
    Return a notice for each date of ``material`` that ends within
    ``warning_days`` of ``now`` or has passed: the server certificate,
    every client CA and the CRL's next update. A CRL without a next-update
    date never expires and gets no notice.
    """
    limit = now + datetime.timedelta(days=warning_days)
    files = material.files

    dates: list[tuple[str, Path, datetime.datetime, str]] = [
        (
            f"server certificate {describe_name(material.certificate.subject)}",
            files.certificate,
            material.certificate.not_valid_after_utc,
            "renew it, for example with 'netrpc certs server DIR', and reload",
        )
    ]
    dates.extend(
        (
            f"client CA {describe_name(ca.subject)}",
            files.ca_certificates,
            ca.not_valid_after_utc,
            "clients are rejected once it has ended: create a new client CA and reissue "
            "the client certificates before then",
        )
        for ca in material.ca_certificates
    )

    next_update = _next_update(material.crl)
    if next_update is not None and files.crl is not None:
        dates.append(
            (
                "CRL next update",
                files.crl,
                next_update,
                "every client is rejected once it has passed: re-sign the CRL, for example "
                "with 'netrpc certs crl DIR', and reload",
            )
        )

    return [
        ExpiryNotice(what, path, ends, now, advice)
        for what, path, ends, advice in dates
        if ends <= limit
    ]


def _next_update(crl: x509.CertificateRevocationList | None) -> datetime.datetime | None:
    return crl.next_update_utc if crl is not None else None


class ExpiryWatch(Service):
    """
    Log expiry notices for the materials that ``materials`` returns, when
    the service starts, when ``check()`` is called (after a reload) and
    every ``interval`` seconds.
    """

    def __init__(
        self,
        materials: Callable[[], Iterable[TLSMaterial]],
        *,
        clock: IReactorTime,
        warning_days: int,
        interval: float = CHECK_INTERVAL,
    ) -> None:
        self._materials = materials
        self._clock = clock
        self.warning_days = warning_days
        self.interval = interval
        self._next: IDelayedCall | None = None

    def startService(self) -> None:
        super().startService()
        self._run()

    def stopService(self) -> None:
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        super().stopService()

    def _run(self) -> None:
        self.check()
        self._next = self._clock.callLater(self.interval, self._run)

    def check(self) -> list[ExpiryNotice]:
        """Log and return the notices for the current materials."""
        now = datetime.datetime.fromtimestamp(self._clock.seconds(), datetime.timezone.utc)
        notices: dict[tuple[str, Path], ExpiryNotice] = {}
        for material in self._materials():
            for notice in find_expiring(material, now=now, warning_days=self.warning_days):
                # Several endpoints often share one set of files.
                notices.setdefault((notice.what, notice.path), notice)

        for notice in notices.values():
            if notice.passed:
                log.error("Expired: {notice}", notice=notice.describe(), path=str(notice.path))
            else:
                log.warn("Expiring soon: {notice}", notice=notice.describe(), path=str(notice.path))
        return list(notices.values())
