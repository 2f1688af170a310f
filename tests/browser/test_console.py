"""The staff console in a real browser, next to a client using the portal.

Everything is real, as in ``test_portal.py``: our SMTP listener (STARTTLS +
AUTH with an app password made in the console), the outbox worker
delivering notifications to an aiosmtpd sink, the web app under uvicorn, and
Chromium with the CSP enforced. A staff member enrols a second factor (codes
computed with pyotp from the key the page shows), watches a message go from
notified to read, withdraws another; an admin resets a locked-out client,
who then chooses a new passphrase and reads the old message. axe-core checks
the console pages; screenshots land in ``test-artifacts/``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pyotp
import pytest
from sqlalchemy import select

from escrow.audit import Actor
from escrow.models import Delivery
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

pytestmark = pytest.mark.browser

CLIENT = "sam.client@example.org"
PASSPHRASE = "copper kettle under seven maple leaves"
NEW_PASSPHRASE = "seven quiet herons over the canal"
ADMIN_EMAIL = "office.admin@riverside.example"
ADMIN_PASSWORD = "the admin's own long password"
READ_SUBJECT = "Notes from Thursday"
REVOKED_SUBJECT = "Plan for next week"


@dataclass
class Site:
    escrow: EscrowServer
    sink: Sink
    base: str
    admin_secret: str


@pytest.fixture
async def site(tmp_path: Path, sink: Sink) -> AsyncIterator[Site]:
    require_browser()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with running_escrow(
        tmp_path / "var",
        f"sqlite+aiosqlite:///{tmp_path / 'escrow.db'}",
        sink,
        ESCROW_WEB_PORT=str(port),
        ESCROW_PUBLIC_URL=base,
        ESCROW_INTERNAL_DOMAINS="",
    ) as escrow:
        services = escrow.services
        operator = Actor("operator", id="tests")
        await escrow.add_staff()
        admin = await services.staff.add(
            ADMIN_EMAIL, ADMIN_PASSWORD, name="Office", admin=True, actor=operator
        )
        admin_secret = pyotp.random_base32(32)
        await services.staff_security.enrol_totp(
            admin.id, admin_secret, pyotp.TOTP(admin_secret).now(), actor=operator
        )
        async with web_server(escrow.services, port):
            yield Site(escrow, sink, base, admin_secret)


def message(subject: str) -> bytes:
    mail = EmailMessage(policy=policy.SMTP)
    mail["From"] = f"Dr Hale <{STAFF_EMAIL}>"
    mail["To"] = CLIENT
    mail["Subject"] = subject
    mail["Message-ID"] = make_msgid(domain="riverside.example")
    mail.set_content(f"Dear Sam,\nabout {subject.lower()}.\n")
    return mail.as_bytes()


async def statuses(site: Site) -> set[str]:
    async with site.escrow.services.db.read() as session:
        return set((await session.scalars(select(Delivery.status))).all())


def next_code(secret: str) -> str:
    """The code of the next time step: the current one was spent by the enrolment."""
    return pyotp.TOTP(secret).at(time.time() + 30)


async def test_console_in_a_real_browser(site: Site) -> None:
    from playwright.async_api import async_playwright, expect

    base = site.base
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        contexts: list[Any] = []

        async def new_page() -> Any:
            context = await browser.new_context(viewport={"width": 1280, "height": 800})
            await context.route(
                f"{base}/__test__/axe.min.js",
                lambda route: route.fulfill(path=str(AXE), content_type="application/javascript"),
            )
            contexts.append(context)
            page = await context.new_page()
            page.on(
                "console",
                lambda msg: (
                    csp_errors.append(msg.text) if "Content Security Policy" in msg.text else None
                ),
            )
            return page

        async def check(page: Any, name: str) -> None:
            await snapshot(page, f"console-{name}")
            await axe_check(page, base, name)

        csp_errors: list[str] = []
        try:
            staff = await new_page()
            client = await new_page()

            # ---- The staff member signs in for the first time and enrols a second factor.
            await staff.goto(f"{base}/staff/")
            await staff.get_by_role("heading", name="Staff sign-in").wait_for()
            await check(staff, "sign-in")
            await staff.get_by_label("Email address").fill(STAFF_EMAIL)
            await staff.get_by_label("Password").fill(STAFF_PASSWORD)
            await staff.get_by_role("button", name="Sign in").click()
            await staff.get_by_role("heading", name="Set up your second factor").wait_for()
            await check(staff, "enrol")
            secret = (await staff.locator("#totp-secret").inner_text()).replace(" ", "")
            await staff.get_by_label("Code from your authenticator app").fill(
                pyotp.TOTP(secret).now()
            )
            await staff.get_by_role("button", name="Turn on the second factor").click()
            await staff.get_by_role("heading", name="Your recovery codes").wait_for()
            await check(staff, "recovery-codes")
            await staff.get_by_role("link", name="I have saved them: continue").click()
            await staff.get_by_role("heading", name="Sent messages").wait_for()

            # ---- An app password for the mail client; it sends two messages.
            await staff.get_by_role("link", name="App passwords").click()
            await staff.get_by_label("Device or mail client").fill("Surgery desktop")
            await staff.get_by_role("button", name="Create an app password").click()
            app_password = await staff.locator("#new-password code").inner_text()
            await check(staff, "app-passwords")
            for subject in (READ_SUBJECT, REVOKED_SUBJECT):
                reply = await asyncio.to_thread(
                    submit,
                    site.escrow.port,
                    site.escrow.cafile,
                    STAFF_EMAIL,
                    [CLIENT],
                    message(subject),
                    login=STAFF_EMAIL,
                    password=app_password,
                )
                assert reply.code == 250, reply.text
            notices = await eventually(
                lambda: site.sink.to(CLIENT) if len(site.sink.to(CLIENT)) == 2 else None,
                what="two notifications",
            )
            links = [
                re.search(rf"{re.escape(base)}/m/[A-Za-z0-9_-]+", n.data.decode()) for n in notices
            ]
            assert all(links)
            # Which link is which: the console knows; the notices do not say.
            await eventually(lambda: _all_notified(site), what="both deliveries notified")

            await staff.get_by_role("link", name="Sent messages").click()
            read_row = staff.get_by_role("row").filter(has_text=READ_SUBJECT)
            await expect(read_row).to_contain_text("Notified")
            await check(staff, "messages")
            await read_row.get_by_role("link", name=READ_SUBJECT).click()
            await staff.get_by_role("heading", name=READ_SUBJECT).wait_for()
            read_url = staff.url
            read_id = read_url.rsplit("/", 1)[1]
            link_for = await _links_by_message(site, [m.group(0) for m in links if m])
            await check(staff, "message")

            # ---- The client reads it; the console shows it read.
            await client.goto(link_for[read_id])
            await client.get_by_label("I have read this").check()
            await client.get_by_role("button", name="Continue").click()
            await client.get_by_label("New passphrase").fill(PASSPHRASE)
            await client.get_by_label("Type the same passphrase again").fill(PASSPHRASE)
            await client.get_by_role("button", name="Save passphrase").click()
            await client.get_by_role("heading", name=READ_SUBJECT).wait_for()
            await staff.reload()
            await expect(staff.locator("#deliveries")).to_contain_text("Read")
            await expect(staff.locator("#deliveries [data-status]")).to_have_attribute(
                "data-status", "read"
            )
            await expect(staff.locator("#trail")).to_contain_text("message.viewed")

            # ---- The staff member withdraws the other; its link shows the withdrawal page.
            await staff.goto(f"{base}/staff/messages")
            await staff.get_by_role("link", name=REVOKED_SUBJECT).click()
            revoked_id = staff.url.rsplit("/", 1)[1]
            await staff.get_by_role("link", name="Withdraw this message…").click()
            await staff.get_by_role("heading", name="Withdraw this message?").wait_for()
            await check(staff, "revoke")
            await staff.get_by_role("button", name="Withdraw the message").click()
            await expect(staff.locator("#deliveries [data-status]")).to_have_attribute(
                "data-status", "revoked"
            )
            await expect(staff.locator("#trail")).to_contain_text("message.revoked")
            await client.goto(link_for[revoked_id])
            await client.get_by_role("heading", name="This message was withdrawn").wait_for()

            # ---- The client forgets the passphrase and is locked out.
            await client.goto(f"{base}/inbox")
            await client.get_by_role("button", name="Sign out").click()
            await client.get_by_role("heading", name="You have signed out").wait_for()
            await client.goto(link_for[read_id])
            for attempt in range(5):
                await client.get_by_label("Your passphrase").fill(f"wrong guess number {attempt}")
                await client.get_by_role("button", name="Sign in").click()
                await client.get_by_role("heading", name="Sign in to read your message").wait_for()
            await client.get_by_text("Signing in is paused for now").wait_for()

            # ---- An admin resets the client.
            admin = await new_page()
            await admin.goto(f"{base}/staff/sign-in")
            await admin.get_by_label("Email address").fill(ADMIN_EMAIL)
            await admin.get_by_label("Password").fill(ADMIN_PASSWORD)
            await admin.get_by_role("button", name="Sign in").click()
            await admin.get_by_role("heading", name="Second factor").wait_for()
            await check(admin, "second-factor")
            await admin.get_by_label("Code from your authenticator app").fill(
                next_code(site.admin_secret)
            )
            await admin.get_by_role("button", name="Continue").click()
            await admin.get_by_role("heading", name="Messages").wait_for()
            await admin.get_by_role("link", name="Recipients").click()
            await admin.get_by_label("Address starts with").fill("sam.")
            await admin.get_by_role("button", name="Search").click()
            await check(admin, "recipients")
            await admin.get_by_role("link", name=CLIENT).click()
            await expect(admin.locator("#lock-state")).to_contain_text("Paused until")
            await expect(admin.locator("#history")).to_contain_text("recipient.locked")
            await check(admin, "recipient")
            await admin.get_by_role("button", name="Reset the passphrase").click()
            await admin.get_by_text("The passphrase was cleared").wait_for()
            await expect(admin.locator("#lock-state")).to_have_text("Open")
            for name in ("Staff", "Audit log", "Settings"):
                await admin.get_by_role("navigation").get_by_role("link", name=name).click()
                await admin.get_by_role("heading", level=1).wait_for()
                await check(admin, f"admin-{name.lower().replace(' ', '-')}")
            await admin.get_by_role("link", name="Audit log").click()
            await admin.get_by_role("button", name="Verify now").click()
            await expect(admin.locator("#verify-result")).to_contain_text("The chain is intact")

            # ---- The client chooses a new passphrase and reads the old message.
            await client.goto(link_for[read_id])
            await client.get_by_role("heading", name="Choose a passphrase").wait_for()
            await client.get_by_label("New passphrase").fill(NEW_PASSPHRASE)
            await client.get_by_label("Type the same passphrase again").fill(NEW_PASSPHRASE)
            await client.get_by_role("button", name="Save passphrase").click()
            await client.get_by_role("heading", name=READ_SUBJECT).wait_for()

            # ---- Signing out ends the console session; the back button shows nothing.
            await staff.goto(read_url)
            await staff.get_by_role("button", name="Sign out").click()
            await staff.get_by_role("heading", name="You have signed out").wait_for()
            await staff.goto(read_url)
            await staff.get_by_role("heading", name="Staff sign-in").wait_for()
            assert csp_errors == []
        finally:
            for context in contexts:
                await context.close()
            await browser.close()


async def _all_notified(site: Site) -> bool:
    return await statuses(site) == {"notified"}


async def _links_by_message(site: Site, links: list[str]) -> dict[str, str]:
    """Map message id -> link URL, through the delivery each token names."""
    found: dict[str, str] = {}
    async with site.escrow.services.db.read() as session:
        deliveries = (await session.scalars(select(Delivery))).all()
    for delivery in deliveries:
        token = site.escrow.services.links.token_for(delivery.id)
        for link in links:
            if link.endswith("/m/" + token):
                found[delivery.message_id] = link
    assert len(found) == 2
    return found
