"""Sessions over HTTP: timeouts, sign-out, quick exit, and what an ended cookie can do."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from escrow.models import AuditEvent, WebSession, utcnow
from escrow.sessions import session_token_hash
from tests.web.helpers import Portal, csrf_of


async def _age(portal: Portal, token: str | None = None, **fields: object) -> None:
    token = token or portal.client.cookies["escrow_session"]
    async with portal.services.db.write() as session:
        await session.execute(
            update(WebSession)
            .where(WebSession.token_hash == session_token_hash(token))
            .values(**fields)
        )


async def _audited(portal: Portal, action: str) -> list[AuditEvent]:
    async with portal.services.db.read() as session:
        return list(
            (await session.scalars(select(AuditEvent).where(AuditEvent.action == action))).all()
        )


async def test_the_cookie_value_is_stored_only_as_a_hash(portal: Portal) -> None:
    sent = await portal.send()
    await portal.set_up(sent)
    token = portal.client.cookies["escrow_session"]

    async with portal.services.db.read() as session:
        rows = (await session.scalars(select(WebSession))).all()

    assert all(row.token_hash != token for row in rows)
    assert [row.stage for row in rows if row.ended_at is None] == ["full"]
    live = next(row for row in rows if row.ended_at is None)
    assert live.token_hash == session_token_hash(token)
    assert live.delivery_id == sent.delivery_id


async def test_idle_timeout_ends_the_session(portal: Portal) -> None:
    sent = await portal.send()
    await portal.set_up(sent)
    assert (await portal.client.get("/inbox")).status_code == 200
    token = portal.client.cookies["escrow_session"]

    await _age(portal, last_seen_at=utcnow() - timedelta(minutes=16))
    response = await portal.client.get("/inbox")

    assert response.status_code == 401
    assert "You were signed out" in response.text
    assert "Notes from our session" not in response.text
    events = await _audited(portal, "session.expired")
    assert len(events) == 1 and '"timeout":"idle"' in events[0].detail
    # Ended for good: a fresh last_seen_at does not bring it back.
    assert "escrow_session" not in portal.client.cookies  # the dead cookie was cleared
    await _age(portal, token, last_seen_at=utcnow())
    portal.client.cookies.set("escrow_session", token)
    assert (await portal.client.get("/inbox")).status_code == 401


async def test_absolute_timeout_ends_an_active_session(portal: Portal) -> None:
    sent = await portal.send()
    await portal.set_up(sent)

    await _age(portal, created_at=utcnow() - timedelta(hours=8, seconds=1))
    response = await portal.client.get(f"/messages/{sent.message_id}")

    assert response.status_code == 401
    events = await _audited(portal, "session.expired")
    assert len(events) == 1 and '"timeout":"absolute"' in events[0].detail


async def test_logout_ends_the_session_on_the_server(portal: Portal) -> None:
    sent = await portal.send()
    page = await portal.set_up(sent)
    old = portal.client.cookies["escrow_session"]

    response = await portal.client.post("/logout", data={"csrf": csrf_of(page)})

    assert response.status_code == 303
    assert response.headers["location"] == "/signed-out"
    assert '"cache"' in response.headers["clear-site-data"]
    assert "escrow_session=" in response.headers["set-cookie"]
    assert "escrow_session" not in portal.client.cookies
    assert "You have signed out" in (await portal.client.get("/signed-out")).text
    portal.client.cookies.set("escrow_session", old)
    replay = await portal.client.get(f"/messages/{sent.message_id}")
    assert replay.status_code == 401
    assert "Notes from our session" not in replay.text
    assert len(await _audited(portal, "logout")) == 1


async def test_logout_with_a_bad_token_does_not_sign_out_but_offers_a_fresh_button(
    portal: Portal,
) -> None:
    sent = await portal.send()
    await portal.set_up(sent)

    response = await portal.client.post("/logout", data={"csrf": "f" * 64})

    assert response.status_code == 400
    assert "Sign out now" in response.text
    assert (await portal.client.get("/inbox")).status_code == 200
    retry = await portal.client.post("/logout", data={"csrf": csrf_of(response)})
    assert retry.status_code == 303


async def test_quick_exit_ends_the_session_and_leaves_for_the_exit_url(portal: Portal) -> None:
    sent = await portal.send()
    page = await portal.set_up(sent)
    assert 'action="/exit"' in page.text and "Quick exit" in page.text
    exit_url = portal.services.settings.quick_exit_url

    response = await portal.client.post("/exit", data={"csrf": csrf_of(page)})

    assert response.status_code == 200
    assert response.headers["refresh"] == f"0; url={exit_url}"
    assert f'content="0; url={exit_url}"' in response.text
    assert "Riverside" not in response.text  # nothing on the way out says where you were
    assert (await portal.client.get("/inbox")).status_code == 401
    events = await _audited(portal, "logout")
    assert len(events) == 1 and '"quick_exit":true' in events[0].detail


async def test_quick_exit_works_even_with_a_stale_token(portal: Portal) -> None:
    sent = await portal.send()
    await portal.set_up(sent)

    response = await portal.client.post("/exit", data={})

    assert response.status_code == 200
    assert "refresh" in response.headers
    assert (await portal.client.get("/inbox")).status_code == 401
    assert [e.outcome for e in await _audited(portal, "csrf.failed")] == ["ignored"]


async def test_signed_in_pages_need_a_session(portal: Portal) -> None:
    sent = await portal.send()
    for path in ("/inbox", f"/messages/{sent.message_id}", "/activity"):
        response = await portal.client.get(path)
        assert response.status_code == 401, path
        assert "You are not signed in" in response.text
    stray = await portal.client.post(f"/messages/{sent.message_id}/reply", data={"text": "hello"})
    assert stray.status_code == 401


async def test_a_link_session_cannot_read_before_signing_in(portal: Portal) -> None:
    sent = await portal.send()
    await portal.open(sent.token)

    response = await portal.client.get(f"/messages/{sent.message_id}")

    assert response.status_code == 303
    assert response.headers["location"] == "/access"


async def test_following_the_link_again_while_signed_in_goes_straight_to_the_message(
    portal: Portal,
) -> None:
    sent = await portal.send()
    await portal.set_up(sent)
    before = portal.client.cookies["escrow_session"]

    response = await portal.client.get(f"/m/{sent.token}")

    assert response.status_code == 303
    assert response.headers["location"] == f"/messages/{sent.message_id}"
    assert portal.client.cookies["escrow_session"] == before
