"""The staff console over HTTP, on SQLite and PostgreSQL: sign-in, scope, CSRF, admin, cost."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pyotp
from sqlalchemy import event, select

from escrow.audit import EXPORT_FIELDS, Actor
from escrow.intake import Submission
from escrow.models import AuditEvent, Message, Recipient, Staff, WebSession
from escrow.services import Services
from tests.conftest import MASTER
from tests.web.conftest import MakePortal, browse
from tests.web.helpers import CLIENT, GOOD, Portal, csrf_of, mime_message

OPERATOR = Actor("operator", id="tests")
PASSWORD = "a long staff password, 2026"
ADA = "ada@riverside.example"
BEA = "bea@riverside.example"
BOSS = "boss@riverside.example"
NO_TOTP = {"ESCROW_STAFF_REQUIRE_TOTP": "false"}
_FORM_TOKEN = re.compile(r'name="form_token" value="([0-9a-f]{64})"')
_SECRET = re.compile(r'id="totp-secret">([A-Z2-7 ]+)<')


@dataclass
class StaffMember:
    id: str
    email: str
    client: httpx.AsyncClient
    secret: str | None = None


def code_for(secret: str, *, ahead: int = 0) -> str:
    """The TOTP code for now plus ``ahead`` steps (a step once used is refused)."""
    return pyotp.TOTP(secret).at(time.time() + 30 * ahead)


async def add_staff(
    portal: Portal, email: str, *, admin: bool = False, enrol: bool = False
) -> StaffMember:
    staff = await portal.services.staff.add(email, PASSWORD, admin=admin, actor=OPERATOR)
    secret = None
    if enrol:
        secret = pyotp.random_base32(32)
        await portal.services.staff_security.enrol_totp(
            staff.id, secret, code_for(secret), actor=OPERATOR
        )
    client = browse(portal.services)
    return StaffMember(staff.id, email, client, secret)


async def password_step(member: StaffMember, password: str = PASSWORD) -> httpx.Response:
    page = await member.client.get("/staff/sign-in")
    token = _FORM_TOKEN.search(page.text)
    assert token, page.text
    return await member.client.post(
        "/staff/sign-in",
        data={"form_token": token.group(1), "email": member.email, "password": password},
    )


async def sign_in(member: StaffMember) -> None:
    """Password, then (when enrolled) the next TOTP code; ends on a full session."""
    response = await password_step(member)
    assert response.status_code == 303, response.text
    if member.secret is not None:
        assert response.headers["location"] == "/staff/second-factor"
        page = await member.client.get("/staff/second-factor")
        response = await member.client.post(
            "/staff/second-factor",
            data={"csrf": csrf_of(page), "code": code_for(member.secret, ahead=1)},
        )
        assert response.status_code == 303, response.text
    assert response.headers["location"] == "/staff/messages"


async def send_as(
    services: Services, member: StaffMember, to: str = CLIENT, subject: str = "Session notes"
) -> str:
    accepted = await services.intake.accept(
        Submission(
            mail_from=member.email,
            recipients=[to],
            content=mime_message(to=to, subject=subject),
            staff_id=member.id,
            remote_addr="192.0.2.1",
        )
    )
    assert accepted.message_id is not None
    return accepted.message_id


async def staff_sessions(services: Services, staff_id: str) -> list[WebSession]:
    async with services.db.read() as session:
        return list(
            (
                await session.scalars(
                    select(WebSession).where(
                        WebSession.principal_type == "staff",
                        WebSession.principal_id == staff_id,
                        WebSession.ended_at.is_(None),
                    )
                )
            ).all()
        )


async def events(services: Services, action: str) -> list[AuditEvent]:
    async with services.db.read() as session:
        return list(
            (await session.scalars(select(AuditEvent).where(AuditEvent.action == action))).all()
        )


# ---------------------------------------------------------------- sign-in


async def test_the_password_alone_does_not_open_the_console_when_a_factor_is_enrolled(
    portal: Portal,
) -> None:
    ada = await add_staff(portal, ADA, enrol=True)
    assert ada.secret is not None

    response = await password_step(ada)

    assert response.status_code == 303
    assert response.headers["location"] == "/staff/second-factor"
    pending = await staff_sessions(portal.services, ada.id)
    assert [s.stage for s in pending] == ["mfa"]
    assert (await ada.client.get("/staff/messages")).headers["location"] == "/staff/second-factor"
    assert (await ada.client.get("/staff/admin/settings")).status_code == 303
    first_cookie = ada.client.cookies["escrow_staff"]

    page = await ada.client.get("/staff/second-factor")
    wrong = await ada.client.post(
        "/staff/second-factor", data={"csrf": csrf_of(page), "code": "000000"}
    )
    assert wrong.status_code == 401
    assert [s.stage for s in await staff_sessions(portal.services, ada.id)] == ["mfa"]

    right = await ada.client.post(
        "/staff/second-factor", data={"csrf": csrf_of(page), "code": code_for(ada.secret, ahead=1)}
    )
    assert right.status_code == 303
    live = await staff_sessions(portal.services, ada.id)
    assert [s.stage for s in live] == ["full"]
    assert live[0].id != pending[0].id  # a new session (and cookie) at sign-in
    assert ada.client.cookies["escrow_staff"] != first_cookie
    assert (await ada.client.get("/staff/messages")).status_code == 200
    await ada.client.aclose()


async def test_an_admin_must_enrol_and_the_pending_secret_stays_on_the_server(
    make_portal: MakePortal,
) -> None:
    portal = await make_portal(**NO_TOTP)  # admins need a second factor all the same
    boss = await add_staff(portal, BOSS, admin=True)

    response = await password_step(boss)
    assert response.headers["location"] == "/staff/second-factor"
    assert (await boss.client.get("/staff/second-factor")).headers["location"] == "/staff/enrol"
    page = await boss.client.get("/staff/enrol")
    again = await boss.client.get("/staff/enrol")
    found = _SECRET.search(page.text)
    assert found
    secret = found.group(1).replace(" ", "")
    assert secret in again.text.replace(" ", "")  # stable while the session lives
    assert "<svg" in page.text and "<script" not in page.text
    assert all(secret not in value for value in boss.client.cookies.values())
    assert 'name="secret"' not in page.text  # not round-tripped through the form either

    wrong = await boss.client.post("/staff/enrol", data={"csrf": csrf_of(page), "code": "123456"})
    assert wrong.status_code == 400
    done = await boss.client.post(
        "/staff/enrol", data={"csrf": csrf_of(page), "code": code_for(secret)}
    )
    assert done.status_code == 200
    assert "recovery codes" in done.text
    codes = re.findall(r"<code>([a-z0-9]{5}-[a-z0-9]{5})</code>", done.text)
    assert len(codes) == 10
    assert [s.stage for s in await staff_sessions(portal.services, boss.id)] == ["full"]
    assert (await boss.client.get("/staff/admin/settings")).status_code == 200
    await boss.client.aclose()


async def test_sign_out_ends_the_session_on_the_server(make_portal: MakePortal) -> None:
    portal = await make_portal(**NO_TOTP)
    ada = await add_staff(portal, ADA)
    await sign_in(ada)
    cookie = ada.client.cookies["escrow_staff"]
    page = await ada.client.get("/staff/messages")

    response = await ada.client.post("/staff/sign-out", data={"csrf": csrf_of(page)})

    assert response.status_code == 303
    assert await staff_sessions(portal.services, ada.id) == []
    ada.client.cookies.set("escrow_staff", cookie)
    assert (
        (await ada.client.get("/staff/messages")).headers["location"].startswith("/staff/sign-in")
    )
    await ada.client.aclose()


async def test_wrong_passwords_lock_the_account(make_portal: MakePortal) -> None:
    portal = await make_portal(**NO_TOTP)
    ada = await add_staff(portal, ADA)
    statuses = [(await password_step(ada, "not the password")).status_code for _ in range(5)]
    assert statuses == [401] * 5
    locked = await password_step(ada)  # even the right password, while locked
    assert locked.status_code == 401
    assert "paused" in locked.text
    assert await staff_sessions(portal.services, ada.id) == []
    await ada.client.aclose()


async def test_many_failures_from_one_address_are_throttled(make_portal: MakePortal) -> None:
    portal = await make_portal(**NO_TOTP)
    ada = await add_staff(portal, ADA)
    for n in range(30):  # unknown accounts: no account lock, only the address counts
        stranger = StaffMember("", f"nobody{n}@riverside.example", ada.client)
        assert (await password_step(stranger)).status_code == 401
    throttled = await password_step(ada)  # the right password, from the same address
    assert throttled.status_code == 429
    assert await staff_sessions(portal.services, ada.id) == []
    refused = await events(portal.services, "staff.login_failed")
    assert refused[-1].outcome == "throttled"
    await ada.client.aclose()


# ---------------------------------------------------------------- CSRF and cookies


async def test_forms_without_the_csrf_token_are_refused(make_portal: MakePortal) -> None:
    portal = await make_portal(**NO_TOTP)
    ada = await add_staff(portal, ADA)
    message_id = await send_as(portal.services, ada)

    no_token = await ada.client.post(
        "/staff/sign-in", data={"email": ADA, "password": PASSWORD, "form_token": "0" * 64}
    )
    assert no_token.status_code == 400
    assert await staff_sessions(portal.services, ada.id) == []

    await sign_in(ada)
    revoke = await ada.client.post(f"/staff/messages/{message_id}/revoke", data={"csrf": "0" * 64})
    assert revoke.status_code == 400
    created = await ada.client.post("/staff/app-passwords", data={"name": "Laptop"})
    assert created.status_code == 400
    async with portal.services.db.read() as session:
        message = await session.get(Message, message_id)
        assert message is not None and message.revoked_at is None
    assert await portal.services.staff_security.list_app_passwords(ada.id) == []
    assert len(await events(portal.services, "csrf.failed")) == 3
    await ada.client.aclose()


async def test_console_cookies_and_headers(make_portal: MakePortal) -> None:
    portal = await make_portal(ESCROW_PUBLIC_URL="https://secure.example.org")
    client = browse(portal.services)
    page = await client.get("/staff/sign-in")
    cookie = page.headers["set-cookie"]
    assert cookie.startswith("__Host-escrow_staff_form=")
    assert "HttpOnly" in cookie and "Secure" in cookie and "samesite=strict" in cookie.lower()
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "<script" not in page.text and "style=" not in page.text
    await client.aclose()


# ---------------------------------------------------------------- scope


async def test_staff_see_and_revoke_only_their_own_messages(make_portal: MakePortal) -> None:
    portal = await make_portal(**NO_TOTP)
    ada = await add_staff(portal, ADA)
    bea = await add_staff(portal, BEA)
    boss = await add_staff(portal, BOSS, admin=True, enrol=True)
    adas = await send_as(portal.services, ada, subject="Ada's private subject")
    for member in (ada, bea, boss):
        await sign_in(member)

    own = await ada.client.get("/staff/messages")
    assert "Ada&#39;s private subject" in own.text
    assert adas in own.text
    others = await bea.client.get("/staff/messages")
    assert adas not in others.text
    unknown = await bea.client.get(f"/staff/messages/{'0' * 32}")
    seen = await bea.client.get(f"/staff/messages/{adas}")
    assert seen.status_code == unknown.status_code == 404
    page = await bea.client.get("/staff/messages")
    revoke = await bea.client.post(f"/staff/messages/{adas}/revoke", data={"csrf": csrf_of(page)})
    assert revoke.status_code == 404
    async with portal.services.db.read() as session:
        message = await session.get(Message, adas)
        assert message is not None and message.revoked_at is None

    # An admin sees every message, but not the subject of someone else's.
    admin_view = await boss.client.get(f"/staff/messages/{adas}")
    assert admin_view.status_code == 200
    assert "private subject" not in admin_view.text
    assert "private subject" not in (await boss.client.get("/staff/messages")).text

    # The sender withdraws it; the client's link then no longer opens it.
    page = await ada.client.get(f"/staff/messages/{adas}/revoke")
    done = await ada.client.post(f"/staff/messages/{adas}/revoke", data={"csrf": csrf_of(page)})
    assert done.status_code == 303
    detail = await ada.client.get(f"/staff/messages/{adas}")
    assert 'data-status="revoked"' in detail.text
    assert "message.revoked" in detail.text  # the message's own audit trail
    filtered = await ada.client.get("/staff/messages", params={"status": "revoked"})
    assert adas in filtered.text
    assert adas not in (await ada.client.get("/staff/messages", params={"status": "queued"})).text
    for member in (ada, bea, boss):
        await member.client.aclose()


async def test_admin_pages_refuse_non_admins(make_portal: MakePortal) -> None:
    portal = await make_portal(**NO_TOTP)
    ada = await add_staff(portal, ADA)
    boss = await add_staff(portal, BOSS, admin=True, enrol=True)
    await sign_in(ada)
    await sign_in(boss)
    pages = (
        "/staff/admin/staff",
        "/staff/admin/audit",
        "/staff/admin/audit/export?format=csv",
        "/staff/admin/settings",
    )
    for path in pages:
        assert (await ada.client.get(path)).status_code == 404, path
        assert (await boss.client.get(path)).status_code == 200, path
    page = await ada.client.get("/staff/messages")
    added = await ada.client.post(
        "/staff/admin/staff",
        data={"csrf": csrf_of(page), "email": "eve@riverside.example", "password": PASSWORD},
    )
    assert added.status_code == 404
    reset = await ada.client.post(
        f"/staff/admin/staff/{boss.id}/reset-second-factor", data={"csrf": csrf_of(page)}
    )
    assert reset.status_code == 404
    async with portal.services.db.read() as session:
        emails = set((await session.scalars(select(Staff.email))).all())
        boss_row = await session.get(Staff, boss.id)
    assert "eve@riverside.example" not in emails
    assert boss_row is not None and boss_row.totp_enrolled_at is not None
    assert "/staff/admin/" not in page.text  # no admin navigation for staff
    await ada.client.aclose()
    await boss.client.aclose()


# ---------------------------------------------------------------- cost


@contextmanager
def counting(services: Services) -> Iterator[list[str]]:
    """Every SQL statement run on the database's engines while the block runs."""
    seen: list[str] = []
    engines = {id(e): e for e in (services.db.engine, services.db._read_engine)}.values()

    def count(*args: Any) -> None:
        seen.append(str(args[2]))

    for engine in engines:
        event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        for engine in engines:
            event.remove(engine.sync_engine, "before_cursor_execute", count)


async def test_listing_costs_do_not_grow_with_the_number_of_messages(
    make_portal: MakePortal,
) -> None:
    portal = await make_portal(**NO_TOTP)
    ada = await add_staff(portal, ADA)
    await sign_in(ada)

    async def send(first: int, last: int) -> None:
        await asyncio.gather(
            *(
                send_as(portal.services, ada, to=f"client{n:03}@example.org")
                for n in range(first, last)
            )
        )

    async def statements(path: str) -> tuple[int, int]:
        with counting(portal.services) as cold:
            first = await ada.client.get(path)
        with counting(portal.services) as warm:
            again = await ada.client.get(path)
        assert first.status_code == again.status_code == 200
        return len(cold), len(warm)

    await send(0, 5)
    small_sent = await statements("/staff/messages")
    small_recipients = await statements("/staff/recipients")
    await send(5, 60)
    large_sent = await statements("/staff/messages")
    large_recipients = await statements("/staff/recipients")

    assert small_sent == large_sent
    assert small_recipients == large_recipients
    # And few: session, account, page, deliveries (SQLite adds its BEGINs).
    assert large_sent[1] <= 8 and large_recipients[1] <= 6, (large_sent, large_recipients)
    page = await ada.client.get("/staff/messages")
    assert page.text.count('href="/staff/messages/') == 25  # one page, and a link onwards
    assert "Older messages" in page.text
    older = re.search(r'href="(/staff/messages\?[^"]*after=[^"]+)"', page.text)
    assert older
    second = await ada.client.get(older.group(1).replace("&amp;", "&"))
    assert second.text.count('href="/staff/messages/') == 25
    await ada.client.aclose()


# ---------------------------------------------------------------- admin


async def test_audit_export_downloads_parse_and_are_audited(make_portal: MakePortal) -> None:
    portal = await make_portal(**NO_TOTP)
    boss = await add_staff(portal, BOSS, admin=True, enrol=True)
    await sign_in(boss)

    as_csv = await boss.client.get("/staff/admin/audit/export", params={"format": "csv"})
    assert as_csv.status_code == 200
    assert as_csv.headers["content-disposition"].startswith("attachment;")
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert tuple(rows[0].keys()) == EXPORT_FIELDS
    assert rows[-1]["action"] == "audit.exported"

    as_jsonl = await boss.client.get("/staff/admin/audit/export", params={"format": "jsonl"})
    lines = [json.loads(line) for line in as_jsonl.text.splitlines()]
    assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1))
    assert lines[-1]["action"] == "audit.exported"
    assert lines[-1]["actor_id"] == boss.id
    assert len(await events(portal.services, "audit.exported")) == 2

    page = await boss.client.get("/staff/admin/audit")
    verified = await boss.client.post("/staff/admin/audit/verify", data={"csrf": csrf_of(page)})
    assert "The chain is intact" in verified.text
    await boss.client.aclose()


async def test_the_settings_view_masks_secrets(make_portal: MakePortal) -> None:
    smarthost_password = "smarthost-password-do-not-show"
    portal = await make_portal(
        ESCROW_SMARTHOST="127.0.0.1:2526",
        ESCROW_SMARTHOST_USER="relay-user",
        ESCROW_SMARTHOST_PASSWORD=smarthost_password,
    )
    boss = await add_staff(portal, BOSS, admin=True, enrol=True)
    await sign_in(boss)
    page = await boss.client.get("/staff/admin/settings")
    assert page.status_code == 200
    assert "ESCROW_SMARTHOST_PASSWORD" in page.text and "ESCROW_MASTER_PASSPHRASE" in page.text
    assert smarthost_password not in page.text
    assert MASTER not in page.text
    assert "set (hidden)" in page.text
    assert "relay-user" in page.text and "Riverside Counselling" in page.text
    database = portal.services.settings.database_url
    if "@" in database:  # PostgreSQL: the URL is shown without its password
        from sqlalchemy.engine import make_url

        password = make_url(database).password
        if password:
            assert password not in page.text
    await boss.client.aclose()


# ---------------------------------------------------------------- recipients and replies


async def test_staff_reset_a_client_who_then_reads_old_mail(make_portal: MakePortal) -> None:
    portal = await make_portal(**NO_TOTP)
    ada = await add_staff(portal, ADA)
    sent = await portal.send()
    await portal.set_up(sent)
    await sign_in(ada)
    async with portal.services.db.read() as session:
        recipient = (
            await session.scalars(select(Recipient).where(Recipient.email == CLIENT))
        ).one()

    listing = await ada.client.get("/staff/recipients", params={"q": "sam."})
    assert CLIENT in listing.text
    assert CLIENT not in (await ada.client.get("/staff/recipients", params={"q": "zz"})).text
    page = await ada.client.get(f"/staff/recipients/{recipient.id}")
    assert "passphrase.set" in page.text  # their access history
    reset = await ada.client.post(
        f"/staff/recipients/{recipient.id}/reset", data={"csrf": csrf_of(page)}
    )
    assert reset.status_code == 303
    (event_row,) = await events(portal.services, "recipient.reset")
    assert (event_row.actor_type, event_row.actor_id) == ("staff", ada.id)
    short = await ada.client.post(
        f"/staff/recipients/{recipient.id}/code", data={"csrf": csrf_of(page), "code": "12"}
    )
    assert short.status_code == 400

    portal.client.cookies.clear()
    page = await portal.open(sent.token)
    assert "Choose a passphrase" in page.text
    new = "seven quiet herons over the canal"
    chosen = await portal.post("/access/passphrase", {"passphrase": new, "confirm": new}, page)
    assert chosen.status_code == 303
    message = await portal.client.get(f"/messages/{sent.message_id}")
    assert "Notes from our session" in message.text
    assert new != GOOD
    await ada.client.aclose()


async def test_a_reply_is_readable_by_the_staff_member_it_was_addressed_to(
    make_portal: MakePortal,
) -> None:
    portal = await make_portal(ESCROW_REPLY_MODE="notify", **NO_TOTP)
    ada = await add_staff(portal, ADA)
    bea = await add_staff(portal, BEA)
    boss = await add_staff(portal, BOSS, admin=True, enrol=True)
    message_id = await send_as(portal.services, ada)
    async with portal.services.db.read() as session:
        delivery_token = None
        from escrow.models import Delivery

        delivery = (
            await session.scalars(select(Delivery).where(Delivery.message_id == message_id))
        ).one()
        delivery_token = portal.services.links.token_for(delivery.id)
    from tests.web.helpers import Sent

    sent = Sent(delivery_token, message_id, delivery.id, "")
    page = await portal.set_up(sent)
    reply = await portal.client.post(
        f"/messages/{message_id}/reply",
        data={"csrf": csrf_of(page), "text": "Thursday suits me, thank you."},
        files={"files": ("diary.txt", b"my diary", "text/plain")},
    )
    assert reply.status_code == 303
    async with portal.services.db.read() as session:
        reply_id = (
            await session.scalars(select(Message.id).where(Message.direction == "reply"))
        ).one()
    for member in (ada, bea, boss):
        await sign_in(member)

    original = await ada.client.get(f"/staff/messages/{message_id}")  # the notice's link
    assert f'href="/staff/messages/{reply_id}"' in original.text
    shown = await ada.client.get(f"/staff/messages/{reply_id}")
    assert "Thursday suits me" in shown.text
    download = await ada.client.get(f"/staff/messages/{reply_id}/attachments/1")
    assert download.content == b"my diary"
    assert download.headers["content-disposition"].startswith("attachment;")
    viewed = [e for e in await events(portal.services, "message.viewed") if e.actor_type == "staff"]
    assert [(e.actor_id, e.message_id) for e in viewed] == [(ada.id, reply_id)]

    assert (await bea.client.get(f"/staff/messages/{reply_id}")).status_code == 404
    assert (await bea.client.get(f"/staff/messages/{reply_id}/attachments/1")).status_code == 404
    admin_view = await boss.client.get(f"/staff/messages/{reply_id}")
    assert admin_view.status_code == 200 and "Thursday suits me" not in admin_view.text
    assert (await boss.client.get(f"/staff/messages/{reply_id}/attachments/1")).status_code == 404
    for member in (ada, bea, boss):
        await member.client.aclose()


async def test_app_passwords_are_shown_once_and_can_be_revoked(make_portal: MakePortal) -> None:
    portal = await make_portal(**NO_TOTP)
    ada = await add_staff(portal, ADA)
    await sign_in(ada)
    page = await ada.client.get("/staff/app-passwords")
    created = await ada.client.post(
        "/staff/app-passwords", data={"csrf": csrf_of(page), "name": "Work laptop"}
    )
    assert created.status_code == 200
    secret = re.search(r'<code class="secret">([a-z0-9-]+)</code>', created.text)
    assert secret
    listing = await ada.client.get("/staff/app-passwords")
    assert "Work laptop" in listing.text and secret.group(1) not in listing.text
    (info,) = await portal.services.staff_security.list_app_passwords(ada.id)
    revoked = await ada.client.post(
        f"/staff/app-passwords/{info.id}/revoke", data={"csrf": csrf_of(listing)}
    )
    assert revoked.status_code == 303
    (info,) = await portal.services.staff_security.list_app_passwords(ada.id)
    assert info.revoked_at is not None
    await ada.client.aclose()


async def test_a_session_cookie_opens_only_its_own_side(make_portal: MakePortal) -> None:
    """A staff session presented as a recipient's cookie (or the reverse) is no session."""
    portal = await make_portal(**NO_TOTP)
    sent = await portal.send()
    await portal.set_up(sent)
    recipient_cookie = portal.client.cookies["escrow_session"]
    ada = await add_staff(portal, ADA)
    await sign_in(ada)
    staff_cookie = ada.client.cookies["escrow_staff"]

    async with browse(portal.services) as stranger:
        stranger.cookies.set("escrow_session", staff_cookie)
        assert (await stranger.get(f"/messages/{sent.message_id}")).status_code == 401
        stranger.cookies.clear()
        stranger.cookies.set("escrow_staff", recipient_cookie)
        response = await stranger.get("/staff/messages")
        assert response.status_code == 303
        assert response.headers["location"].startswith("/staff/sign-in")
    # Each still works where it belongs.
    assert (await portal.client.get(f"/messages/{sent.message_id}")).status_code == 200
    assert (await ada.client.get("/staff/messages")).status_code == 200
    await ada.client.aclose()
