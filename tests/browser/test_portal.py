"""The whole round trip in a real browser: SMTP in, link, passphrase, read, download, reply, out.

Everything is real: our SMTP listener (STARTTLS + AUTH through smtplib), the
outbox worker delivering to an aiosmtpd sink as smarthost, the web app under
uvicorn on a free port, and Chromium driven by Playwright with the page's CSP
enforced. axe-core (``npm install``) checks the pages people use; it is
served to the page from its own origin through ``page.route``, so the CSP
stays on while it runs. Screenshots land in ``test-artifacts/``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import make_msgid, parseaddr
from pathlib import Path

import pytest

from tests.browser.support import (
    AXE,
    CHROMIUM,
    CHROMIUM_ARGS,
    axe_check,
    require_browser,
    snapshot,
    web_server,
)
from tests.smtp.conftest import (
    STAFF_EMAIL,
    STAFF_PASSWORD,
    EscrowServer,
    Sink,
    eventually,
    free_port,
    running_escrow,
    submit,
)
from tests.web.helpers import PDF, PNG

pytestmark = pytest.mark.browser

CLIENT = "sam.client@example.org"
PASSPHRASE = "copper kettle under seven maple leaves"
REPLY_TEXT = "Thank you, Tuesday at ten works for me."
REPLY_PDF = b"%PDF-1.4\n% the client's diary\n" + bytes(range(256)) * 4 + b"\n%%EOF\n"
BODY_TEXT = "Here are the notes we talked about"


@dataclass
class Site:
    escrow: EscrowServer
    sink: Sink
    base: str


@pytest.fixture
async def site(tmp_path: Path, sink: Sink) -> AsyncIterator[Site]:
    require_browser()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'escrow.db'}"
    async with running_escrow(
        tmp_path / "var",
        db_url,
        sink,
        ESCROW_WEB_PORT=str(port),
        ESCROW_PUBLIC_URL=base,
        ESCROW_INTERNAL_DOMAINS="",
    ) as escrow:
        await escrow.add_staff()
        async with web_server(escrow.services, port):
            yield Site(escrow, sink, base)


def original_message(message_id: str) -> bytes:
    message = EmailMessage(policy=policy.SMTP)
    message["From"] = f"Dr Hale <{STAFF_EMAIL}>"
    message["To"] = CLIENT
    message["Subject"] = "Notes from Thursday"
    message["Message-ID"] = message_id
    message.set_content(f"Dear Sam,\n{BODY_TEXT}.\n")
    message.add_alternative(
        f"<p>Dear Sam,</p><p>{BODY_TEXT}.</p><p><img src='cid:logo@riverside' alt='Logo'></p>"
        "<script>document.title='owned'</script>",
        subtype="html",
    )
    message.get_payload()[1].add_related(
        PNG, maintype="image", subtype="png", cid="<logo@riverside>"
    )
    message.add_attachment(PDF, maintype="application", subtype="pdf", filename="session-notes.pdf")
    return message.as_bytes()


def parse(data: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


async def test_round_trip_in_a_real_browser(site: Site) -> None:
    from playwright.async_api import async_playwright

    original_id = make_msgid(domain="riverside.example")
    reply = await asyncio.to_thread(
        submit,
        site.escrow.port,
        site.escrow.cafile,
        STAFF_EMAIL,
        [CLIENT],
        original_message(original_id),
        login=STAFF_EMAIL,
        password=STAFF_PASSWORD,
    )
    assert reply.code == 250, reply.text
    notices = await eventually(lambda: site.sink.to(CLIENT), what="the notification")
    notice_text = notices[0].data.decode()
    assert "Notes from Thursday" not in notice_text and BODY_TEXT not in notice_text
    link = re.search(rf"{re.escape(site.base)}/m/[A-Za-z0-9_-]+", notice_text)
    assert link, notice_text
    link_url = link.group(0)

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        await context.route(
            f"{site.base}/__test__/axe.min.js",
            lambda route: route.fulfill(path=str(AXE), content_type="application/javascript"),
        )
        page = await context.new_page()
        csp_errors: list[str] = []
        page.on(
            "console",
            lambda msg: (
                csp_errors.append(msg.text) if "Content Security Policy" in msg.text else None
            ),
        )
        try:
            # First visit: consent, then a passphrase.
            await page.goto(link_url)
            assert "/m/" not in page.url  # the token left the address bar
            await page.get_by_role("heading", name="Before you start").wait_for()
            await snapshot(page, "consent")
            await axe_check(page, site.base, "consent")
            await page.get_by_label("I have read this").check()
            await page.get_by_role("button", name="Continue").click()

            await page.get_by_role("heading", name="Choose a passphrase").wait_for()
            await page.get_by_label("New passphrase").fill("password123")
            await page.get_by_label("Type the same passphrase again").fill("password123")
            await page.get_by_role("button", name="Save passphrase").click()
            await page.get_by_role("alert").wait_for()
            await snapshot(page, "passphrase-refused")
            await axe_check(page, site.base, "passphrase")
            await page.get_by_label("New passphrase").fill(PASSPHRASE)
            await page.get_by_label("Type the same passphrase again").fill(PASSPHRASE)
            await page.get_by_role("button", name="Save passphrase").click()

            # Reading: text, sanitised HTML, the inline image from the message itself.
            await page.get_by_role("heading", name="Notes from Thursday").wait_for()
            assert BODY_TEXT in await page.inner_text("main")
            assert await page.title() != "owned"
            width = await page.eval_on_selector(".mail-html img", "img => img.naturalWidth")
            assert width == 1
            await snapshot(page, "message")
            await axe_check(page, site.base, "message")

            href = await page.get_by_role("link", name="session-notes.pdf").get_attribute("href")
            assert href is not None
            download = await page.request.get(site.base + href)
            assert download.ok
            assert await download.body() == PDF
            assert "attachment" in download.headers["content-disposition"]

            # Reply with an attachment.
            await page.get_by_label("Your reply to").fill(REPLY_TEXT)
            await page.set_input_files(
                "#reply-files",
                files=[{"name": "diary.pdf", "mimeType": "application/pdf", "buffer": REPLY_PDF}],
            )
            await axe_check(page, site.base, "reply form")
            await page.get_by_role("button", name="Send reply securely").click()
            await page.get_by_role("heading", name="Your reply was sent").wait_for()
            await snapshot(page, "reply-sent")
            await axe_check(page, site.base, "reply sent")

            await page.goto(f"{site.base}/inbox")
            await page.get_by_role("heading", name="Your messages").wait_for()
            await snapshot(page, "inbox")
            await axe_check(page, site.base, "inbox")

            await page.goto(f"{site.base}/activity")
            await axe_check(page, site.base, "activity")

            # Sign out; the back button shows nothing of the message.
            await page.goto(page.url.replace("/activity", "") + href.rsplit("/attachments", 1)[0])
            await page.get_by_role("heading", name="Notes from Thursday").wait_for()
            await page.get_by_role("button", name="Sign out").click()
            await page.get_by_role("heading", name="You have signed out").wait_for()
            await page.go_back()
            await page.wait_for_load_state()
            content = await page.content()
            assert BODY_TEXT not in content and "Notes from Thursday" not in content

            # Sign in again with the link.
            await page.goto(link_url)
            await page.get_by_role("heading", name="Sign in to read your message").wait_for()
            await snapshot(page, "sign-in")
            await axe_check(page, site.base, "sign in")
            await page.get_by_label("Your passphrase").fill(PASSPHRASE)
            await page.get_by_role("button", name="Sign in").click()
            await page.get_by_role("heading", name="Notes from Thursday").wait_for()
            assert csp_errors == []
        finally:
            await context.close()
            await browser.close()

    # The reply reached the therapist through the smarthost, threaded, with its attachment.
    replies = await eventually(lambda: site.sink.to(STAFF_EMAIL), what="the reply at the sink")
    mail = parse(replies[0].data)
    assert parseaddr(str(mail["To"]))[1] == STAFF_EMAIL
    assert parseaddr(str(mail["Reply-To"]))[1] == CLIENT
    assert mail["In-Reply-To"] == original_id
    assert original_id in str(mail["References"])
    assert mail.get_body(("plain",)).get_content().strip() == REPLY_TEXT  # type: ignore[union-attr]
    attachments = list(mail.iter_attachments())
    assert [a.get_filename() for a in attachments] == ["diary.pdf"]
    assert attachments[0].get_content() == REPLY_PDF
