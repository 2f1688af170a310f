"""smtp.data.read_data answers as aiosmtpd's own DATA loop does, however the bytes arrive.

* Side by side with aiosmtpd over loopback sockets: the same bytes, written in
  hypothesis-chosen pieces, give the same replies and the same content.
* On a bare ``StreamReader``, fed one piece per read: the answer does not depend
  on the split, what follows the terminator is left for the next command, a
  refused message is not kept in memory, and a closed connection is an error.
* Literal cases at the edges of the limits, each checked both ways: against
  read_data's expected answer and against aiosmtpd's.
"""

from __future__ import annotations

import asyncio
import itertools
import tracemalloc
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from smtp.data import (
    LINE_TOO_LONG,
    READ_SIZE,
    TOO_MUCH_DATA,
    BlockDataSMTP,
    OutOfStep,
    read_data,
)

# Small enough that long lines and oversize data are common; the line limit
# still lets "MAIL FROM:<a@b.example>" through aiosmtpd's command reader,
# which shares the limit.
LINE_LIMIT = 32
SIZE_LIMIT = 40
# Per example: above the line limit (either error can come first), below it (a line
# within the reader's limit may be too much data before it is too long), or none.
SIZE_LIMITS = st.sampled_from([SIZE_LIMIT, 16, None])
END = b"\r\n.\r\n"

PIECES = [b"a", b".", b"..", b"\r\n", b"\r\n", b"\r", b"\n", b"x" * 15, b"line of 16 bytes\r\n"]
# Over the line limit by far, and lines of exactly LINE_LIMIT - 3 .. LINE_LIMIT + 1 bytes.
LONG_PIECES = [b"x" * (LINE_LIMIT + 8), *(b"y" * n for n in range(LINE_LIMIT - 3, LINE_LIMIT + 2))]
# Mostly short pieces: long ones are rarer, so that the size limit has its turn.
RUNS = st.lists(st.sampled_from(PIECES * 4 + LONG_PIECES), min_size=1, max_size=4).map(b"".join)
BODY_BYTES = st.lists(RUNS, max_size=8).map(b"".join)


def terminated(body: bytes) -> bytes:
    """The body as sent after ``354``: with the terminating dot line (just ``.\\r\\n`` if empty)."""
    return body + (b".\r\n" if not body or body.endswith(b"\r\n") else END)


def ends_only_at_terminator(body: bytes) -> bool:
    message = terminated(body)
    # The CRLF of the DATA command counts: a message may not start with ".\r\n".
    return (b"\r\n" + message).find(END) == len(message) - 3


MESSAGES = BODY_BYTES.filter(ends_only_at_terminator).map(terminated)


# Where to cut the bytes sent (modulo their length, so that explicit examples can give them).
CUTS = st.lists(st.integers(0, 1000), max_size=10)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` cut at ``points`` into non-empty pieces."""
    edges = [0, *sorted({p % (len(data) + 1) for p in points}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


# ---------------------------------------------------------------- side by side with aiosmtpd


class Recorder:
    def __init__(self) -> None:
        self.contents: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.original_content, bytes)
        self.contents.append(envelope.original_content)
        return "250 OK"


class PlainSMTP(SMTP):
    """aiosmtpd's DATA loop, untouched."""

    line_length_limit = LINE_LIMIT


class BlockSMTP(BlockDataSMTP):
    """The DATA command smtp.server.EscrowSMTP inherits, with the same small limits."""

    line_length_limit = LINE_LIMIT


@asynccontextmanager
async def serving(
    protocol: type[SMTP], handler: Recorder, size_limit: int | None
) -> AsyncIterator[int]:
    """``protocol`` listening on a free loopback port; yields the port."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: protocol(
            handler, data_size_limit=size_limit, decode_data=False, hostname="test", loop=loop
        ),
        "127.0.0.1",
        0,
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    """The last line of a (multi-line) reply."""
    while True:
        line = await reader.readuntil(b"\r\n")
        if line[3:4] != b"-":
            return line


async def converse(port: int, pieces: Iterable[bytes]) -> bytes:
    """A transaction up to ``354``, then ``pieces`` one write each; everything answered after."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert (await read_reply(reader)).startswith(b"220 ")
        for command in (
            b"EHLO client.example",
            b"MAIL FROM:<a@b.example>",
            b"RCPT TO:<c@d.example>",
        ):
            writer.write(command + b"\r\n")
            assert (await read_reply(reader)).startswith(b"250 "), command
        writer.write(b"DATA\r\n")
        assert (await read_reply(reader)).startswith(b"354 ")
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
        return await reader.read()  # until the server closes the connection after QUIT
    finally:
        writer.close()
        await writer.wait_closed()


async def run_both(pieces: list[bytes], size_limit: int | None) -> tuple[bytes, list[bytes]]:
    """What aiosmtpd answers to ``pieces`` after ``354``, and the content it keeps; checked
    to be exactly what the read_data server answers and keeps."""
    plain, block = Recorder(), Recorder()
    async with (
        asyncio.timeout(20),
        serving(PlainSMTP, plain, size_limit) as plain_port,
        serving(BlockSMTP, block, size_limit) as block_port,
    ):
        expected, got = await asyncio.gather(
            converse(plain_port, pieces), converse(block_port, pieces)
        )
    assert got == expected
    assert block.contents == plain.contents
    return expected, plain.contents


@settings(max_examples=150, deadline=None)
@given(message=MESSAGES, size_limit=SIZE_LIMITS, cuts=CUTS)
@example(message=b".\r\n", size_limit=SIZE_LIMIT, cuts=[])  # the empty message
@example(message=b"..leading\r\n.\r\n", size_limit=SIZE_LIMIT, cuts=[1, 2, 11, 12])
async def test_replies_and_content_are_aiosmtpds(
    message: bytes, size_limit: int | None, cuts: list[int]
) -> None:
    replies, contents = await run_both(cut(message + b"NOOP\r\nQUIT\r\n", cuts), size_limit)
    # One reply to the message, then NOOP and QUIT: the stream stayed in step.
    reply = replies.split(b"\r\n")[0]
    assert replies.split(b"\r\n") == [reply, b"250 OK", b"221 Bye", b""]
    assert reply in {b"250 OK", LINE_TOO_LONG.encode(), TOO_MUCH_DATA.encode()}
    assert len(contents) == (reply == b"250 OK")
    event(reply.decode()[:3])


# ---------------------------------------------------------------- read_data on a bare reader


class PieceReader(asyncio.StreamReader):
    """A stream reader that receives the next piece, and then end of file, as each read asks."""

    def __init__(self, pieces: Iterable[bytes], *, limit: int = LINE_LIMIT) -> None:
        super().__init__(limit=limit)
        self._pending: Iterator[bytes] = iter(pieces)

    async def read(self, n: int = -1) -> bytes:
        if not self.at_eof():
            piece = next(self._pending, None)
            if piece is None:
                self.feed_eof()
            else:
                assert piece, "an empty piece would never wake the reader"
                self.feed_data(piece)
        return await super().read(n)


async def read_whole(
    stream: bytes, *, size_limit: int | None = SIZE_LIMIT, line_limit: int = LINE_LIMIT
) -> tuple[bytes | str, bytes]:
    """read_data on ``stream`` buffered at once; its answer, and what it left unread."""
    reader = asyncio.StreamReader(limit=line_limit)
    reader.feed_data(stream)
    result = await read_data(reader, size_limit=size_limit, line_limit=line_limit)
    reader.feed_eof()
    return result, await reader.read()


TAILS = st.lists(st.sampled_from([*PIECES, b".\r\n", b"QUIT\r\n"]), max_size=6).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(message=MESSAGES, tail=TAILS, size_limit=SIZE_LIMITS, cuts=CUTS)
async def test_the_split_does_not_matter(
    message: bytes, tail: bytes, size_limit: int | None, cuts: list[int]
) -> None:
    stream = message + tail
    reader = PieceReader(cut(stream, cuts))
    result = await read_data(reader, size_limit=size_limit, line_limit=LINE_LIMIT)
    # What follows the terminator, then whatever pieces were never asked for.
    assert await reader.read() == tail
    assert (result, tail) == await read_whole(stream, size_limit=size_limit)
    event(result[:3] if isinstance(result, str) else "content")


@settings(max_examples=200, deadline=None)
@given(body=BODY_BYTES, cuts=CUTS)
async def test_a_connection_closed_during_data_is_an_error(body: bytes, cuts: list[int]) -> None:
    # Cut before the last byte of the first terminator, if the body holds one.
    end = (b"\r\n" + body).find(END)
    unfinished = body if end < 0 else body[: end + 2]
    reader = PieceReader(cut(unfinished, cuts))
    with pytest.raises(ConnectionResetError):
        await read_data(reader, size_limit=SIZE_LIMIT, line_limit=LINE_LIMIT)


async def test_what_follows_the_terminator_is_left_for_the_next_command() -> None:
    reader = PieceReader([b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\nNO", b"OP\r\n"])
    assert (
        await read_data(reader, size_limit=None, line_limit=1001) == b"Subject: hi\r\n\r\nbody\r\n"
    )
    # What read_data put back (readuntil does not go through read(), so nothing more is fed).
    assert await reader.readuntil(b"\r\n") == b"QUIT\r\n"
    assert await reader.read() == b"NOOP\r\n"


MB = 1024 * 1024
BLOCK = 64 * 1024


def oversize(line: bytes, total: int) -> Iterator[bytes]:
    """``total`` bytes of repeated ``line`` in 64 KiB blocks, made as they are asked for."""
    block = line * (BLOCK // len(line))
    for _ in range(total // len(block)):
        yield block
    yield b"\r\n.\r\nQUIT\r\n"


@pytest.mark.parametrize(
    ("repeated", "reply"),
    [
        (b"x" * 998 + b"\r\n", TOO_MUCH_DATA),  # lines within the limit, too many of them
        (b"x" * 1000, LINE_TOO_LONG),  # one line, never ending
        (b"\r\n.\r", TOO_MUCH_DATA),  # almost a terminator, over and over
    ],
    ids=["many-lines", "one-long-line", "near-terminators"],
)
async def test_a_refused_message_is_not_kept(repeated: bytes, reply: str) -> None:
    reader = PieceReader(oversize(repeated, 32 * MB), limit=1001)
    tracemalloc.start()
    try:
        result = await read_data(reader, size_limit=4096, line_limit=1001)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result == reply
    # A handful of 64 KiB blocks in flight (the feeder's, the reader's, read_data's).
    assert peak < 8 * BLOCK, f"{peak} bytes held while discarding 32 MB"
    assert await reader.readuntil(b"\r\n") == b"QUIT\r\n"


# ---------------------------------------------------------------- literal cases


def line_of(n: int) -> bytes:
    """A line of ``n`` content bytes and its CRLF."""
    return b"z" * n + b"\r\n"


FULL = line_of(8) * 4  # exactly SIZE_LIMIT bytes of data
assert len(FULL) == SIZE_LIMIT


LITERALS: list[tuple[bytes, bytes | str]] = [
    (b".\r\n", b""),
    (b"\r\n.\r\n", b"\r\n"),
    (b"..leading\r\n.\r\n", b".leading\r\n"),
    (b"a\r\n..\r\n...b\r\n.c\r\n.\r\n", b"a\r\n.\r\n..b\r\nc\r\n"),
    (b"bare\rCR\nLF\n.\r\r\n.\r\n", b"bare\rCR\nLF\n.\r\r\n"),
    (b"a\r\n.\r\nb\r\n.\r\n", b"a\r\n"),
    (line_of(LINE_LIMIT - 2) + b".\r\n", line_of(LINE_LIMIT - 2)),
    # Dot-stuffing counts against the line limit: aiosmtpd checks the line as sent.
    (b"." + line_of(LINE_LIMIT - 3) + b".\r\n", line_of(LINE_LIMIT - 3)),
    (b"." + line_of(LINE_LIMIT - 2) + b".\r\n", LINE_TOO_LONG),
    (line_of(LINE_LIMIT - 1) + b".\r\n", LINE_TOO_LONG),
    (line_of(LINE_LIMIT) + b".\r\n", LINE_TOO_LONG),
    (line_of(LINE_LIMIT + 1) + b".\r\n", LINE_TOO_LONG),
    (line_of(LINE_LIMIT * 5) + b".\r\n", LINE_TOO_LONG),
    # The size limit counts every line with its CRLF, not the terminator.
    (FULL + b".\r\n", FULL),
    (FULL + b"\r\n.\r\n", TOO_MUCH_DATA),
    (FULL + line_of(0) + line_of(LINE_LIMIT + 1) + b".\r\n", TOO_MUCH_DATA),
    # Whichever comes first wins; a line over the reader's limit wins over the
    # size it would have added, a line just over line_limit does not.
    (line_of(LINE_LIMIT + 1) + FULL * 2 + b".\r\n", LINE_TOO_LONG),
    (FULL + line_of(LINE_LIMIT + 1) + b".\r\n", LINE_TOO_LONG),
    (FULL + line_of(LINE_LIMIT - 1) + b".\r\n", TOO_MUCH_DATA),
    (line_of(3) + line_of(LINE_LIMIT - 1) + b".\r\n", LINE_TOO_LONG),
]


@pytest.mark.parametrize(("sent", "expected"), LITERALS)
async def test_literal_cases(sent: bytes, expected: bytes | str) -> None:
    stream = sent + b"NOOP\r\n"
    rest = stream[(b"\r\n" + stream).find(END) + len(END) - 2 :]
    assert await read_whole(stream) == (expected, rest)
    # And one byte per read.
    reader = PieceReader([stream[i : i + 1] for i in range(len(stream))])
    assert await read_data(reader, size_limit=SIZE_LIMIT, line_limit=LINE_LIMIT) == expected
    assert await reader.read() == rest


@pytest.mark.parametrize(("sent", "expected"), LITERALS)
async def test_literal_cases_are_aiosmtpds(sent: bytes, expected: bytes | str) -> None:
    stream = sent + b"NOOP\r\nQUIT\r\n"
    for pieces in ([stream], [stream[i : i + 1] for i in range(len(stream))]):
        replies, contents = await run_both(pieces, SIZE_LIMIT)
        if isinstance(expected, str):
            assert (replies.split(b"\r\n")[0], contents) == (expected.encode(), [])
        else:
            assert (replies.split(b"\r\n")[0], contents) == (b"250 OK", [expected])


async def test_no_size_limit() -> None:
    body = line_of(LINE_LIMIT - 2) * 100
    for size_limit in (None, 0):
        assert await read_whole(body + b".\r\n", size_limit=size_limit) == (body, b"")


async def test_a_backlog_longer_than_one_read_is_refused_not_reordered() -> None:
    # A client that sends more than a read's worth past the dot without waiting for the
    # reply: its commands cannot be put back in order, so the message is refused (the
    # server answers 421 and closes) rather than the stream reordered.
    backlog = b"".join(b"NOOP %08d\r\n" % i for i in range(READ_SIZE // 15 + 1))
    reader = asyncio.StreamReader(limit=1001)
    reader.feed_data(b"hi\r\n.\r\n" + backlog)
    with pytest.raises(OutOfStep):
        await read_data(reader, size_limit=None, line_limit=1001)
