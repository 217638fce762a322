"""Tests for expiry notices of the server certificate, the client CA and the CRL."""

from __future__ import annotations

import datetime

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from netrpc.certs import PKI, Usage
from netrpc.expiry import CHECK_INTERVAL, ExpiryWatch, find_expiring
from netrpc.tlsfiles import TLSFiles, TLSMaterial, load_material
from netrpc.verify import Role

DAY = datetime.timedelta(days=1)


@pytest.fixture(scope="module")
def short_lived(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> TLSMaterial:
    """The PKI's material with a server certificate that ends in ten days."""
    directory = tmp_path_factory.mktemp("short-lived")
    now = datetime.datetime.now(datetime.timezone.utc)
    issued = pki.server_authority().issue(
        "localhost", usage=Usage.SERVER, names=["localhost"], not_after=now + 10 * DAY
    )
    cert, key = directory / "server.crt", directory / "server.key"
    issued.write(cert, key)
    return load_material(TLSFiles(key, cert, pki.client_ca_cert, pki.crl), Role.SERVER)


def material_of(pki: PKI) -> TLSMaterial:
    return load_material(TLSFiles(pki.server_key, pki.server_cert, pki.client_ca_cert, pki.crl), Role.SERVER)


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class TestFind:
    def test_nothing_soon(self, pki: PKI) -> None:
        """A fresh PKI has nothing ending within a day."""
        assert find_expiring(material_of(pki), now=now(), warning_days=1) == []

    def test_server_certificate(self, short_lived: TLSMaterial) -> None:
        (notice,) = find_expiring(short_lived, now=now(), warning_days=30)
        assert notice.what == "server certificate CN=localhost"
        assert notice.path == short_lived.files.certificate
        assert not notice.passed
        assert notice.days_left == 9
        assert "ends in 9 days" in notice.describe()
        assert "netrpc certs server" in notice.describe()

    def test_outside_window(self, short_lived: TLSMaterial) -> None:
        assert find_expiring(short_lived, now=now(), warning_days=5) == []

    def test_passed(self, short_lived: TLSMaterial) -> None:
        (notice,) = find_expiring(short_lived, now=now() + 11 * DAY, warning_days=30)
        assert notice.passed
        assert "ended on" in notice.describe()

    def test_crl_and_ca(self, pki: PKI) -> None:
        """Far enough ahead, the CRL's next update and the client CA come into the window."""
        material = material_of(pki)
        crl_next = material.crl.next_update_utc if material.crl is not None else None
        assert crl_next is not None
        notices = find_expiring(material, now=crl_next - DAY, warning_days=2)
        assert [notice.what for notice in notices if notice.path == pki.crl] == ["CRL next update"]

        ca_end = material.ca_certificates[0].not_valid_after_utc
        notices = find_expiring(material, now=ca_end + DAY, warning_days=1)
        assert any(n.what.startswith("client CA CN=") and n.passed for n in notices)

    def test_last_day(self, short_lived: TLSMaterial) -> None:
        ends = short_lived.certificate.not_valid_after_utc
        (notice,) = find_expiring(short_lived, now=ends - datetime.timedelta(hours=2), warning_days=1)
        assert notice.days_left == 0
        assert "less than a day" in notice.describe()


class TestWatch:
    def test_start_and_daily(self, short_lived: TLSMaterial) -> None:
        clock = Clock()
        clock.advance(now().timestamp())
        watch = ExpiryWatch(lambda: [short_lived, short_lived], clock=clock, warning_days=30)
        with capturedLogs() as events:
            watch.startService()
        assert len(events) == 1
        assert events[0]["log_level"] == LogLevel.warn
        assert "Expiring soon: server certificate CN=localhost" in formatEvent(events[0])

        with capturedLogs() as events:
            clock.advance(CHECK_INTERVAL * 10)
        assert len(events) == 1
        assert events[0]["log_level"] == LogLevel.error
        assert "Expired: server certificate" in formatEvent(events[0])

        watch.stopService()
        assert clock.getDelayedCalls() == []

    def test_quiet(self, pki: PKI) -> None:
        clock = Clock()
        clock.advance(now().timestamp())
        watch = ExpiryWatch(lambda: [material_of(pki)], clock=clock, warning_days=1)
        with capturedLogs() as events:
            assert watch.check() == []
        assert events == []
