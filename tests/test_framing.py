"""Tests for netrpc.framing: netstring encoding and decoding without I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netrpc.exceptions import RemoteProtocolError
from netrpc.framing import FramingError, NetstringDecoder, encode


def test_encode_frames_payload() -> None:
    assert encode(b"hello") == b"5:hello,"
    assert encode(b"") == b"0:,"


def test_decoder_returns_whole_frames() -> None:
    decoder = NetstringDecoder(100)
    assert decoder.feed(b"5:hello,0:,3:abc,") == [b"hello", b"", b"abc"]


def test_decoder_joins_split_frames() -> None:
    decoder = NetstringDecoder(100)
    stream = encode(b"first") + encode(b"second")
    received = []
    for byte in stream:
        received += decoder.feed(bytes([byte]))
    assert received == [b"first", b"second"]


def test_decoder_in_frame() -> None:
    decoder = NetstringDecoder(100)
    assert not decoder.in_frame
    decoder.feed(b"5:he")
    assert decoder.in_frame
    decoder.feed(b"llo,")
    assert not decoder.in_frame


@pytest.mark.parametrize(
    ("data", "reason", "boundary_known"),
    [
        (b"05:hello,", "leading zero", False),
        (b"00:", "leading zero", False),
        (b"x:hello,", "does not start with a digit", False),
        (b"-1:", "does not start with a digit", False),
        (b"5;hello,", "instead of a colon", False),
        (b"5:hello!", "not followed by a comma", True),
        (b"101:", "above the maximum of 100 bytes", True),
        (b"99999999999999999999", "above the maximum of 100 bytes", True),
    ],
)
def test_decoder_rejects_bad_frame(data: bytes, reason: str, boundary_known: bool) -> None:
    decoder = NetstringDecoder(100)
    with pytest.raises(FramingError, match=reason) as caught:
        decoder.feed(data)
    assert caught.value.boundary_known is boundary_known
    assert isinstance(caught.value, RemoteProtocolError)


def test_decoder_rejects_long_length_before_payload() -> None:
    """A declared length above the maximum fails on its digits alone."""
    decoder = NetstringDecoder(1000)
    with pytest.raises(FramingError, match="above the maximum"):
        decoder.feed(b"2000")


def test_decoder_keeps_frames_before_error() -> None:
    decoder = NetstringDecoder(100)
    with pytest.raises(FramingError) as caught:
        decoder.feed(b"2:ok,3:one,x")
    assert caught.value.frames == [b"ok", b"one"]


def test_decoder_stays_failed() -> None:
    decoder = NetstringDecoder(100)
    with pytest.raises(FramingError):
        decoder.feed(b"x")
    with pytest.raises(FramingError, match="does not start with a digit") as caught:
        decoder.feed(b"2:ok,")
    assert caught.value.frames == []


def test_decoder_accepts_maximum_length() -> None:
    decoder = NetstringDecoder(5)
    assert decoder.feed(b"5:hello,") == [b"hello"]


def test_decoder_rejects_nonpositive_maximum() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        NetstringDecoder(0)


@given(st.lists(st.binary(max_size=50), max_size=10), st.integers(1, 7))
def test_decoder_roundtrip(payloads: list[bytes], chunk_size: int) -> None:
    """Any payloads, encoded and fed in any chunk size, come back unchanged."""
    stream = b"".join(encode(payload) for payload in payloads)
    decoder = NetstringDecoder(50)
    received: list[bytes] = []
    for start in range(0, len(stream), chunk_size):
        received += decoder.feed(stream[start : start + chunk_size])
    assert received == payloads
    assert not decoder.in_frame


@given(st.binary(max_size=200))
def test_decoder_any_bytes(data: bytes) -> None:
    """Any bytes yield frames no longer than the maximum, or a FramingError."""
    decoder = NetstringDecoder(20)
    try:
        frames = decoder.feed(data)
    except FramingError as error:
        frames = error.frames
        assert error.reason
    assert all(len(frame) <= 20 for frame in frames)


def test_decoder_releases_finished_frame() -> None:
    """Once a frame is complete, none of its bytes stay buffered."""
    decoder = NetstringDecoder(1000)
    decoder.feed(b"900:" + b"x" * 500)
    assert decoder.buffered == 500
    assert decoder.feed(b"x" * 400 + b",") == [b"x" * 900]
    assert decoder.buffered == 0


@st.composite
def streams(draw: st.DrawFn) -> list[bytes]:
    """A stream of valid frames up to 100 bytes, maybe followed by garbage, cut into chunks."""
    payloads = draw(st.lists(st.binary(max_size=100), max_size=8))
    stream = b"".join(encode(payload) for payload in payloads) + draw(st.binary(max_size=20))
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    return [stream[start:end] for start, end in zip([0, *cuts], [*cuts, len(stream)])]


@given(streams())
def test_decoder_buffer_bound(chunks: list[bytes]) -> None:
    """Between feeds the decoder holds at most one maximum-size payload and its comma."""
    decoder = NetstringDecoder(100)
    for chunk in chunks:
        try:
            frames = decoder.feed(chunk)
        except FramingError as error:
            frames = error.frames
            assert all(len(frame) <= 100 for frame in frames)
            return
        assert all(len(frame) <= 100 for frame in frames)
        assert decoder.buffered <= 100 + len(b",")


def _decode_all(chunks: list[bytes]) -> tuple[list[bytes], bool | None]:
    """Return the frames of ``chunks`` and, after an error, whether its boundary was known."""
    decoder = NetstringDecoder(100)
    frames: list[bytes] = []
    for chunk in chunks:
        try:
            frames += decoder.feed(chunk)
        except FramingError as error:
            return frames + error.frames, error.boundary_known
    return frames, None


@given(st.lists(st.binary(max_size=120), max_size=6), st.binary(max_size=30))
def test_decoder_same_at_once_and_bytewise(payloads: list[bytes], tail: bytes) -> None:
    """A stream fed at once decodes as it does fed a byte at a time, errors included."""
    stream = b"".join(encode(payload) for payload in payloads) + tail
    assert _decode_all([stream]) == _decode_all([bytes([byte]) for byte in stream])
