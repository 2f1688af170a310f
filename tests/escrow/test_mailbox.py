"""MIME parsing and building, safe names, masked addresses, and the mailbox's subject cache."""

from __future__ import annotations

from email import policy
from email.parser import BytesParser

import pytest
from sqlalchemy import select

from escrow import mime
from escrow.activity import mask_ip
from escrow.audit import Actor
from escrow.errors import NotFound
from escrow.intake import Submission
from escrow.models import Delivery, Message, Recipient
from escrow.services import Services
from tests.web.helpers import CLIENT, PDF, PNG, mime_message


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("report.pdf", "report.pdf"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\x\\evil.bat", "evil.bat"),
        ("\u202egpj.exe", "gpj.exe"),
        ("a\x00b\x07c\r\n.txt", "abc.txt"),
        ('what?*:"<>|.pdf', "what_______.pdf"),
        ("...hidden", "hidden"),
        ("", "fallback"),
        (None, "fallback"),
        ("x" * 300 + ".pdf", "x" * 116 + ".pdf"),
    ],
)
def test_safe_filename(name: str | None, expected: str) -> None:
    assert mime.safe_filename(name, "fallback") == expected


def test_parse_finds_bodies_inline_images_and_attachments() -> None:
    parsed = mime.parse(
        mime_message(
            html="<p>Hi <img src='cid:logo@riverside'></p>",
            inline_png=True,
            attachments=(("notes.pdf", "application/pdf", PDF),),
        )
    )
    assert parsed.subject == "Notes from our session"
    assert parsed.text is not None and "here are the notes" in parsed.text
    assert parsed.html is not None and "cid:logo@riverside" in parsed.html
    assert [(p.content_id, p.data) for p in parsed.inline] == [("logo@riverside", PNG)]
    assert parsed.inline_by_cid == {"logo@riverside": 1}
    assert [(p.index, p.filename, p.data) for p in parsed.attachments] == [(1, "notes.pdf", PDF)]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a mail at all",
        b"Subject: =?x-unknown?q?bad?=\r\nContent-Type: text/plain; charset=x-nonsense\r\n\r\nbody\xff\r\n",
        b"Content-Type: multipart/mixed; boundary=zz\r\n\r\n--zz\r\nContent-Type: text/plain\r\n\r\nunterminated",
        b"Content-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!",
    ],
)
def test_parse_never_raises_on_malformed_mime(content: bytes) -> None:
    parsed = mime.parse(content)
    assert isinstance(parsed.subject, str)


def test_parse_decodes_encoded_and_raw_utf8_names() -> None:
    raw = (
        "Subject: =?utf-8?q?Befund_=C3=9Cbersicht?=\r\n"
        "Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        "--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhi\r\n"
        "--b\r\nContent-Type: application/pdf\r\n"
        'Content-Disposition: attachment; filename="=?utf-8?q?Bef=C3=BCnd.pdf?="\r\n\r\nxx\r\n'
        "--b\r\nContent-Type: application/pdf\r\n"
        "Content-Disposition: attachment; filename*=utf-8''%C3%A4rger.pdf\r\n\r\nyy\r\n"
        "--b\r\nContent-Type: application/pdf\r\n"
        'Content-Disposition: attachment; filename="Übung.pdf"\r\n\r\nzz\r\n'
        "--b--\r\n"
    ).encode()

    parsed = mime.parse(raw)

    assert parsed.subject == "Befund Übersicht"
    assert [a.filename for a in parsed.attachments] == ["Befünd.pdf", "ärger.pdf", "Übung.pdf"]
    assert (
        mime.subject_of("Subject: Grüße aus der Praxis\r\n\r\nx".encode()) == "Grüße aus der Praxis"
    )


def test_build_reply_threads_under_the_original() -> None:
    from datetime import UTC, datetime

    raw = mime.build_reply(
        from_name="Sam\r\nBcc: evil@example.org",
        from_address="secure@riverside.example",
        reply_to=CLIENT,
        to="ada@riverside.example",
        subject="Notes\r\nX-Injected: yes",
        message_id="<r1@riverside.example>",
        in_reply_to="<o1@riverside.example>",
        references=("<o0@riverside.example>",),
        text="thanks",
        uploads=(mime.Upload("../x.pdf", "application/pdf", PDF),),
        date=datetime(2026, 1, 2, tzinfo=UTC),
    )
    message = BytesParser(policy=policy.default).parsebytes(raw)
    assert message["Subject"] == "Re: Notes X-Injected: yes"
    assert "X-Injected" not in message and "Bcc" not in message
    assert message["References"] == "<o0@riverside.example> <o1@riverside.example>"
    assert [p.get_filename() for p in message.iter_attachments()] == ["x.pdf"]


@pytest.mark.parametrize(
    ("address", "masked"),
    [
        ("203.0.113.42", "203.0.113.x"),
        ("2001:db8:85a3::8a2e:370:7334", "2001:db8:85a3:…"),
        ("::ffff:192.0.2.7", "192.0.2.x"),
        ("", "unknown"),
        ("cli", "hidden"),
    ],
)
def test_mask_ip(address: str, masked: str) -> None:
    assert mask_ip(address) == masked


async def test_inbox_seals_each_subject_once_and_scopes_to_the_recipient(
    services: Services,
) -> None:
    accepted = await services.intake.accept(
        Submission(
            "ada@riverside.example",
            [CLIENT],
            mime_message(subject="Private subject"),
            None,
            "192.0.2.1",
        )
    )
    async with services.db.read() as session:
        recipient_id = (
            await session.scalars(select(Recipient.id).where(Recipient.email == CLIENT))
        ).one()
    mailbox = services.portal.mailbox

    page = await mailbox.inbox(recipient_id)

    assert [e.subject for e in page.entries] == ["Private subject"]
    async with services.db.read() as session:
        message = await session.get(Message, accepted.message_id)
    assert message is not None and message.subject_sealed is not None
    assert b"Private subject" not in message.subject_sealed
    assert [e.subject for e in (await mailbox.inbox(recipient_id)).entries] == ["Private subject"]
    with pytest.raises(NotFound):
        await mailbox.open("0" * 32, str(accepted.message_id), Actor("recipient"))
    async with services.db.read() as session:
        delivery = (await session.scalars(select(Delivery))).one()
    assert await mailbox.message_for(recipient_id, delivery.id) == accepted.message_id
    assert await mailbox.message_for("0" * 32, delivery.id) is None
