"""How a client gets in: the link, the first-access code, consent, the passphrase.

Promises:

* :meth:`RecipientAccess.open_link` finds a delivery by the SHA-256 of its
  token and audits ``link.opened`` whatever the outcome (``ok``,
  ``unknown``, ``withdrawn``, ``expired``). A withdrawn message's link says
  so (:class:`LinkWithdrawn`: the practice withdrew it, nothing more);
  unknown and expired links learn only "no", so they look the same.
* First visit: the first-access code if staff set one, then consent
  (``consent.given``, once per recipient), then a passphrase of adequate
  strength (:mod:`escrow.strength`; ``passphrase.set``). Later visits: the
  passphrase. Each success that proves the passphrase ends the link session
  and starts a new ``full`` one in the same transaction (``login.ok``).
* Passphrases and codes are checked with Argon2id off the event loop, a
  bounded number at a time (:class:`escrow.passwords.SecretHasher`); a stale
  hash is replaced on success. Failures (``login.failed``) are
  counted per recipient and per remote address (:mod:`escrow.lockout`);
  reaching the limit locks the recipient (``recipient.locked``). While
  locked, or while the address is throttled, nothing is checked and even
  the right passphrase is refused. The lock is re-read after the (slow)
  check, so guesses that raced past it are refused too.
* A forgotten passphrase is reset by staff only (:meth:`reset`), never by
  mail. Content is sealed to the vault key, not to the passphrase, so old
  messages stay readable with the new one.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from escrow.audit import Actor, Audit, EventSpec
from escrow.availability import availability
from escrow.db import Database
from escrow.errors import NotFound
from escrow.links import token_hash
from escrow.lockout import AddressThrottle, is_locked, lock_delay
from escrow.models import Delivery, Message, Recipient, utcnow
from escrow.passwords import MAX_SECRET_CHARS, Check, SecretHasher
from escrow.sessions import SessionStore, SessionView, Started
from escrow.settings import Settings
from escrow.strength import Judgement, judge

_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{20,100}")

DEFAULT_CONSENT = (
    "Before you read your first message, please know how this service works.\n\n"
    "Messages from {practice} are kept encrypted on a server the practice runs. "
    "You read them here, in your web browser, after signing in with a passphrase only you know.\n\n"
    "Email and the internet are never completely private. Someone who can use your device, "
    "your email account or your passphrase may be able to read what is here. Use a device "
    "you trust, do not share your passphrase, and sign out when you finish.\n\n"
    "This service is not for emergencies. If you are in danger or in crisis, call your local "
    "emergency number.\n\n"
    "You can stop using secure messages at any time: just tell {practice}."
)


class Step(StrEnum):
    CODE = "code"
    CONSENT = "consent"
    CHOOSE = "choose"
    SIGN_IN = "sign_in"
    DONE = "done"


class Outcome(StrEnum):
    OK = "ok"
    WRONG = "wrong"
    LOCKED = "locked"
    THROTTLED = "throttled"


@dataclass(frozen=True)
class LinkTarget:
    delivery_id: str
    message_id: str
    recipient_id: str


@dataclass(frozen=True)
class LinkWithdrawn:
    """A real link whose message the practice withdrew: no ids, no subject, no date."""


@dataclass(frozen=True)
class RecipientState:
    id: str
    email: str
    display_name: str
    has_passphrase: bool
    needs_code: bool
    consent_given: bool
    locked_until: datetime | None


@dataclass(frozen=True)
class Attempt:
    """The result of giving a code or a passphrase; ``started`` is the new full session."""

    outcome: Outcome
    locked_until: datetime | None = None
    started: Started | None = None


def next_step(state: RecipientState, stage: str) -> Step:
    """What a session at ``stage`` must do next for this recipient."""
    if stage == "full":
        return Step.DONE
    if state.has_passphrase:
        return Step.SIGN_IN
    if state.needs_code and stage != "code":
        return Step.CODE
    if not state.consent_given:
        return Step.CONSENT
    return Step.CHOOSE


def load_consent_text(settings: Settings) -> str:
    """The consent notice: ``ESCROW_CONSENT_TEXT_FILE`` or the built-in plain-language one."""
    path: Path | None = settings.consent_text_file
    if path is not None:
        return path.read_text(encoding="utf-8").strip()
    return DEFAULT_CONSENT.format(practice=settings.practice_name)


def _state_or_none(row: Recipient | None) -> RecipientState | None:
    return None if row is None else _state(row)


def _stored_secret(row: Recipient | None, step: str) -> str | None:
    """The hash a ``step`` ("code" or "passphrase") is checked against."""
    if row is None:
        return None
    return row.access_code_hash if step == "code" else row.passphrase_hash


def _state(row: Recipient) -> RecipientState:
    return RecipientState(
        id=row.id,
        email=row.email,
        display_name=row.display_name,
        has_passphrase=row.passphrase_hash is not None,
        needs_code=row.access_code_hash is not None,
        consent_given=row.consent_at is not None,
        locked_until=row.locked_until,
    )


class RecipientAccess:
    """Link, code, consent, passphrase and lockout rules for recipients."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        audit: Audit,
        hasher: SecretHasher,
        sessions: SessionStore,
        throttle: AddressThrottle | None = None,
    ) -> None:
        self._settings = settings
        self._db = db
        self._audit = audit
        self._hasher = hasher
        self._sessions = sessions
        self.throttle = throttle or AddressThrottle()
        self.consent_text = load_consent_text(settings)

    # ------------------------------------------------------------ link and state

    async def open_link(self, token: str, actor: Actor) -> LinkTarget | LinkWithdrawn | None:
        """The delivery a usable link points to, LinkWithdrawn, or None (unknown, expired). Audited."""
        digest = token_hash(token) if _TOKEN_SHAPE.fullmatch(token) else None
        return await self._db.run_write(lambda session: self._open_link(session, digest, actor))

    def _open_link(
        self, session: Session, digest: str | None, actor: Actor
    ) -> LinkTarget | LinkWithdrawn | None:
        now = utcnow()
        row = None
        if digest is not None:
            row = session.execute(
                select(Delivery, Message)
                .join(Message, Message.id == Delivery.message_id)
                .where(Delivery.token_hash == digest)
            ).first()
        if row is None:
            self._audit.append(session, [EventSpec("link.opened", actor, outcome="unknown")])
            return None
        delivery, message = row
        state = availability(delivery, message, now)
        who = Actor("recipient", delivery.recipient_id, actor.remote_addr, actor.user_agent)
        self._audit.append(
            session,
            [
                EventSpec(
                    "link.opened",
                    who,
                    message_id=message.id,
                    delivery_id=delivery.id,
                    outcome="ok" if state == "available" else state,
                )
            ],
        )
        if state == "withdrawn":
            return LinkWithdrawn()
        if state != "available":
            return None
        if delivery.opened_at is None:
            delivery.opened_at = now
        if delivery.status in ("queued", "notified"):
            delivery.status = "opened"
        return LinkTarget(delivery.id, message.id, delivery.recipient_id)

    async def state(self, recipient_id: str) -> RecipientState:
        """The recipient's access state; raises :class:`NotFound` if there is no such recipient."""
        state = await self._db.run_read(
            lambda session: _state_or_none(session.get(Recipient, recipient_id))
        )
        if state is None:
            raise NotFound("no such recipient")
        return state

    # ------------------------------------------------------------ first visit

    async def give_consent(self, view: SessionView, actor: Actor) -> None:
        """Record the recipient's acknowledgement of the consent notice (once; audited)."""
        async with self._db.write() as session:
            row = await session.get(Recipient, view.principal_id)
            if row is None or row.consent_at is not None:
                return
            row.consent_at = utcnow()
            await self._audit.record(session, "consent.given", actor, delivery_id=view.delivery_id)

    async def judge(self, passphrase: str, confirmation: str, state: RecipientState) -> Judgement:
        """:func:`escrow.strength.judge` in a worker thread (zxcvbn takes a few milliseconds)."""
        inputs = [state.email, state.display_name, self._settings.practice_name]
        return await asyncio.to_thread(judge, passphrase, confirmation, inputs)

    async def choose_passphrase(
        self, view: SessionView, passphrase: str, actor: Actor
    ) -> Started | None:
        """Set the first passphrase and sign in; None if one was set meanwhile (then sign in).

        The caller has judged the passphrase. The first-access code is spent:
        it is cleared with the same write (staff can set a new one after a reset).
        """
        digest = await self._hasher.hash(passphrase)
        return await self._db.run_write(
            lambda session: self._choose_passphrase(session, view, digest, actor)
        )

    def _choose_passphrase(
        self, session: Session, view: SessionView, digest: str, actor: Actor
    ) -> Started | None:
        changed = session.execute(
            update(Recipient)
            .where(Recipient.id == view.principal_id, Recipient.passphrase_hash.is_(None))
            .values(
                passphrase_hash=digest,
                passphrase_set_at=utcnow(),
                access_code_hash=None,
                failed_attempts=0,
                locked_until=None,
            )
        )
        if changed.rowcount != 1:  # type: ignore[attr-defined]
            return None
        spec = EventSpec("passphrase.set", actor, delivery_id=view.delivery_id)
        return self._promote(session, view, actor, first=True, before=[spec])

    def _promote(
        self,
        session: Session,
        view: SessionView,
        actor: Actor,
        *,
        first: bool = False,
        before: Sequence[EventSpec] = (),
    ) -> Started:
        """End the link session, start a full one and audit ``login.ok`` (after ``before``)."""
        self._sessions.end_sync(session, view.id)
        started = self._sessions.start_in(
            session,
            "recipient",
            view.principal_id,
            stage="full",
            actor=actor,
            delivery_id=view.delivery_id,
        )
        login = EventSpec("login.ok", actor, delivery_id=view.delivery_id, detail={"first": first})
        self._audit.append(session, [*before, login])
        return started

    # ------------------------------------------------------------ codes and passphrases

    async def check_code(self, view: SessionView, code: str, actor: Actor) -> Attempt:
        """Check the first-access code; on success the session moves to stage ``code``."""
        attempt = await self._attempt(view, code.strip(), actor, step="code")
        if attempt.outcome is Outcome.OK:
            await self._sessions.advance(view.id, "code")
        return attempt

    async def sign_in(self, view: SessionView, passphrase: str, actor: Actor) -> Attempt:
        """Check the passphrase; on success ``attempt.started`` is a new full session."""
        return await self._attempt(view, passphrase, actor, step="passphrase")

    async def _attempt(self, view: SessionView, secret: str, actor: Actor, *, step: str) -> Attempt:
        address = actor.remote_addr
        if self.throttle.blocked(address):
            await self._refused(view, actor, step, "throttled")
            return Attempt(Outcome.THROTTLED)
        state = await self.state(view.principal_id)
        now = utcnow()
        if is_locked(state.locked_until, now):
            await self._refused(view, actor, step, "locked")
            return Attempt(Outcome.LOCKED, state.locked_until)
        stored = await self._db.run_read(
            lambda session: _stored_secret(session.get(Recipient, view.principal_id), step)
        )
        check = await self._hasher.check(stored, secret[: MAX_SECRET_CHARS + 1])
        attempt, wrong = await self._db.run_write(
            lambda session: self._settle(session, view, check, actor, step)
        )
        if wrong:
            self.throttle.failed(address)
        return attempt

    def _settle(
        self, session: Session, view: SessionView, check: Check, actor: Actor, step: str
    ) -> tuple[Attempt, bool]:
        """Record a checked secret; True if it was a counted wrong guess.

        The lock is re-read, so a guess that raced past it is refused.
        """
        query = select(Recipient).where(Recipient.id == view.principal_id)
        if self._db.dialect == "postgresql":
            query = query.with_for_update()
        fresh = session.scalars(query).one()
        now = utcnow()
        if is_locked(fresh.locked_until, now):
            # Locked while we were checking: the answer is "locked", right or wrong.
            spec = EventSpec(
                "login.failed",
                actor,
                delivery_id=view.delivery_id,
                outcome="locked",
                detail={"step": step},
            )
            self._audit.append(session, [spec])
            return Attempt(Outcome.LOCKED, fresh.locked_until), False
        if check.ok:
            fresh.failed_attempts = 0
            fresh.locked_until = None
            if step == "code":
                spec = EventSpec("access_code.ok", actor, delivery_id=view.delivery_id)
                self._audit.append(session, [spec])
                return Attempt(Outcome.OK), False
            if check.new_hash is not None:
                fresh.passphrase_hash = check.new_hash
            return Attempt(Outcome.OK, started=self._promote(session, view, actor)), False
        fresh.failed_attempts += 1
        events = [
            EventSpec(
                "login.failed",
                actor,
                delivery_id=view.delivery_id,
                outcome="wrong",
                detail={"step": step, "failures": fresh.failed_attempts},
            )
        ]
        delay = lock_delay(fresh.failed_attempts)
        if delay is not None:
            fresh.locked_until = now + delay
            events.append(
                EventSpec(
                    "recipient.locked",
                    actor,
                    delivery_id=view.delivery_id,
                    detail={
                        "failures": fresh.failed_attempts,
                        "seconds": int(delay.total_seconds()),
                    },
                )
            )
        self._audit.append(session, events)
        if delay is not None:
            return Attempt(Outcome.LOCKED, now + delay), True
        return Attempt(Outcome.WRONG), True

    async def _refused(self, view: SessionView, actor: Actor, step: str, outcome: str) -> None:
        spec = EventSpec(
            "login.failed",
            actor,
            delivery_id=view.delivery_id,
            outcome=outcome,
            detail={"step": step},
        )
        await self._db.run_write(lambda session: self._audit.append(session, [spec]))

    # ------------------------------------------------------------ staff operations

    async def _by_email(self, session: AsyncSession, email: str) -> Recipient:
        address = email.strip().lower()
        row = (await session.scalars(select(Recipient).where(Recipient.email == address))).first()
        if row is None:
            raise NotFound(f"no recipient with the address {address}")
        return row

    async def reset(self, email: str, actor: Actor) -> Recipient:
        """Clear the passphrase and any lock, and end the recipient's sessions (audited).

        The next link asks for a new passphrase (after a first-access code, if
        staff set one with :meth:`set_code`). Messages stay readable.
        """
        async with self._db.write() as session:
            row = await self._by_email(session, email)
            row.passphrase_hash = None
            row.passphrase_set_at = None
            row.failed_attempts = 0
            row.locked_until = None
            ended = await self._sessions.end_all_in(session, "recipient", row.id)
            await self._audit.record(
                session,
                "recipient.reset",
                actor,
                detail={"recipient_id": row.id, "sessions_ended": ended},
            )
        return row

    async def set_code(self, email: str, code: str, actor: Actor) -> Recipient:
        """Require ``code`` before the recipient chooses a passphrase (audited, never logged)."""
        code = code.strip()
        if not 4 <= len(code) <= 64:
            raise ValueError("a first-access code must be 4 to 64 characters")
        digest = await self._hasher.hash(code)
        async with self._db.write() as session:
            row = await self._by_email(session, email)
            row.access_code_hash = digest
            await self._audit.record(
                session, "recipient.code_set", actor, detail={"recipient_id": row.id}
            )
        return row

    async def unlock(self, email: str, actor: Actor) -> Recipient:
        """Lift a lock after failed attempts and clear the count (audited)."""
        async with self._db.write() as session:
            row = await self._by_email(session, email)
            row.failed_attempts = 0
            row.locked_until = None
            await self._audit.record(
                session, "recipient.unlocked", actor, detail={"recipient_id": row.id}
            )
        return row
