"""
A rolling restart seen from the clients: two daemons, async clients that
know both, and SIGTERM to one daemon while calls run. The stopped daemon
drains the calls in flight and rejects new ones unstarted; the clients send
those to the other daemon. No call may hang or run twice. Only a call that
is not idempotent and was on its way when the connection closed may fail,
with ``OutcomeUnknown``, and the daemon never ran it.
"""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from netrpc.certs import PKI
from netrpc.client import Backoff, Client, connect
from netrpc.exceptions import OutcomeUnknown
from tests.daemon_process import DaemonProcess
from tests.scaleout import start_daemon

pytestmark = pytest.mark.e2e

__all__ = ["start_daemon"]

FAST_BACKOFF = Backoff(initial=0.05, maximum=0.2, jitter=0.0)
# Seconds of load before the SIGTERM, and in all.
STOP_AFTER = 0.6
LOAD_SECONDS = 2.0
# Calls each client keeps in flight at all times.
CONCURRENCY = 8
CLIENTS = 4


def description(pki: PKI, port: int) -> str:
    return (
        f"mtls:host=127.0.0.1:port={port}:privateKey={pki.client_key('alice')}"
        f":certKey={pki.client_cert('alice')}:caCerts={pki.server_ca_cert}:serverName=127.0.0.1"
    )


async def keep_calling(client: Client, number: int, end: float, outcomes: list[Any]) -> None:
    """
    Call until ``end``, one call at a time. Every other call is idempotent,
    and half of them sleep on the server, so some are in flight at the
    SIGTERM. Each outcome (result or exception) goes to ``outcomes``.
    """
    count = 0
    while reactor.seconds() < end:
        token = f"c{number}-{count}"
        # Callers are out of step with each other, so both kinds of call
        # are in flight at any moment.
        step = count + number
        idempotent = step % 2 == 1
        try:
            if step % 4 < 2:
                result = await client.call("sleep", 0.2, idempotent=idempotent, timeout=5)
                outcomes.append(("sleep", token, result == 0.2))
            else:
                result = await client.call("echo", token, idempotent=idempotent, timeout=5)
                outcomes.append(("echo", token, result == token))
        except Exception as error:
            outcomes.append(("failed", token, error))
        count += 1


def is_idempotent(token: str) -> bool:
    """Return whether ``keep_calling`` made the call ``token`` idempotent."""
    number, count = (int(part) for part in token[1:].split("-"))
    return (number + count) % 2 == 1


def audited_tokens(daemons: list[DaemonProcess]) -> Counter[str]:
    """Count the echo calls that the daemons' audit lines show as run, by token."""
    counts: Counter[str] = Counter()
    for daemon in daemons:
        for line in daemon.output().splitlines():
            found = re.search(r'method=echo outcome=ok .*params=\["(?P<token>c\d+-\d+)"\]', line)
            if found:
                counts[found["token"]] += 1
    return counts


@pytest_twisted.ensureDeferred
async def test_stop_one_instance_under_load(pki: PKI, start_daemon: Any) -> None:
    """SIGTERM to one of two daemons under load: no idempotent call fails and no call runs twice."""
    daemons = [
        start_daemon(["--pki", str(pki.directory), "--instance", name, "--audit-log", "log",
                      "--audit-params", "--listen", "mtls:port=0:interface=127.0.0.1"])
        for name in ("blue", "green")
    ]
    ports = [daemon.wait_for_port() for daemon in daemons]
    servers = [description(pki, port) for port in ports]

    # Each client starts at its own server of the two: half on blue, half on green.
    clients = [
        await connect(reactor, servers, backoff=FAST_BACKOFF, random=lambda n=n: (n % 2) / 2)
        for n in range(CLIENTS)
    ]
    first_servers = {(await client.call("system.health"))["instance"] for client in clients}

    outcomes: list[Any] = []
    end = reactor.seconds() + LOAD_SECONDS
    load = defer.gatherResults([
        defer.ensureDeferred(keep_calling(client, n * CONCURRENCY + k, end, outcomes))
        for n, client in enumerate(clients)
        for k in range(CONCURRENCY)
    ])
    await deferLater(reactor, STOP_AFTER, lambda: None)
    daemons[0].process.send_signal(signal.SIGTERM)
    await load
    after = {(await client.call("system.health"))["instance"] for client in clients}
    for client in clients:
        await client.close()
    status = daemons[0].wait_for_exit()
    # The audit lines of green's last calls may still be on their way.
    time.sleep(0.2)

    failed = [outcome for outcome in outcomes if outcome[0] == "failed"]
    wrong = [outcome for outcome in outcomes if outcome[0] != "failed" and outcome[2] is not True]
    audited = audited_tokens(daemons)

    assert first_servers == {"blue", "green"}
    assert status == 0
    assert wrong == []
    assert len(outcomes) > CLIENTS * CONCURRENCY * 2
    assert after == {"green"}
    # A call may fail only if it was not idempotent and the connection
    # closed while it was on its way. The daemon then never ran it.
    for _, token, error in failed:
        assert not is_idempotent(token), f"idempotent call {token} failed: {error!r}"
        assert isinstance(error, OutcomeUnknown), f"call {token} failed: {error!r}"
        assert audited[token] == 0, f"call {token} failed but ran {audited[token]} times"
    # Each plain echo that succeeded ran exactly once, over both daemons.
    for kind, token, _ in outcomes:
        if kind == "echo" and not is_idempotent(token):
            assert audited[token] == 1, f"call {token} ran {audited[token]} times"
