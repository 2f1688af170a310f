"""Reading the DATA section of an SMTP transaction in blocks instead of lines.

aiosmtpd reads a message one ``readuntil(b"\\r\\n")`` per line, a coroutine
round trip for every 78 bytes: for 10 KB messages that was the largest single
cost of the SMTP edge. :func:`read_data` reads whatever the connection has
buffered, finds the end of data (``CRLF . CRLF``) with one search per block,
and undoes the dot-stuffing (RFC 5321 4.5.2) with one replace.

:class:`BlockDataSMTP` is aiosmtpd's ``SMTP`` with its DATA command read
that way. Its answers are aiosmtpd's, byte for byte and in the same order of
precedence (``tests/smtp/test_data.py`` runs both side by side): a line
longer than ``line_limit`` is ``500``, more than ``size_limit`` bytes of data
is ``552``, either reported only after the terminating dot has been read,
with the data discarded as it arrives.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools

from aiosmtpd.smtp import SMTP

from smtp import status

LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
TOO_MUCH_DATA = "552 Error: Too much mail data"

_END = b"\r\n.\r\n"
_CRLF = b"\r\n"
# More than the stream reader ever buffers (it pauses the socket at twice its
# line limit, plus one delivery of at most 256 KiB, or about twice that through
# TLS): each read empties it, so
# what the client sent after the dot can be put back in front. Should a read
# ever fill this, read_data raises OutOfStep instead of reordering commands.
READ_SIZE = 1 << 20
# Bytes of lines checked at a time (see _check_lines).
_WINDOW = 8 * 1024


class OutOfStep(Exception):
    """The client sent so much after the end of data that the stream cannot be kept in order."""


async def read_data(
    reader: asyncio.StreamReader, *, size_limit: int | None, line_limit: int
) -> bytes | str:
    """The message content after ``354``, unstuffed; or the error reply for a refused one.

    Returns once the terminating ``.`` line has been read. Bytes the client
    sent after it (the next command) are put back for the command loop; see
    :class:`OutOfStep` for when that cannot be done.
    ``line_limit`` counts the line's CRLF, as aiosmtpd's ``line_length_limit``
    does; ``size_limit`` (None or 0: no limit) counts the data as sent,
    before unstuffing.
    """
    # buf starts with the CRLF that ended the DATA command, so that a message
    # made of the terminator alone is found by the same search as any other.
    buf = bytearray(_CRLF)
    line_start = 2  # where the line being read begins
    problem: str | None = None
    while True:
        chunk = await reader.read(READ_SIZE)
        if not chunk:
            raise ConnectionResetError("connection closed during DATA")
        search_from = max(0, len(buf) - len(_END) + 1)
        buf += chunk
        end = buf.find(_END, search_from)
        if problem is None:
            body_end = end + 2 if end >= 0 else len(buf)
            problem, line_start = _check_lines(buf, line_start, body_end, size_limit, line_limit)
        if end >= 0:
            break
        if problem is not None:
            # Refused: keep only what could begin the terminator.
            del buf[: -(len(_END) - 1)]
            line_start = 0
    leftover = bytes(buf[end + len(_END) :])
    if leftover:
        if len(chunk) >= READ_SIZE:
            # The reader may hold more still: what followed the dot cannot be put back
            # in order. Only a client sending far ahead of its replies gets here.
            raise OutOfStep("more than a read's worth sent after the end of data")
        if not reader.at_eof():
            reader.feed_data(leftover)
    if problem is not None:
        return problem
    content = bytes(memoryview(buf)[2 : end + 2])
    del buf
    if content.startswith(b"."):
        content = content[1:]
    return content.replace(b"\r\n.", _CRLF)


def _check_lines(
    buf: bytearray, start: int, stop: int, size_limit: int | None, line_limit: int
) -> tuple[str | None, int]:
    """Check the complete lines in ``buf[start:stop]``; the first problem, and the next line's start.

    The order is aiosmtpd's: its stream reader gives up on a line longer
    than ``line_limit`` before counting it (500 wins), the size is checked as
    each line is counted (552), and only then is a counted line's own length
    checked (500). The lines are checked a window at a time, so that a block
    of empty lines never becomes more than a window's worth of line objects.
    """
    window = max(_WINDOW, line_limit + 2)
    while stop - start > window:
        cut = buf.rfind(_CRLF, start, start + window)
        if cut < 0:
            # No line ends within the window: the one under way is past the reader's limit.
            return LINE_TOO_LONG, start
        problem, start = _check_window(buf, start, cut + 2, size_limit, line_limit)
        if problem is not None:
            return problem, start
    return _check_window(buf, start, stop, size_limit, line_limit)


def _check_window(
    buf: bytearray, start: int, stop: int, size_limit: int | None, line_limit: int
) -> tuple[str | None, int]:
    """:func:`_check_lines` for one window, each step a pass in C (split, running sums, bisection)."""
    lines = buf[start:stop].split(_CRLF)
    unfinished = lines.pop()
    lengths = list(map(len, lines))
    # The first line too long by its own length, if any: a bisection on the running maximum.
    first_long = bisect.bisect_right(list(itertools.accumulate(lengths, max)), line_limit - 2)
    # The first line that takes the data past size_limit (buf starts with 2 extra bytes).
    first_over = len(lengths)
    if size_limit and stop - 2 > size_limit:
        ends = itertools.accumulate(map((2).__add__, lengths), initial=start - 2)
        first_over = bisect.bisect_right(list(ends), size_limit) - 1
    if first_long < len(lengths) and (
        first_long < first_over or (first_long == first_over and lengths[first_long] > line_limit)
    ):
        return LINE_TOO_LONG, start
    if first_over < len(lengths):
        return TOO_MUCH_DATA, start
    if len(unfinished) > line_limit + 1:
        # An unfinished line already past the reader's limit.
        return LINE_TOO_LONG, start
    return None, stop - len(unfinished)


class BlockDataSMTP(SMTP):
    """aiosmtpd's SMTP whose DATA command reads the message with :func:`read_data`."""

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert envelope is not None and self.session is not None
        if not envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            content = await read_data(
                self._reader, size_limit=self.data_size_limit, line_limit=self.line_length_limit
            )
        except asyncio.CancelledError:
            # The connection went away during DATA (aiosmtpd does the same).
            self._writer.close()
            raise
        except OutOfStep:
            # Nothing was stored; a 4xx keeps the message with the client.
            self.envelope = self._create_envelope()
            await self.push(status.OUT_OF_STEP)
            self._writer.close()
            return
        self.envelope = self._create_envelope()  # as aiosmtpd leaves DATA
        if isinstance(content, str):
            await self.push(content)
            return
        envelope.content = envelope.original_content = content
        reply = await self.event_handler.handle_DATA(self, self.session, envelope)
        await self.push(reply)
