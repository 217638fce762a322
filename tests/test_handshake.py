"""The rate-limited handshake log, on a fake clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.logger import Logger, LogEvent

from netrpc.handshake import HandshakeLog, RepeatLimiter, describe_address
from netrpc.verify import Reason, Rejection


class Reports:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, key: str, count: int) -> None:
        self.calls.append((key, count))


def peer(host: str = "192.0.2.7", port: int = 40000) -> IPv4Address:
    return IPv4Address("TCP", host, port)


def logger() -> tuple[Logger, list[LogEvent]]:
    events: list[LogEvent] = []
    return Logger(namespace="test", observer=events.append), events


EXPIRED = Rejection(Reason.EXPIRED, "certificate CN=alice expired", "CN=alice", "CN=client CA")


class TestRepeatLimiter:
    def test_burst_then_suppressed(self) -> None:
        clock, reports = Clock(), Reports()
        limiter = RepeatLimiter(clock, reports, burst=3, window=60)

        allowed = [limiter.allow("a") for _ in range(5)]

        assert allowed == [True, True, True, False, False]
        assert reports.calls == []

    def test_report_at_window_end(self) -> None:
        clock, reports = Clock(), Reports()
        limiter = RepeatLimiter(clock, reports, burst=1, window=60)
        for _ in range(4):
            limiter.allow("a")

        clock.advance(59)
        assert reports.calls == []
        clock.advance(1)

        assert reports.calls == [("a", 3)]
        assert limiter.allow("a")

    def test_keys_independent(self) -> None:
        limiter = RepeatLimiter(Clock(), Reports(), burst=1, window=60)

        assert limiter.allow("a")
        assert not limiter.allow("a")
        assert limiter.allow("b")

    def test_new_window_allows_again(self) -> None:
        clock = Clock()
        limiter = RepeatLimiter(clock, Reports(), burst=1, window=10)
        limiter.allow("a")

        clock.advance(10)

        assert limiter.allow("a")

    def test_too_many_keys_share_budget(self) -> None:
        """Beyond max_keys, new keys fall into one shared window."""
        clock, reports = Clock(), Reports()
        limiter = RepeatLimiter(clock, reports, burst=1, window=60, max_keys=2)

        allowed = [limiter.allow(key) for key in ("a", "b", "c", "d")]
        clock.advance(60)

        assert allowed == [True, True, True, False]
        assert reports.calls == [("other addresses", 1)]

    def test_flush(self) -> None:
        clock, reports = Clock(), Reports()
        limiter = RepeatLimiter(clock, reports, burst=1, window=60)
        limiter.allow("a")
        limiter.allow("a")

        limiter.flush()

        assert reports.calls == [("a", 1)]
        assert clock.getDelayedCalls() == []


class TestHandshakeLog:
    def test_rejection_fields(self) -> None:
        log, events = logger()
        handshake_log = HandshakeLog(Clock(), log=log)

        handshake_log.rejected(peer(), EXPIRED)

        [event] = events
        assert event["log_level"].name == "warn"
        assert event["peer"] == "192.0.2.7:40000"
        assert event["reason"] == "expired"
        assert event["subject"] == "CN=alice"
        assert event["issuer"] == "CN=client CA"
        assert handshake_log.stats.rejections["expired"] == 1

    def test_rate_limit_per_address(self) -> None:
        """Repeats from one address are cut after the burst and summed up once."""
        clock = Clock()
        log, events = logger()
        handshake_log = HandshakeLog(clock, burst=2, window=60, log=log)

        for port in range(5):
            handshake_log.rejected(peer(port=port), EXPIRED)
        handshake_log.rejected(peer("192.0.2.8"), EXPIRED)
        clock.advance(60)

        peers = [event.get("peer") for event in events if "peer" in event]
        summaries = [event for event in events if "count" in event]
        assert peers == ["192.0.2.7:0", "192.0.2.7:1", "192.0.2.8:40000"]
        assert [(event["source"], event["count"]) for event in summaries] == [("192.0.2.7", 3)]
        assert handshake_log.stats.rejections["expired"] == 6

    def test_closed_by_peer_is_info(self) -> None:
        log, events = logger()
        handshake_log = HandshakeLog(Clock(), log=log)

        handshake_log.rejected(peer(), Rejection(Reason.CLOSED_BY_PEER, "closed"))

        assert events[0]["log_level"].name == "info"
        assert events[0]["certificate"] == "no certificate"

    def test_refused(self) -> None:
        log, events = logger()
        handshake_log = HandshakeLog(Clock(), log=log)

        handshake_log.refused(peer(), 10)

        assert events[0]["maximum"] == 10
        assert handshake_log.stats.refused == 1


def test_describe_address() -> None:
    ipv6: Any = IPv6Address("TCP", "::1", 8700)

    assert describe_address(peer()) == "192.0.2.7:40000"
    assert describe_address(ipv6) == "[::1]:8700"


def test_shared_budget_renews() -> None:
    """The shared window of untracked addresses ends like any other."""
    clock, reports = Clock(), Reports()
    limiter = RepeatLimiter(clock, reports, burst=1, window=60, max_keys=1)
    limiter.allow("a")
    limiter.allow("b")
    limiter.allow("c")

    clock.advance(30)
    limiter.allow("a")
    clock.advance(30)

    assert sorted(reports.calls) == [("a", 1), ("other addresses", 1)]
    assert limiter.allow("d")
