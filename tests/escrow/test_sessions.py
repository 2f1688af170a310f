"""Server-side sessions: hashing, stages, timeouts, ending."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from escrow.audit import Actor
from escrow.models import AuditEvent, WebSession, utcnow
from escrow.services import Services
from escrow.sessions import TOUCH_INTERVAL, session_token_hash

ACTOR = Actor("recipient", "r" * 32, "192.0.2.9", "test")


async def test_a_session_is_found_by_its_token_only(services: Services) -> None:
    store = services.portal.sessions
    started = await store.start("recipient", "r" * 32, stage="link", actor=ACTOR)

    assert (await store.resolve(started.token)).session == started.session
    assert (await store.resolve(started.token + "x")).session is None
    assert (await store.resolve(None)).session is None
    assert (await store.resolve("a" * 500)).session is None
    async with services.db.read() as session:
        row = await session.get(WebSession, started.session.id)
    assert row is not None
    assert row.token_hash == session_token_hash(started.token) != started.token
    assert len(started.token) >= 43


async def test_last_seen_is_refreshed_at_most_every_interval(services: Services) -> None:
    store = services.portal.sessions
    started = await store.start("recipient", "r" * 32, stage="full", actor=ACTOR)
    first = (await store.resolve(started.token)).session
    assert first is not None
    assert (await store.resolve(started.token)).session.last_seen_at == first.last_seen_at  # type: ignore[union-attr]
    async with services.db.write() as session:
        await session.execute(
            update(WebSession)
            .where(WebSession.id == first.id)
            .values(last_seen_at=utcnow() - TOUCH_INTERVAL - timedelta(seconds=1))
        )
    touched = (await store.resolve(started.token)).session
    assert touched is not None and touched.last_seen_at > first.last_seen_at - timedelta(seconds=1)


@pytest.mark.parametrize(
    ("field", "age", "kind"),
    [
        ("last_seen_at", timedelta(minutes=15), "idle"),
        ("created_at", timedelta(hours=8), "absolute"),
    ],
)
async def test_timeouts_end_and_audit_the_session(
    services: Services, field: str, age: timedelta, kind: str
) -> None:
    store = services.portal.sessions
    started = await store.start("recipient", "r" * 32, stage="full", actor=ACTOR)
    async with services.db.write() as session:
        await session.execute(
            update(WebSession)
            .where(WebSession.id == started.session.id)
            .values(**{field: utcnow() - age})
        )

    resolved = await store.resolve(started.token)
    again = await store.resolve(started.token)

    assert resolved.session is None and resolved.expired
    assert again.session is None and not again.expired  # ended: now simply unknown
    async with services.db.read() as session:
        events = (
            await session.scalars(select(AuditEvent).where(AuditEvent.action == "session.expired"))
        ).all()
    assert len(events) == 1
    assert f'"timeout":"{kind}"' in events[0].detail
    assert events[0].actor_id == "r" * 32


async def test_ending_is_immediate_and_audited_once(services: Services) -> None:
    store = services.portal.sessions
    started = await store.start("recipient", "r" * 32, stage="full", actor=ACTOR)

    await store.end(started.session, ACTOR)
    await store.end(started.session, ACTOR)

    assert (await store.resolve(started.token)).session is None
    async with services.db.read() as session:
        logouts = (
            await session.scalars(select(AuditEvent).where(AuditEvent.action == "logout"))
        ).all()
    assert len(logouts) == 1


async def test_the_full_stage_needs_a_new_cookie(services: Services) -> None:
    store = services.portal.sessions
    started = await store.start("recipient", "r" * 32, stage="link", actor=ACTOR)
    await store.advance(started.session.id, "code")
    assert (await store.resolve(started.token)).session.stage == "code"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="full"):
        await store.advance(started.session.id, "full")
