"""Following a link: the neutral page, first-access code, consent, passphrase, sign-in, lockout."""

from __future__ import annotations

from datetime import timedelta

import httpx
from sqlalchemy import select, update

from escrow.audit import Actor
from escrow.lockout import AddressThrottle
from escrow.models import AuditEvent, Delivery, Message, Recipient, utcnow
from tests.web.helpers import CLIENT, GOOD, Portal, csrf_of

STAFF = Actor("operator", id="tester", remote_addr="cli")


async def actions(portal: Portal) -> list[tuple[str, str]]:
    async with portal.services.db.read() as session:
        rows = (await session.scalars(select(AuditEvent).order_by(AuditEvent.seq))).all()
    return [(row.action, row.outcome) for row in rows]


async def recipient(portal: Portal, email: str = CLIENT) -> Recipient:
    async with portal.services.db.read() as session:
        row = (await session.scalars(select(Recipient).where(Recipient.email == email))).one()
    return row


# ---------------------------------------------------------------- the neutral page


async def test_unknown_and_expired_links_look_exactly_the_same(portal: Portal) -> None:
    # A withdrawn message's link says so instead: tests/web/test_lifecycle.py.
    expired = await portal.send()
    async with portal.services.db.write() as session:
        await session.execute(
            update(Message)
            .where(Message.id == expired.message_id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    unknown = portal.services.links.token_for("0" * 32)

    pages = [
        await portal.client.get(f"/m/{token}")
        for token in (unknown, expired.token, "not-a-token", "x" * 300)
    ]

    assert {page.status_code for page in pages} == {404}
    assert len({page.content for page in pages}) == 1
    assert "This link cannot be used" in pages[0].text
    assert all("set-cookie" not in page.headers for page in pages)
    assert ("link.opened", "unknown") in await actions(portal)
    assert ("link.opened", "expired") in await actions(portal)


async def test_a_good_link_starts_a_session_and_drops_the_token_from_the_url(
    portal: Portal,
) -> None:
    sent = await portal.send()

    response = await portal.client.get(f"/m/{sent.token}")

    assert response.status_code == 303
    assert response.headers["location"] == "/access"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("escrow_session=")
    assert sent.token not in cookie
    lowered = cookie.lower()
    assert "httponly" in lowered and "samesite=strict" in lowered and "path=/" in lowered
    assert "secure" not in lowered  # http public URL
    assert ("link.opened", "ok") in await actions(portal)
    async with portal.services.db.read() as session:
        delivery = await session.get(Delivery, sent.delivery_id)
    assert delivery is not None and delivery.status == "opened" and delivery.opened_at


async def test_https_public_url_makes_the_cookie_secure_with_the_host_prefix(
    make_portal: object,
) -> None:
    portal = await make_portal(ESCROW_PUBLIC_URL="https://secure.riverside.example")  # type: ignore[operator]
    sent = await portal.send()

    response = await portal.client.get(f"/m/{sent.token}")

    cookie = response.headers["set-cookie"]
    assert cookie.startswith("__Host-escrow_session=")
    assert "secure" in cookie.lower() and "path=/" in cookie.lower()
    assert "domain" not in cookie.lower()
    assert response.headers["strict-transport-security"].startswith("max-age=")


# ---------------------------------------------------------------- first visit


async def test_first_access_code_is_asked_before_anything_else(portal: Portal) -> None:
    sent = await portal.send()
    await portal.services.portal.recipients.set_code(CLIENT, "4711-2042", STAFF)

    page = await portal.open(sent.token)
    assert "first-access code" in page.text
    wrong = await portal.post("/access/code", {"code": "0000-0000"}, page)
    assert wrong.status_code == 401
    assert "does not match" in wrong.text
    right = await portal.post("/access/code", {"code": " 4711-2042 "}, wrong)
    assert right.status_code == 303

    consent = await portal.client.get("/access")
    assert "Before you start" in consent.text
    assert ("access_code.ok", "ok") in await actions(portal)


async def test_consent_must_be_ticked_and_is_recorded_once(portal: Portal) -> None:
    sent = await portal.send()
    page = await portal.open(sent.token)

    refused = await portal.post("/access/consent", {}, page)
    assert refused.status_code == 400
    assert "tick the box" in refused.text
    assert "Before you start" in refused.text

    accepted = await portal.post("/access/consent", {"agree": "yes"}, refused)
    assert accepted.status_code == 303
    assert "Choose a passphrase" in (await portal.client.get("/access")).text
    assert (await recipient(portal)).consent_at is not None
    assert [a for a in await actions(portal) if a[0] == "consent.given"] == [
        ("consent.given", "ok")
    ]


async def test_consent_text_comes_from_the_configured_file(
    make_portal: object, tmp_path: object
) -> None:
    from pathlib import Path

    notice = Path(str(tmp_path)) / "consent.txt"
    notice.write_text("First paragraph of our own notice.\n\nSecond <b>paragraph</b>.\n")
    portal = await make_portal(ESCROW_CONSENT_TEXT_FILE=str(notice))  # type: ignore[operator]
    sent = await portal.send()

    page = await portal.open(sent.token)

    assert "<p>First paragraph of our own notice.</p>" in page.text
    assert "Second &lt;b&gt;paragraph&lt;/b&gt;." in page.text


async def to_passphrase_step(portal: Portal) -> httpx.Response:
    sent = await portal.send()
    page = await portal.open(sent.token)
    await portal.post("/access/consent", {"agree": "yes"}, page)
    return await portal.client.get("/access")


async def test_weak_passphrases_are_refused_with_feedback_and_the_form_redrawn(
    portal: Portal,
) -> None:
    page = await to_passphrase_step(portal)
    cases = {
        "short": ("cat", "at least 10 characters"),
        "common": ("password123", "very common password"),
        "keyboard": ("qwertyuiop", "common password"),
        "practice": ("riverside counselling", "too easy to guess"),
        "address": ("Sam.Client-rocks-2024", "email address"),
        "mismatch": (GOOD, "are not the same"),
        "too long": ("x" * 257, "at most 256"),
    }
    for name, (passphrase, feedback) in cases.items():
        confirm = GOOD + "!" if name == "mismatch" else passphrase
        response = await portal.post(
            "/access/passphrase", {"passphrase": passphrase, "confirm": confirm}, page
        )
        assert response.status_code == 400, name
        assert feedback.lower() in response.text.lower(), (name, response.text)
        assert 'type="password"' in response.text
        assert passphrase not in response.text or name == "short"
        page = response
    assert (await recipient(portal)).passphrase_hash is None


async def test_choosing_a_passphrase_signs_in_with_a_new_session_id(portal: Portal) -> None:
    page = await to_passphrase_step(portal)
    before = portal.client.cookies["escrow_session"]

    response = await portal.post("/access/passphrase", {"passphrase": GOOD, "confirm": GOOD}, page)

    assert response.status_code == 303
    assert response.headers["location"].startswith("/messages/")
    after = portal.client.cookies["escrow_session"]
    assert after != before
    message = await portal.client.get(response.headers["location"])
    assert message.status_code == 200
    assert "Notes from our session" in message.text
    stored = await recipient(portal)
    assert stored.passphrase_hash is not None and stored.passphrase_hash.startswith("$argon2id$")
    assert GOOD not in stored.passphrase_hash
    assert ("passphrase.set", "ok") in await actions(portal)
    assert ("login.ok", "ok") in await actions(portal)
    # The pre-sign-in cookie value is dead.
    portal.client.cookies.set("escrow_session", before)
    assert (await portal.client.get("/inbox")).status_code == 401


async def test_later_visits_sign_in_with_the_passphrase(portal: Portal) -> None:
    sent = await portal.send()
    await portal.set_up(sent)
    portal.client.cookies.clear()

    page = await portal.open(sent.token)
    assert "Sign in to read your message" in page.text
    wrong = await portal.post("/access/sign-in", {"passphrase": "not my passphrase"}, page)
    assert wrong.status_code == 401
    assert "does not match" in wrong.text
    right = await portal.post("/access/sign-in", {"passphrase": GOOD}, wrong)
    assert right.status_code == 303
    assert right.headers["location"] == f"/messages/{sent.message_id}"
    assert (await recipient(portal)).failed_attempts == 0


async def test_a_stale_hash_is_replaced_on_sign_in(portal: Portal) -> None:
    from escrow.passwords import SecretHasher

    sent = await portal.send()
    await portal.set_up(sent)
    older = SecretHasher(time_cost=2, memory_kib=8, parallelism=1).hash_sync(GOOD)
    async with portal.services.db.write() as session:
        await session.execute(
            update(Recipient).where(Recipient.email == CLIENT).values(passphrase_hash=older)
        )
    portal.client.cookies.clear()

    assert (await portal.sign_in(sent)).status_code == 303
    assert (await recipient(portal)).passphrase_hash != older


# ---------------------------------------------------------------- lockout and throttling


async def test_repeated_failures_lock_even_the_right_passphrase_until_unlocked(
    portal: Portal,
) -> None:
    sent = await portal.send()
    await portal.set_up(sent)
    portal.client.cookies.clear()
    page = await portal.open(sent.token)

    statuses = []
    for attempt in range(5):
        page = await portal.post("/access/sign-in", {"passphrase": f"wrong guess {attempt}"}, page)
        statuses.append(page.status_code)
    assert statuses == [401] * 5
    assert "signing in is paused" in page.text.lower()
    locked = await recipient(portal)
    assert locked.failed_attempts == 5
    assert locked.locked_until is not None and locked.locked_until > utcnow()

    right = await portal.post("/access/sign-in", {"passphrase": GOOD}, page)
    assert right.status_code == 401
    assert "paused" in right.text and "Your messages are safe" in right.text
    assert "escrow_session" in portal.client.cookies  # still only the link session
    assert (await portal.client.get("/inbox")).status_code == 303  # not signed in: back to /access
    assert ("recipient.locked", "ok") in await actions(portal)
    assert ("login.failed", "locked") in await actions(portal)

    await portal.services.portal.recipients.unlock(CLIENT, STAFF)
    unlocked = await portal.post("/access/sign-in", {"passphrase": GOOD}, right)
    assert unlocked.status_code == 303
    assert ("recipient.unlocked", "ok") in await actions(portal)


async def test_each_further_failure_doubles_the_lock(portal: Portal) -> None:
    sent = await portal.send()
    await portal.set_up(sent)
    portal.client.cookies.clear()
    page = await portal.open(sent.token)
    for attempt in range(5):
        page = await portal.post("/access/sign-in", {"passphrase": f"wrong {attempt}"}, page)
    first = (await recipient(portal)).locked_until
    assert first is not None
    async with portal.services.db.write() as session:  # let the lock run out
        await session.execute(
            update(Recipient).where(Recipient.email == CLIENT).values(locked_until=utcnow())
        )

    page = await portal.post("/access/sign-in", {"passphrase": "wrong again"}, page)

    second = (await recipient(portal)).locked_until
    assert page.status_code == 401
    assert second is not None
    assert second - utcnow() > timedelta(seconds=100)  # 2 minutes now, not 1


async def test_one_address_is_throttled_across_recipients(portal: Portal) -> None:
    portal.services.portal.recipients.throttle = AddressThrottle(max_failures=3)
    sent = await portal.send()
    await portal.set_up(sent)
    portal.client.cookies.clear()
    page = await portal.open(sent.token)
    for attempt in range(3):
        page = await portal.post("/access/sign-in", {"passphrase": f"wrong {attempt}"}, page)

    throttled = await portal.post("/access/sign-in", {"passphrase": GOOD}, page)

    assert throttled.status_code == 429
    assert "Too many attempts" in throttled.text
    assert ("login.failed", "throttled") in await actions(portal)


# ---------------------------------------------------------------- CSRF


async def test_access_forms_refuse_a_missing_or_wrong_csrf_token(portal: Portal) -> None:
    sent = await portal.send()
    page = await portal.open(sent.token)

    missing = await portal.client.post("/access/consent", data={"agree": "yes"})
    wrong = await portal.client.post("/access/consent", data={"agree": "yes", "csrf": "0" * 64})

    for response in (missing, wrong):
        assert response.status_code == 400
        assert "did not act on it" in response.text
        assert "Before you start" in response.text  # the same form, redrawn
        assert csrf_of(response) == csrf_of(page)
    assert (await recipient(portal)).consent_at is None
    assert [a for a in await actions(portal) if a[0] == "csrf.failed"] == [
        ("csrf.failed", "refused"),
        ("csrf.failed", "refused"),
    ]


async def test_a_token_from_another_session_is_refused(portal: Portal) -> None:
    sent = await portal.send()
    other = await portal.open(sent.token)
    stolen = csrf_of(other)
    portal.client.cookies.clear()
    await portal.open(sent.token)

    response = await portal.client.post("/access/consent", data={"agree": "yes", "csrf": stolen})

    assert response.status_code == 400


async def test_posting_without_a_session_gets_the_signed_out_page(portal: Portal) -> None:
    response = await portal.client.post("/access/sign-in", data={"passphrase": GOOD})
    assert response.status_code == 401
    assert "open the link in the email" in response.text
