"""End to end: a mail client submits, the vault keeps ciphertext, the smarthost sees only notices.

Each test runs a real aiosmtpd listener of ours and a real aiosmtpd sink as
smarthost, on SQLite and on PostgreSQL, and talks to ours with ``smtplib``
over STARTTLS, as a mail client would.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.utils import make_msgid, parsedate_to_datetime
from pathlib import Path

from sqlalchemy import select

from escrow.models import Delivery, Message, OutboxJob, Recipient, VaultItem
from tests.conftest import require
from tests.smtp.conftest import (
    INTERNAL_DOMAIN,
    NOTIFY_FROM,
    PUBLIC_URL,
    STAFF_EMAIL,
    STAFF_PASSWORD,
    EscrowServer,
    MakeEscrow,
    Received,
    Reply,
    Sink,
    audit_events,
    dump_tables,
    eventually,
    in_thread,
    leaks,
    signed_in,
    simple_message,
    submit,
    transact,
)

CLIENT_A = "alex.client@example.net"
CLIENT_B = "sam.client@example.org"
COLLEAGUE = f"colleague@{INTERNAL_DOMAIN}"
LINK = re.compile(re.escape(PUBLIC_URL) + r"/m/([A-Za-z0-9_-]{43})(?![A-Za-z0-9_-])")


@dataclass(frozen=True)
class Markers:
    """Unique strings planted in every part of a message that must never leak."""

    subject: str
    body: str
    html: str
    filename: str
    attachment: str

    @classmethod
    def fresh(cls) -> Markers:
        def one(kind: str) -> str:
            return f"{kind}{secrets.token_hex(8)}"

        return cls(one("subj"), one("body"), one("html"), one("file"), one("pdf"))

    def all(self) -> list[str]:
        return [self.subject, self.body, self.html, self.filename, self.attachment]


def pdf_with(marker: str) -> bytes:
    return (
        b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n"
        b"% clinical assessment " + marker.encode() + b" " + b"x" * 3000 + b"\n%%EOF\n"
    )


def multipart_message(sender: str, to: list[str], markers: Markers) -> bytes:
    """Text and HTML alternatives plus a PDF attachment, every part carrying a marker."""
    message = EmailMessage(policy=policy.SMTP)
    message["From"] = sender
    message["To"] = ", ".join(to)
    message["Subject"] = f"Treatment plan {markers.subject}"
    message["Message-ID"] = make_msgid(domain="riverside.example")
    message.set_content(f"Dear client,\n\nYour plan: {markers.body}\n\nDr Hale\n")
    message.add_alternative(
        f"<html><body><p>Your plan: <b>{markers.html}</b></p></body></html>", subtype="html"
    )
    message.add_attachment(
        pdf_with(markers.attachment),
        maintype="application",
        subtype="pdf",
        filename=f"assessment-{markers.filename}.pdf",
    )
    return message.as_bytes()


def decoded_text(message: EmailMessage) -> str:
    """Every text part of ``message``, transfer-decoded."""
    parts = []
    for part in message.walk():
        if part.get_content_maintype() == "text":
            parts.append(part.get_content())
    return "\n".join(parts)


def assert_clean_notice(received: Received, recipient: str, markers: Markers) -> str:
    """Checks one notification; returns the link token it carries."""
    assert [r.lower() for r in received.rcpt_tos] == [recipient.lower()]
    assert received.mail_from == NOTIFY_FROM
    notice = received.parsed()
    assert notice["To"].addresses[0].addr_spec.lower() == recipient.lower()
    assert notice["From"].addresses[0].addr_spec == NOTIFY_FROM
    assert parsedate_to_datetime(str(notice["Date"])).tzinfo is not None
    assert re.fullmatch(r"<[^<>@\s]+@[^<>@\s]+>", str(notice["Message-ID"]))
    assert notice.get_content_type() == "multipart/alternative"
    text = notice.get_body(preferencelist=("plain",))
    html = notice.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    plain_text = text.get_content()
    assert "Riverside Counselling" in plain_text
    tokens = LINK.findall(plain_text)
    assert len(set(tokens)) == 1, plain_text
    assert tokens[0] in html.get_content()
    everything = received.data.decode("utf-8", "replace") + decoded_text(notice)
    for marker in markers.all():
        assert marker.lower() not in everything.lower(), f"notification leaks {marker}"
    assert "Treatment plan" not in everything
    assert not any(part.get_filename() for part in notice.walk())
    return str(tokens[0])


async def test_multipart_mail_is_escrowed_and_only_notices_leave(
    make_escrow: MakeEscrow, sink: Sink
) -> None:
    escrow = await make_escrow(worker=False, ESCROW_INTERNAL_DOMAINS=INTERNAL_DOMAIN)
    staff_id = await escrow.add_staff()
    markers = Markers.fresh()
    original = multipart_message(STAFF_EMAIL, [CLIENT_A, CLIENT_B, COLLEAGUE], markers)

    reply = await in_thread(
        submit, escrow.port, escrow.cafile, STAFF_EMAIL, [CLIENT_A, CLIENT_B, COLLEAGUE], original
    )
    assert reply.code == 250, reply

    services = escrow.services
    async with services.db.read() as session:
        messages = (await session.scalars(select(Message))).all()
        assert len(messages) == 1
        message = messages[0]
        deliveries = (await session.scalars(select(Delivery))).all()
        recipients = {r.id: r.email for r in (await session.scalars(select(Recipient))).all()}
        items = (await session.scalars(select(VaultItem))).all()
        jobs = (await session.scalars(select(OutboxJob))).all()
    assert message.staff_id == staff_id
    assert message.sender == STAFF_EMAIL
    assert message.direction == "outbound"
    assert {recipients[d.recipient_id] for d in deliveries} == {CLIENT_A, CLIENT_B}
    assert {d.status for d in deliveries} == {"queued"}
    assert sorted(j.kind for j in jobs) == ["notification", "notification", "passthrough"]
    assert [item.message_id for item in items] == [message.id]
    # The vault holds the original, but only as ciphertext.
    assert await services.vault.open_item(items[0]) == original

    tables = await dump_tables(services)
    first_base64_line = base64.b64encode(pdf_with(markers.attachment)[:57]).decode()
    assert leaks(tables, [*markers.all(), "Treatment plan", first_base64_line]) == []
    if services.db.dialect == "sqlite":
        database = Path(services.db.url.split("///", 1)[1])
        for path in (database, database.with_name(database.name + "-wal")):
            if path.exists():
                raw = path.read_bytes()
                assert not any(m.encode() in raw for m in markers.all()), path

    assert sink.received() == []
    assert await escrow.worker.run_once() == 3
    arrived = await sink.wait_for_count(3)

    passed = sink.to(COLLEAGUE)
    assert len(passed) == 1
    assert passed[0].rcpt_tos == (COLLEAGUE,)
    assert passed[0].mail_from == STAFF_EMAIL
    assert passed[0].data == original

    token_hashes = {d.token_hash for d in deliveries}
    seen_tokens = set()
    for client in (CLIENT_A, CLIENT_B):
        notices = sink.to(client)
        assert len(notices) == 1, f"{client} got {len(notices)} notifications"
        token = assert_clean_notice(notices[0], client, markers)
        assert hashlib.sha256(token.encode()).hexdigest() in token_hashes
        seen_tokens.add(token)
    assert len(seen_tokens) == 2
    assert len(arrived) == 3

    async with services.db.read() as session:
        statuses = (await session.scalars(select(Delivery.status))).all()
    assert list(statuses) == ["notified", "notified"]

    auth_ok = await audit_events(services, "smtp.auth_ok")
    assert [(e.actor_id, e.remote_addr) for e in auth_ok] == [(staff_id, "127.0.0.1")]
    accepted = await audit_events(services, "message.accepted")
    assert [(e.actor_type, e.actor_id, e.remote_addr, e.message_id) for e in accepted] == [
        ("staff", staff_id, "127.0.0.1", message.id)
    ]
    passed_through = await audit_events(services, "message.passed_through")
    assert [(e.actor_id, e.message_id) for e in passed_through] == [(staff_id, message.id)]
    sent = await audit_events(services, "notification.sent")
    assert {e.delivery_id for e in sent} == {d.id for d in deliveries}
    assert all(e.message_id == message.id for e in sent)
    await services.audit.verify()


async def test_8bit_body_and_internationalised_recipient(escrow: EscrowServer, sink: Sink) -> None:
    recipient = "zoë.müller@bücher.example"
    body = "Grüße, Zoë: nächste Sitzung am Dienstag. Ça va? 日本語\r\n"
    raw = (
        f"From: {STAFF_EMAIL}\r\n"
        f"To: {recipient}, {COLLEAGUE}\r\n"
        "Subject: =?utf-8?q?Termin?=\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: text/plain; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n" + body
    ).encode("utf-8")

    def send() -> tuple[list[str], Reply]:
        client = signed_in(escrow.port, escrow.cafile)
        try:
            features = [name for name in ("8bitmime", "smtputf8") if client.has_extn(name)]
            reply = transact(
                client,
                STAFF_EMAIL,
                [recipient, COLLEAGUE],
                raw,
                mail_options=["SMTPUTF8", "BODY=8BITMIME"],
            )
        finally:
            client.quit()
        return features, reply

    features, reply = await in_thread(send)
    assert features == ["8bitmime", "smtputf8"]
    assert reply.code == 250, reply

    async with escrow.services.db.read() as session:
        item = (await session.scalars(select(VaultItem))).one()
        delivery = (await session.scalars(select(Delivery))).one()
    assert await escrow.services.vault.open_item(item) == raw

    notices = await eventually(lambda: sink.to(recipient), what="the notification")
    assert len(notices) == 1
    notice = notices[0]
    assert "SMTPUTF8" in {o.upper() for o in notice.mail_options}
    parsed = notice.parsed()
    assert parsed["To"].addresses[0].addr_spec == recipient
    # Raw UTF-8 in the header (RFC 6532); RFC 2047 encoded words are not allowed in an address.
    head = notice.data.split(b"\r\n\r\n", 1)[0]
    assert b"To: " + recipient.encode() in head
    assert b"=?" not in head.split(b"To: ", 1)[1].split(b"\r\n", 1)[0]
    match = LINK.search(parsed.get_body(preferencelist=("plain",)).get_content())
    assert match is not None
    assert hashlib.sha256(match[1].encode()).hexdigest() == delivery.token_hash
    assert "Sitzung" not in notice.data.decode("utf-8", "replace")

    # The colleague's copy passes through byte for byte, declared as 8-bit.
    passed = await eventually(lambda: sink.to(COLLEAGUE), what="the pass-through copy")
    assert passed[0].data == raw
    assert "BODY=8BITMIME" in {o.upper() for o in passed[0].mail_options}


async def test_replies_join_the_thread_of_the_message_they_answer(
    escrow: EscrowServer, sink: Sink
) -> None:
    async def send(message_id: str, **headers: str) -> str:
        data = simple_message(
            STAFF_EMAIL, [CLIENT_A], message_id=message_id, headers=headers or None
        )
        reply = await in_thread(submit, escrow.port, escrow.cafile, STAFF_EMAIL, [CLIENT_A], data)
        assert reply.code == 250, reply
        async with escrow.services.db.read() as session:
            return (
                await session.scalars(
                    select(Message.thread_id).where(Message.rfc_message_id == message_id)
                )
            ).one()

    first = await send("<first.4711@riverside.example>")
    follow_up = await send(
        "<second.4712@riverside.example>", **{"In-Reply-To": "<first.4711@riverside.example>"}
    )
    via_references = await send(
        "<third.4713@riverside.example>",
        References="<elsewhere@example.com> <second.4712@riverside.example>",
    )
    unrelated = await send(
        "<fourth.4714@riverside.example>", **{"In-Reply-To": "<unknown.1@example.com>"}
    )
    assert follow_up == first
    assert via_references == first
    assert unrelated != first


async def test_swaks_submits_over_starttls_with_auth_login(
    escrow: EscrowServer, sink: Sink
) -> None:
    swaks = shutil.which("swaks")
    require(swaks is not None, "swaks is not installed (apt-get install swaks)")
    assert swaks is not None
    support = subprocess.run([swaks, "--support"], capture_output=True, text=True, check=False)
    require(
        "=== TLS supported" in support.stdout + support.stderr,
        "swaks cannot speak TLS (apt-get install libnet-ssleay-perl)",
    )
    marker = f"swaks{secrets.token_hex(8)}"
    process = await asyncio.create_subprocess_exec(
        swaks,
        "--server", f"127.0.0.1:{escrow.port}",
        "--tls",
        "--auth", "LOGIN",
        "--auth-user", STAFF_EMAIL,
        "--auth-password", STAFF_PASSWORD,
        "--from", STAFF_EMAIL,
        "--to", CLIENT_A,
        "--header", f"Subject: {marker}",
        "--body", f"Session summary {marker}",
        "--timeout", "30",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    transcript = output.decode("utf-8", "replace")
    assert process.returncode == 0, transcript
    assert "<~  250 2.0.0 Message accepted" in transcript, transcript

    notices = await eventually(lambda: sink.to(CLIENT_A), what="the notification")
    assert len(notices) == 1
    assert marker not in notices[0].data.decode("utf-8", "replace")
    assert LINK.search(notices[0].parsed().get_body(preferencelist=("plain",)).get_content())


async def test_postfix_smtp_source_from_a_trusted_mta(make_escrow: MakeEscrow, sink: Sink) -> None:
    smtp_source = shutil.which("smtp-source") or shutil.which("smtp-source", path="/usr/sbin")
    require(
        smtp_source is not None, "Postfix smtp-source is not installed (apt-get install postfix)"
    )
    assert smtp_source is not None
    escrow = await make_escrow(
        ESCROW_TRUSTED_NETWORKS="127.0.0.0/8", ESCROW_TRUSTED_NETWORKS_REQUIRE_TLS="false"
    )
    count = 12
    process = await asyncio.create_subprocess_exec(
        smtp_source,
        "-s", "3",
        "-m", str(count),
        "-N",
        "-f", "mta@riverside.example",
        "-t", "client@example.net",
        "-S", "Progress notes",
        f"127.0.0.1:{escrow.port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, output.decode("utf-8", "replace")

    arrived = await sink.wait_for_count(count)
    recipients = {r for m in arrived for r in m.rcpt_tos}
    assert len(recipients) == count
    assert all(r.endswith("client@example.net") for r in recipients)
    assert not any(b"Progress notes" in m.data for m in arrived)
    async with escrow.services.db.read() as session:
        assert len((await session.scalars(select(Message))).all()) == count
