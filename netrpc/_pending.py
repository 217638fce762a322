"""
The client's table of outstanding requests: those waiting to be sent and
those sent and waiting for their reply, matched by JSON-RPC id.

It does no I/O and uses no clock. The client decides when to send, when a
deadline passes and when a connection is lost, and updates the table.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall


class OutstandingRequest:
    """
    One message to send: a call, a notification or a batch of calls.

    ``ids`` are the JSON-RPC ids it carries, none for a notification and one
    per call in a batch. ``frame`` is the complete netstring to write, and
    ``label`` names the message in errors.
    """

    __slots__ = (
        "ids",
        "frame",
        "label",
        "deferred",
        "timer",
        "idempotent",
        "retried",
        "wait_for_connection",
        "sent",
        "finished",
    )

    def __init__(
        self,
        ids: tuple[int, ...],
        frame: bytes,
        label: str,
        *,
        idempotent: bool = False,
        wait_for_connection: bool = True,
    ) -> None:
        self.ids = ids
        self.frame = frame
        self.label = label
        self.idempotent = idempotent
        self.wait_for_connection = wait_for_connection
        self.deferred: Deferred[Any] | None = None
        self.timer: IDelayedCall | None = None
        # True from the moment the request is written to a connection.
        self.sent = False
        # Set once the request left the table for good (a reply, a deadline,
        # a cancel or a connection loss); the waiting queue skips such entries.
        self.finished = False
        self.retried = False

    @property
    def slots(self) -> int:
        """The number of in-flight places this request takes once sent."""
        return len(self.ids)


class PendingRequests:
    """
    The requests of one client that have no outcome yet.

    A request is first *waiting* (no connection, or no free in-flight
    place), then *in flight* once written to a connection, then leaves the
    table with its outcome. At most ``max_in_flight`` calls are in flight at
    once; each call of a batch counts as one.
    """

    def __init__(self, max_in_flight: int) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight {max_in_flight!r} must be at least 1")
        self.max_in_flight = max_in_flight
        self._waiting: deque[OutstandingRequest] = deque()
        # Keyed by the integer ids this client sends, but looked up by
        # whatever id a reply carries.
        self._in_flight: dict[object, OutstandingRequest] = {}
        self._slots_used = 0
        self._next_id = 1

    def new_ids(self, count: int) -> tuple[int, ...]:
        """Allocate ``count`` fresh request ids, never reused by this table."""
        first = self._next_id
        self._next_id += count
        return tuple(range(first, first + count))

    def was_issued(self, request_id: object) -> bool:
        """Tell whether ``request_id`` is an id this table allocated."""
        return type(request_id) is int and 0 < request_id < self._next_id

    @property
    def in_flight_count(self) -> int:
        """The number of calls sent and waiting for their reply."""
        return self._slots_used

    def has_room_for(self, request: OutstandingRequest) -> bool:
        """Tell whether ``request`` could be sent now without passing the limit."""
        return self._slots_used + request.slots <= self.max_in_flight and not self.has_waiting()

    def has_waiting(self) -> bool:
        """Tell whether any unfinished request is waiting to be sent."""
        while self._waiting and self._waiting[0].finished:
            self._waiting.popleft()
        return bool(self._waiting)

    def wait(self, request: OutstandingRequest, *, first: bool = False) -> None:
        """Queue ``request`` to be sent later; ``first`` puts it ahead of the others."""
        if first:
            self._waiting.appendleft(request)
        else:
            self._waiting.append(request)

    def take_sendable(self) -> Iterator[OutstandingRequest]:
        """
        Yield waiting requests, oldest first, while the in-flight limit allows.

        The caller must either send each request it receives and call
        ``sent()`` for it, or finish it.
        """
        while self.has_waiting():
            request = self._waiting[0]
            if self._slots_used + request.slots > self.max_in_flight:
                return
            self._waiting.popleft()
            yield request

    def sent(self, request: OutstandingRequest) -> None:
        """Record that ``request`` was written to the connection."""
        request.sent = True
        for request_id in request.ids:
            self._in_flight[request_id] = request
        self._slots_used += len(request.ids)

    def pop_reply_target(self, request_id: object) -> OutstandingRequest | None:
        """
        Remove and return the in-flight request that ``request_id`` belongs to.

        Return None for an id that is not in flight, such as the id of a
        call whose deadline passed. A batch leaves the table as a whole.
        """
        try:
            request = self._in_flight.pop(request_id, None)
        except TypeError:
            # An unhashable id, such as a list, matches no call.
            return None
        if request is None:
            return None
        if len(request.ids) > 1:
            self._forget(request)
        else:
            self._slots_used -= 1
            request.finished = True
        return request

    def discard(self, request: OutstandingRequest) -> None:
        """Remove ``request`` wherever it is, because it ended without a reply."""
        request.finished = True
        if request.ids and self._in_flight.get(request.ids[0]) is request:
            del self._in_flight[request.ids[0]]
            self._forget(request)

    def take_in_flight(self) -> list[OutstandingRequest]:
        """Remove and return every in-flight request, oldest first, when the connection is lost."""
        requests = list(dict.fromkeys(self._in_flight.values()))
        self._in_flight.clear()
        self._slots_used = 0
        return requests

    def take_waiting(self) -> list[OutstandingRequest]:
        """Remove and return every unfinished waiting request."""
        requests = [request for request in self._waiting if not request.finished]
        self._waiting.clear()
        return requests

    def _forget(self, request: OutstandingRequest) -> None:
        # Remove the other ids of a batch and give back its places.
        for other_id in request.ids:
            self._in_flight.pop(other_id, None)
        self._slots_used -= request.slots
        request.finished = True
