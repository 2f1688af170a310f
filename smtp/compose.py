"""Mail the server writes itself: notifications, bounce notices and read receipts.

A notification says who the practice is and carries the link; nothing else.
No subject, body, attachment name or sender's free text of the escrowed
message ever appears in it. Message-IDs derive from the outbox job id, so a
job sent twice yields the same Message-ID (harmless to the recipient's MTA).
"""

from __future__ import annotations

import functools
import html
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from email.utils import format_datetime

from escrow.models import utcnow
from escrow.settings import Settings


def _base(settings: Settings, *, job_id: str, to: str, subject: str, kind: str) -> EmailMessage:
    local, _, domain = settings.notify_from.rpartition("@")
    message = EmailMessage(policy=SMTP)
    message["From"] = Address(display_name=settings.practice_name, username=local, domain=domain)
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = format_datetime(utcnow())
    message["Message-ID"] = f"<{job_id}.{kind}@{domain}>"
    message["Auto-Submitted"] = "auto-generated"
    return message


def _serialise(message: EmailMessage, to: str) -> bytes:
    # An internationalised address goes out raw under SMTPUTF8 (RFC 6532): RFC 2047
    # encoded words are not allowed inside an address.
    return message.as_bytes(policy=SMTP if to.isascii() else SMTPUTF8)


def _contact_line(settings: Settings) -> str:
    contact = f" ({settings.practice_contact})" if settings.practice_contact else ""
    return f"If you were not expecting it, or have a question, contact {settings.practice_name} directly{contact}."


# Placeholders in the cached notification; none can occur in the fixed text.
_JOB = "JOBIDPLACEHOLDERJOBIDPLACEHOLDER"
_TO = "recipient@placeholder.invalid"
_TOKEN = "TOKENPLACEHOLDER" + "0" * 27  # as long as a real token: line lengths hold
_DATE = "Thu, 01 Jan 1970 00:00:00 -0000"


def notification(settings: Settings, *, job_id: str, to: str, token: str) -> bytes:
    """The notice a client receives: the practice's name and the link, nothing more.

    The text is rendered once per configuration; each notice only fills in the
    recipient, the link token, the date and the Message-ID (the email package's
    header machinery costs milliseconds a message, and the worker is hot).
    """
    if (
        any(c in to for c in "\r\n")
        or not token.isascii()
        or not token.replace("-", "").replace("_", "").isalnum()
    ):
        raise ValueError("refusing to build a notification from malformed input")
    return (
        _notification_template(settings)
        .replace(_JOB.encode(), job_id.encode("ascii"))
        .replace(_TO.encode(), to.encode("utf-8"))
        .replace(_TOKEN.encode(), token.encode("ascii"))
        .replace(_DATE.encode(), format_datetime(utcnow()).encode("ascii"))
    )


@functools.lru_cache(maxsize=4)
def _notification_template(settings: Settings) -> bytes:
    practice = settings.practice_name
    link = f"{settings.public_url}/m/{_TOKEN}"
    message = _base(
        settings,
        job_id=_JOB,
        to=_TO,
        subject=f"You have a secure message from {practice}",
        kind="notice",
    )
    message.replace_header("Date", _DATE)
    text = (
        f"Hello,\n\n"
        f"{practice} has sent you a secure message.\n\n"
        f"To read it, open this link:\n{link}\n\n"
        f"The first time, you will choose a passphrase; after that you sign in with it.\n"
        f"The link is only for you: please do not forward this email.\n\n"
        f"{_contact_line(settings)}\n"
        f"{practice} will never ask for your passphrase by email.\n"
    )
    # 7bit/8bit keep the placeholders intact (quoted-printable could split them).
    message.set_content(text, cte="7bit" if text.isascii() else "8bit")
    p, e_link = html.escape(practice), html.escape(link, quote=True)
    body = (
        '<!doctype html><html><body style="font-family:sans-serif;font-size:16px;line-height:1.5">\n'
        f"<p>Hello,</p><p>{p} has sent you a secure message.</p>\n"
        f'<p><a href="{e_link}" style="display:inline-block;padding:12px 20px;background:#1d4f91;'
        f'color:#ffffff;text-decoration:none;border-radius:6px">Read the secure message</a></p>\n'
        f"<p>Or copy this link into your browser:<br>{html.escape(link)}</p>\n"
        "<p>The first time, you will choose a passphrase; after that you sign in with it. "
        "The link is only for you: please do not forward this email.</p>\n"
        f"<p>{html.escape(_contact_line(settings))} "
        f"{p} will never ask for your passphrase by email.</p></body></html>\n"
    )
    message.add_alternative(body, subtype="html", cte="7bit" if body.isascii() else "8bit")
    return message.as_bytes(policy=SMTP)


def bounce(
    settings: Settings,
    *,
    job_id: str,
    to: str,
    recipients: Sequence[str],
    reason: str,
    reference: str | None,
    passthrough: bool = False,
) -> bytes:
    """Tell a sender that recipients could not be reached, and why; never the content."""
    subject = (
        "Undeliverable: message to a colleague"
        if passthrough
        else "Secure message: recipient not notified"
    )
    message = _base(settings, job_id=job_id, to=to, subject=subject, kind="bounce")
    listed = "\n".join(f"  {address}" for address in recipients)
    if passthrough:
        opening = "A message you sent could not be delivered to:\n\n"
        closing = "Check the address, or ask your IT administrator about the outgoing mail relay.\n"
    else:
        opening = "A secure message you sent could not be announced to:\n\n"
        closing = (
            "The message itself is kept safely in the vault; the recipient has not been told of it.\n"
            "Check the address, or ask your IT administrator about the outgoing mail relay.\n"
        )
    message.set_content(
        f"{opening}{listed}\n\nReason: {reason}\nReference: {reference or '-'}\n\n{closing}"
    )
    return _serialise(message, to)


def read_receipt(
    settings: Settings,
    *,
    job_id: str,
    to: str,
    recipient: str,
    read_at: datetime,
    original_message_id: str = "",
) -> bytes:
    """Tell a sender that their secure message to ``recipient`` was opened, and when.

    No subject, no body, no attachment names: only the client's address, the
    time and the practice. Threaded under the original (by Message-ID) so it
    sits with the sent message in the sender's mail client.
    """
    if any(c in recipient for c in "\r\n") or any(c in original_message_id for c in "\r\n"):
        raise ValueError("refusing to build a read receipt from malformed input")
    message = _base(settings, job_id=job_id, to=to, subject="Secure message opened", kind="receipt")
    if original_message_id:
        message["In-Reply-To"] = original_message_id
        message["References"] = original_message_id
    moment = read_at.astimezone(UTC)
    opened = f"{moment.day} {moment:%B %Y} at {moment:%H:%M} UTC"
    message.set_content(
        f"Your secure message to {recipient} was opened on {opened}.\n\n"
        "For privacy this notice carries no part of the message.\n\n"
        f"-- \n{settings.practice_name} secure messages\n"
    )
    return _serialise(message, to)


# A notify-mode reply job carries this JSON instead of a message (escrow.replies).
_REPLY_NOTICE_PREFIX = b'{"notice": "reply-notice"'


def is_reply_notice(payload: bytes) -> bool:
    """Whether a ``reply`` job's payload is a notify-mode notice rather than a whole message."""
    return payload.startswith(_REPLY_NOTICE_PREFIX)


def reply_notice(settings: Settings, *, job_id: str, to: str, payload: bytes) -> bytes:
    """Tell a therapist that a client replied, with a link to the console; never the content.

    Threaded under the original (In-Reply-To/References) so it sits with the
    conversation in the therapist's mail client; names neither the client nor
    the subject.
    """
    notice = json.loads(payload)
    message = _base(settings, job_id=job_id, to=to, subject="New secure reply", kind="reply")
    original = str(notice.get("in_reply_to") or "")
    if original:
        message["In-Reply-To"] = original
        message["References"] = original
    link = f"{settings.public_url}/staff/messages/{notice['parent_id']}"
    message.set_content(
        "A reply to a secure message you sent is waiting for you.\n\n"
        f"Sign in to read it:\n{link}\n\n"
        "For privacy this notice carries no part of the reply.\n"
    )
    return _serialise(message, to)
