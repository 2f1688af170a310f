"""Server-side sessions: the cookie holds a random value, the database holds the rest.

Promises:

* The cookie value is 32 random bytes; only its SHA-256 is stored
  (:attr:`WebSession.token_hash`), so a copy of the database cannot be
  turned into a working cookie.
* A session ends after ``ESCROW_SESSION_IDLE_MINUTES`` without a request
  (idle timeout) and ``ESCROW_SESSION_MAX_HOURS`` after it began (absolute
  timeout), whichever comes first. An expired session is marked ended and
  ``session.expired`` is audited the first time it is presented again.
* ``last_seen_at`` is refreshed at most every :data:`TOUCH_INTERVAL`, and
  then in the next group commit of :mod:`escrow.accesslog`, so page views
  cost no write of their own; the idle timeout is exact to within that
  interval.
* Ending a session (sign-out, quick exit, staff reset) is immediate and
  server-side: the old cookie stops working at once on every replica.
* A session's stage says how far its holder got: ``link`` (opened a link),
  ``code`` (also gave the first-access code), ``full`` (proved the
  passphrase). Moving to ``full`` always issues a new cookie value
  (:meth:`SessionStore.start_in` after :meth:`SessionStore.end_in`), so a
  value planted before sign-in is worthless after it (session fixation).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from escrow.accesslog import AccessRecorder
from escrow.audit import Actor, Audit
from escrow.db import Database
from escrow.models import WebSession, new_id, utcnow
from escrow.settings import Settings

TOKEN_BYTES = 32
TOUCH_INTERVAL = timedelta(seconds=30)
# Every request's look-up, built once.
_LIVE_BY_TOKEN = select(WebSession).where(
    WebSession.token_hash == bindparam("digest"), WebSession.ended_at.is_(None)
)
# ``mfa``: a staff member proved the password; the second factor is still to come.
STAGES = ("link", "code", "mfa", "full")


def session_token_hash(token: str) -> str:
    """What is stored for a cookie value: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class SessionView:
    """A live session, detached from the database."""

    id: str
    principal_type: str
    principal_id: str
    stage: str
    delivery_id: str | None
    csrf_secret: str
    created_at: datetime
    last_seen_at: datetime

    @property
    def signed_in(self) -> bool:
        return self.stage == "full"


@dataclass(frozen=True)
class Started:
    """A new session and the cookie value that opens it (shown once, never stored)."""

    token: str
    session: SessionView


@dataclass(frozen=True)
class Resolved:
    """What a presented cookie value turned out to be."""

    session: SessionView | None
    expired: bool = False


def _view(row: WebSession) -> SessionView:
    return SessionView(
        id=row.id,
        principal_type=row.principal_type,
        principal_id=row.principal_id,
        stage=row.stage,
        delivery_id=row.delivery_id,
        csrf_secret=row.csrf_secret,
        created_at=row.created_at,
        last_seen_at=row.last_seen_at,
    )


class SessionStore:
    """Starts, resolves, advances and ends server-side sessions."""

    def __init__(
        self, settings: Settings, db: Database, audit: Audit, recorder: AccessRecorder | None = None
    ) -> None:
        self._db = db
        self._audit = audit
        self._recorder = recorder or AccessRecorder(db, audit)
        self.idle = timedelta(minutes=settings.session_idle_minutes)
        self.max_age = timedelta(hours=settings.session_max_hours)

    def is_expired(self, row: WebSession | SessionView, now: datetime) -> bool:
        """True once the idle or the absolute timeout has passed."""
        if now - row.last_seen_at >= self.idle:
            return True
        if now - row.created_at >= self.max_age:
            return True
        return isinstance(row, WebSession) and now >= row.expires_at

    def start_in(
        self,
        session: AsyncSession | Session,
        principal_type: str,
        principal_id: str,
        *,
        stage: str,
        actor: Actor,
        delivery_id: str | None = None,
    ) -> Started:
        """Add a new session to ``session``'s transaction (it exists once the caller commits)."""
        if stage not in STAGES:
            raise ValueError(f"unknown session stage {stage!r}")
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = utcnow()
        row = WebSession(
            id=new_id(),
            token_hash=session_token_hash(token),
            principal_type=principal_type,
            principal_id=principal_id,
            csrf_secret=secrets.token_hex(32),
            stage=stage,
            delivery_id=delivery_id,
            created_at=now,
            last_seen_at=now,
            expires_at=now + self.max_age,
            remote_addr=actor.remote_addr[:64],
            user_agent=actor.user_agent[:300],
        )
        session.add(row)
        return Started(token=token, session=_view(row))

    async def start(
        self,
        principal_type: str,
        principal_id: str,
        *,
        stage: str,
        actor: Actor,
        delivery_id: str | None = None,
    ) -> Started:
        """Start a session in a transaction of its own."""
        return await self._db.run_write(
            lambda session: self.start_in(
                session,
                principal_type,
                principal_id,
                stage=stage,
                actor=actor,
                delivery_id=delivery_id,
            )
        )

    async def resolve(self, token: str | None) -> Resolved:
        """The live session for a cookie value, ending (and auditing) it if it has expired.

        Unknown, ended and malformed values all resolve to no session.
        """
        if not token or len(token) > 128:
            return Resolved(None)
        digest = session_token_hash(token)
        now = utcnow()
        row = await self._db.run_read(
            lambda session: session.scalars(_LIVE_BY_TOKEN, {"digest": digest}).first()
        )
        if row is None:
            return Resolved(None)
        if self.is_expired(row, now):
            await self._expire(row, now)
            return Resolved(None, expired=True)
        if now - row.last_seen_at >= TOUCH_INTERVAL:
            self._recorder.touch(row.id)
            row.last_seen_at = now
        return Resolved(_view(row))

    async def _expire(self, row: WebSession, now: datetime) -> None:
        async with self._db.write() as session:
            ended = await session.execute(
                update(WebSession)
                .where(WebSession.id == row.id, WebSession.ended_at.is_(None))
                .values(ended_at=now)
            )
            if ended.rowcount == 1:  # type: ignore[attr-defined]
                idle = now - row.last_seen_at >= self.idle
                await self._audit.record(
                    session,
                    "session.expired",
                    Actor(row.principal_type, id=row.principal_id),
                    delivery_id=row.delivery_id,
                    detail={"timeout": "idle" if idle else "absolute", "stage": row.stage},
                )

    async def advance(self, session_id: str, stage: str) -> None:
        """Move a live session to a further stage that needs no new cookie (``link`` to ``code``)."""
        if stage not in STAGES or stage == "full":
            raise ValueError("use end_in + start_in to reach the full stage")
        async with self._db.write() as session:
            await session.execute(
                update(WebSession)
                .where(WebSession.id == session_id, WebSession.ended_at.is_(None))
                .values(stage=stage, last_seen_at=utcnow())
            )

    async def end_in(self, session: AsyncSession, session_id: str) -> bool:
        """Mark a session ended inside the caller's transaction; False if it already was."""
        return await session.run_sync(self.end_sync, session_id)

    def end_sync(self, session: Session, session_id: str) -> bool:
        """:meth:`end_in` for a synchronous session (:meth:`Database.run_write`)."""
        result = session.execute(
            update(WebSession)
            .where(WebSession.id == session_id, WebSession.ended_at.is_(None))
            .values(ended_at=utcnow())
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    async def end(
        self,
        view: SessionView,
        actor: Actor,
        *,
        action: str = "logout",
        detail: dict[str, str | int | bool | None] | None = None,
    ) -> None:
        """End ``view`` now and audit ``action`` (``logout`` by default)."""
        async with self._db.write() as session:
            if await self.end_in(session, view.id):
                await self._audit.record(
                    session, action, actor, delivery_id=view.delivery_id, detail=detail
                )

    async def end_all_in(
        self, session: AsyncSession, principal_type: str, principal_id: str
    ) -> int:
        """End every live session of one principal (staff reset); returns how many."""
        return await end_sessions_of(session, principal_type, principal_id)


async def end_sessions_of(session: AsyncSession, principal_type: str, principal_id: str) -> int:
    """End every live session of one principal inside the caller's transaction; how many."""
    result = await session.execute(
        update(WebSession)
        .where(
            WebSession.principal_type == principal_type,
            WebSession.principal_id == principal_id,
            WebSession.ended_at.is_(None),
        )
        .values(ended_at=utcnow())
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
