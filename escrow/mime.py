"""MIME in and out: sealed originals parsed into parts, client replies built as mail.

Promises:

* :func:`parse` never raises on malformed input: broken charsets decode
  with replacement characters, missing parts are simply absent. It picks
  the first plain-text and the first HTML body, images referenced by
  ``Content-ID`` (for an HTML body), and lists every other leaf part,
  and every attached message, as an attachment.
* Attachment names are made safe by :func:`safe_filename`: no directory
  part, no control or bidirectional-override characters, no characters
  that filesystems refuse, at most :data:`MAX_FILENAME_CHARS` characters.
* :func:`build_reply` writes a standard message (CRLF, RFC 5322) threaded
  under the original with ``In-Reply-To`` and ``References``.

This module holds content in memory only; it writes nothing anywhere.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email import policy
from email.errors import HeaderParseError
from email.header import Header, decode_header, make_header
from email.headerregistry import Address
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser, BytesParser
from email.utils import format_datetime

MAX_FILENAME_CHARS = 120
_MSGID = re.compile(r"<[^<>\s]{1,900}>")
_FORBIDDEN = re.compile(r'[\\/:*?"<>|]')
_MAX_REFERENCES = 20


@dataclass(frozen=True)
class Part:
    """One attachment or inline image. ``index`` is 1-based within its list."""

    index: int
    filename: str
    content_type: str
    data: bytes
    content_id: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class ParsedMessage:
    subject: str
    message_id: str | None
    references: tuple[str, ...]
    text: str | None
    html: str | None
    attachments: tuple[Part, ...] = ()
    inline: tuple[Part, ...] = ()
    inline_by_cid: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Upload:
    """A file the client attached to a reply."""

    filename: str
    content_type: str
    data: bytes


def safe_filename(name: str | None, fallback: str) -> str:
    """A file name that is safe to offer for download (see the module promises)."""
    text = unicodedata.normalize("NFC", name or "")
    text = text.replace("\\", "/").rsplit("/", 1)[-1]
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] not in ("C", "Z") or ch == " ")
    text = _FORBIDDEN.sub("_", text).strip().lstrip(".").strip()
    if len(text) > MAX_FILENAME_CHARS:
        stem, dot, ext = text.rpartition(".")
        if dot and 0 < len(ext) <= 10:
            text = stem[: MAX_FILENAME_CHARS - len(ext) - 1] + "." + ext
        else:
            text = text[:MAX_FILENAME_CHARS]
    return text or fallback


def _decoded_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    raw = payload if isinstance(payload, bytes) else b""
    charset = part.get_content_charset() or "utf-8"
    try:
        text = raw.decode(charset, errors="replace")
    except LookupError:
        text = raw.decode("utf-8", errors="replace")
    return text.replace("\r\n", "\n")


def _leaves(message: Message) -> Iterator[Message]:
    """Leaf parts in order; an attached message counts as one leaf (not descended into)."""
    if message.get_content_maintype() == "multipart":
        payload = message.get_payload()
        if isinstance(payload, list):
            for child in payload:
                if isinstance(child, Message):
                    yield from _leaves(child)
        return
    yield message


def _leaf_bytes(part: Message) -> bytes:
    if part.get_content_type() == "message/rfc822":
        inner = part.get_payload()
        if isinstance(inner, list) and inner and isinstance(inner[0], Message):
            return inner[0].as_bytes()
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def _escaped(value: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in value)


def _restore_utf8(part: Message) -> None:
    """Raw UTF-8 header fields (RFC 6532), which compat32 keeps as escaped bytes, as text."""
    for name, value in part.raw_items():
        if isinstance(value, str) and _escaped(value):
            fixed = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            part.replace_header(name, fixed)


def _decode_words(value: str) -> str:
    """RFC 2047 encoded words decoded; anything malformed is kept as it came."""
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeError, HeaderParseError):
        return value


def _header_text(message: Message, name: str) -> str:
    value = message.get(name)
    if value is None:
        return ""
    if isinstance(value, Header):  # compat32 hands back undecodable (8-bit) headers this way
        value = str(value)
    return " ".join(_decode_words(str(value)).split())


def _filename(part: Message) -> str | None:
    try:
        name = part.get_filename()
    except (ValueError, LookupError, UnicodeError):
        return None
    return None if name is None else _decode_words(str(name))


def _extension(content_type: str) -> str:
    return {
        "application/pdf": ".pdf",
        "image/png": ".png",
        "image/jpeg": ".jpg",
        "image/gif": ".gif",
        "text/plain": ".txt",
        "text/html": ".html",
        "message/rfc822": ".eml",
    }.get(content_type, "")


def parse(content: bytes) -> ParsedMessage:
    """Split a MIME message into subject, bodies, inline images and attachments."""
    # compat32 is ten times faster than the default policy here, and we decode what we show.
    message = BytesParser(policy=policy.compat32).parsebytes(content)
    _restore_utf8(message)
    text: str | None = None
    html: str | None = None
    images: list[tuple[str, Message]] = []
    others: list[Message] = []
    for part in _leaves(message):
        if part is not message:
            _restore_utf8(part)
        ctype = part.get_content_type()
        disposition = part.get_content_disposition()
        named = _filename(part) is not None
        if disposition != "attachment" and not named:
            if ctype == "text/plain" and text is None:
                text = _decoded_text(part)
                continue
            if ctype == "text/html" and html is None:
                html = _decoded_text(part)
                continue
        cid = _header_text(part, "Content-ID").strip().strip("<>")
        if ctype.startswith("image/") and cid and disposition != "attachment":
            images.append((cid, part))
            continue
        others.append(part)
    if html is None:  # nothing refers to inline images: offer them as attachments
        others.extend(part for _cid, part in images)
        images = []
    inline = tuple(
        Part(
            i,
            safe_filename(_filename(part), f"image-{i}"),
            part.get_content_type(),
            _leaf_bytes(part),
            cid,
        )
        for i, (cid, part) in enumerate(images, start=1)
    )
    attachments = tuple(
        Part(
            i,
            safe_filename(_filename(part), f"attachment-{i}{_extension(part.get_content_type())}"),
            part.get_content_type(),
            _leaf_bytes(part),
        )
        for i, part in enumerate(others, start=1)
    )
    own = _MSGID.findall(_header_text(message, "Message-ID"))
    refs = _MSGID.findall(_header_text(message, "References"))
    return ParsedMessage(
        subject=_header_text(message, "Subject"),
        message_id=own[0] if own else None,
        references=tuple(refs[-_MAX_REFERENCES:]),
        text=text,
        html=html,
        attachments=attachments,
        inline=inline,
        inline_by_cid={p.content_id: p.index for p in inline if p.content_id},
    )


def subject_of(content: bytes) -> str:
    """The decoded subject, reading only the header block."""
    head = content.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    message = BytesHeaderParser(policy=policy.compat32).parsebytes(head + b"\r\n\r\n")
    _restore_utf8(message)
    return _header_text(message, "Subject")


def _one_line(value: str) -> str:
    return " ".join(
        "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in value).split()
    )


def build_reply(
    *,
    from_name: str,
    from_address: str,
    reply_to: str,
    to: str,
    subject: str,
    message_id: str,
    in_reply_to: str,
    references: Sequence[str],
    text: str,
    uploads: Sequence[Upload],
    date: datetime,
) -> bytes:
    """A client's reply as a complete message, threaded under ``in_reply_to``."""
    local, _, domain = from_address.rpartition("@")
    reply = EmailMessage(policy=policy.SMTP)
    reply["From"] = Address(display_name=_one_line(from_name)[:200], username=local, domain=domain)
    reply["Reply-To"] = reply_to
    reply["To"] = to
    clean_subject = _one_line(subject)
    if not clean_subject.lower().startswith("re:"):
        clean_subject = f"Re: {clean_subject}" if clean_subject else "Re: your secure message"
    reply["Subject"] = clean_subject
    reply["Date"] = format_datetime(date)
    reply["Message-ID"] = message_id
    reply["In-Reply-To"] = in_reply_to
    chain = [*references[-(_MAX_REFERENCES - 1) :], in_reply_to]
    reply["References"] = " ".join(dict.fromkeys(chain))
    reply.set_content(text or "")
    for upload in uploads:
        maintype, _, subtype = upload.content_type.partition("/")
        if not maintype or not subtype or maintype == "multipart":
            maintype, subtype = "application", "octet-stream"
        reply.add_attachment(
            upload.data,
            maintype=maintype,
            subtype=subtype,
            filename=safe_filename(upload.filename, "attachment"),
        )
    return reply.as_bytes()
