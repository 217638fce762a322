"""
Netstring framing without I/O.

A netstring is ``<length>:<payload>,`` where the length is a decimal number
without leading zeros (D. J. Bernstein, http://cr.yp.to/proto/netstrings.txt).
``NetstringDecoder`` takes bytes as they arrive and returns whole payloads;
``encode`` frames one payload. The server protocol, the async client and the
blocking client all use these two, so they agree on every edge case.

The parsing itself is Twisted's ``NetstringReceiver``. It is fed bytes
directly, without a transport, and its "drop the connection" reaction to bad
input is turned into a ``FramingError`` that names the reason. Frames that
arrive whole and valid are split off before it, which is several times
faster per frame; anything else goes to the receiver as before.
"""

from __future__ import annotations

import re
from io import BytesIO

from twisted.protocols.basic import NetstringReceiver

from netrpc.exceptions import RemoteProtocolError

__all__ = ["FramingError", "NetstringDecoder", "encode"]

# The part of a frame that may precede the payload: digits, then a colon.
_LENGTH_PREFIX = re.compile(rb"(\d*)(.?)", re.DOTALL)

# How many bytes of a bad length prefix an error message shows.
_SHOWN_PREFIX_BYTES = 24

_ZERO = ord("0")
_COMMA = ord(",")


class FramingError(RemoteProtocolError):
    """
    The peer sent bytes that are not a valid netstring.

    ``reason`` is a short plain phrase for logs. ``boundary_known`` is true
    when the length prefix was a valid number, so the bad frame is separate
    from the valid frames before it and a reply about it makes sense. It is
    false when the stream is garbage from the length prefix on.
    """

    def __init__(
        self, reason: str, *, boundary_known: bool, frames: list[bytes] | None = None
    ) -> None:
        super().__init__(f"invalid netstring: {reason}")
        self.reason = reason
        self.boundary_known = boundary_known
        # Payloads that were complete before the bad frame in the same feed.
        self.frames: list[bytes] = frames or []


def encode(payload: bytes) -> bytes:
    """Frame ``payload`` as one netstring."""
    return b"%d:%s," % (len(payload), payload)


class _Receiver(NetstringReceiver):
    """
    A ``NetstringReceiver`` that collects payloads in a list and records a
    parse error instead of closing a transport (it has none).
    """

    def __init__(self, max_length: int) -> None:
        self.MAX_LENGTH = max_length
        self.frames: list[bytes] = []
        self.failed = False
        # makeConnection sets up the parser state; None stands for the
        # transport because nothing here ever writes.
        self.makeConnection(None)

    def stringReceived(self, string: bytes) -> None:
        self.frames.append(string)
        # NetstringReceiver keeps the payload buffer until the next frame
        # starts, which would pin up to max_length bytes on an idle peer.
        self._payload = BytesIO()

    def _handleParseError(self) -> None:
        # NetstringReceiver calls this on bad input and would close the
        # transport; the decoder raises instead.
        self.failed = True

    def describe_error(self) -> FramingError:
        """Name what broke, from the parser state at the moment it failed."""
        if self._state == self._PARSING_PAYLOAD:
            return FramingError(
                f"frame of {self._expectedPayloadSize - 1} bytes is not "
                f"followed by a comma",
                boundary_known=True,
            )
        return _describe_length_error(self._remainingData, self.MAX_LENGTH)


def _describe_length_error(data: bytes, max_length: int) -> FramingError:
    """Explain why ``data``, at the start of a frame, is not a valid length prefix."""
    digits, after = _LENGTH_PREFIX.match(data).groups()  # type: ignore[union-attr]
    shown = data[:_SHOWN_PREFIX_BYTES]

    if not digits:
        return FramingError(
            f"length prefix {shown!r} does not start with a digit",
            boundary_known=False,
        )
    if len(digits) > 1 and digits.startswith(b"0"):
        return FramingError(
            f"length prefix {shown!r} has a leading zero", boundary_known=False
        )
    if len(digits) > len(str(max_length)) or int(digits) > max_length:
        return FramingError(
            f"declared length {digits[:_SHOWN_PREFIX_BYTES].decode()} is above "
            f"the maximum of {max_length} bytes",
            boundary_known=True,
        )
    return FramingError(
        f"length {digits.decode()} is followed by {after!r} instead of a colon",
        boundary_known=False,
    )


def _whole_frames(data: bytes, max_length: int, max_digits: int) -> tuple[list[bytes], int]:
    """
    Split the complete, valid frames off the start of ``data``.

    Return their payloads and the number of bytes they took. Scanning stops
    at the first frame that is incomplete or invalid, and the receiver
    then buffers that frame or names its error as it would have anyway. This
    path exists for speed: the receiver's state machine costs several
    microseconds per frame, and a feed usually contains whole frames only.
    """
    frames = []
    start = 0
    while start < len(data):
        colon = data.find(b":", start, start + max_digits + 1)
        if colon <= start:
            break
        digits = data[start:colon]
        if not digits.isdigit() or (digits[0] == _ZERO and len(digits) > 1):
            break
        length = int(digits)
        comma = colon + 1 + length
        if length > max_length or comma >= len(data) or data[comma] != _COMMA:
            break
        frames.append(data[colon + 1 : comma])
        start = comma + 1
    return frames, start


class NetstringDecoder:
    """
    Split a byte stream into netstring payloads.

    ``max_length`` bounds each payload in bytes. A declared length above it
    is rejected as soon as its digits arrive, before any payload is
    buffered, so the decoder buffers at most ``max_length`` bytes of
    payload plus the unparsed bytes of the last ``feed``.

    After a ``FramingError`` the stream cannot be resynchronised: every
    later ``feed`` raises an error with the same reason.
    """

    def __init__(self, max_length: int) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length!r}")
        self.max_length = max_length
        self._max_digits = len(str(max_length))
        self._receiver = _Receiver(max_length)
        self._error: FramingError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """
        Add received bytes and return the payloads they complete, in order.

        Raises ``FramingError`` when the bytes break the framing. Its
        ``frames`` contains the payloads completed before the bad frame in
        this call, so the caller can still reply to them.
        """
        if self._error is not None:
            raise FramingError(
                self._error.reason, boundary_known=self._error.boundary_known
            )

        frames: list[bytes] = []
        if not self.in_frame:
            frames, used = _whole_frames(data, self.max_length, self._max_digits)
            data = data[used:]
        if not data:
            return frames

        receiver = self._receiver
        receiver.dataReceived(data)
        frames += receiver.frames
        receiver.frames = []

        if receiver.failed:
            self._error = receiver.describe_error()
            self._error.frames = frames
            raise self._error
        return frames

    @property
    def buffered(self) -> int:
        """
        The number of bytes held for the frame in progress: its payload so
        far, or the digits of its length. Between feeds it is at most
        ``max_length + 1``, a whole payload and its comma.
        """
        receiver = self._receiver
        return len(receiver._remainingData) + receiver._payload.tell()

    @property
    def in_frame(self) -> bool:
        """Whether part of a frame has arrived and the rest has not."""
        receiver = self._receiver
        return bool(receiver._remainingData) or (
            receiver._state == receiver._PARSING_PAYLOAD
        )
