"""Staff rows for a check, and the failure count that locks them.

Shared by console sign-in (:mod:`escrow.staff_security`) and SMTP AUTH
(:mod:`escrow.app_passwords`). The lock follows :mod:`escrow.lockout`, as for
recipients: after :data:`~escrow.lockout.LOCK_AFTER_FAILURES` consecutive
failures the account is locked, each further failure doubles the lock, and
only a complete sign-in or staff (``escrow staff unlock``) clears the count.
Updates happen on the row read with :func:`staff_for_update`, so concurrent
attempts on PostgreSQL queue on the row lock (SQLite has one writer anyway).

One exception, for SMTP AUTH with the account password: a mail client that
still holds an old password retries it on its own every few minutes, and
counting each retry would lock the staff member out of the console for a
password nobody is typing. :class:`RepeatedPasswords` remembers which wrong
passwords were already counted, so the same wrong password counts once per
account (in this process, for :data:`REPEAT_WINDOW`); every other password
counts as usual, so a guesser gains nothing from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
from collections import OrderedDict
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from escrow.audit import Actor, Audit
from escrow.db import Database
from escrow.lockout import lock_delay
from escrow.models import Staff

REPEAT_WINDOW = timedelta(hours=24)
# Bounded memory: accounts not seen failing for longest are forgotten first.
REPEAT_ACCOUNTS = 10_000
REPEAT_PER_ACCOUNT = 4


class RepeatedPasswords:
    """Wrong passwords already counted against an account, as keyed digests, in memory only.

    The digests are HMAC-SHA256 under a key drawn when the process starts and
    never stored, so nothing here outlives the process or helps guess a
    password offline. A restart forgets everything: a stale password then
    counts once more. By watching when the account locks, an attacker
    could tell whether a guess equals a wrong password already counted there
    (say, the old password a mail client keeps sending); it buys no attempts
    at the current one.
    """

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._seen: OrderedDict[str, dict[bytes, datetime]] = OrderedDict()

    def _digest(self, password: str) -> bytes:
        return hmac.new(
            self._key, password.encode("utf-8", "surrogatepass"), hashlib.sha256
        ).digest()

    def seen(self, staff_id: str, password: str, moment: datetime) -> bool:
        """True if this wrong password was counted for ``staff_id`` within the window."""
        counted = self._seen.get(staff_id, {}).get(self._digest(password))
        return counted is not None and moment - counted < REPEAT_WINDOW

    def remember(self, staff_id: str, password: str, moment: datetime) -> None:
        """Note that this wrong password has been counted for ``staff_id``."""
        entries = self._seen.pop(staff_id, {})
        entries = {d: at for d, at in entries.items() if moment - at < REPEAT_WINDOW}
        entries[self._digest(password)] = moment
        while len(entries) > REPEAT_PER_ACCOUNT:
            del entries[min(entries, key=entries.__getitem__)]
        self._seen[staff_id] = entries
        while len(self._seen) > REPEAT_ACCOUNTS:
            self._seen.popitem(last=False)

    def forget(self, staff_id: str) -> None:
        """Drop what is remembered for ``staff_id`` (after a successful sign-in)."""
        self._seen.pop(staff_id, None)


def as_staff(actor: Actor, staff_id: str) -> Actor:
    """``actor`` named as the staff member, when the caller did not know who it was yet."""
    return actor if actor.id else dataclasses.replace(actor, id=staff_id)


async def find_staff(session: AsyncSession, address: str) -> Staff | None:
    """The staff account with this (normalised) address, or None."""
    return (await session.scalars(select(Staff).where(func.lower(Staff.email) == address))).first()


async def staff_for_update(session: AsyncSession, db: Database, staff_id: str) -> Staff | None:
    """The staff row, locked until ``session`` ends (on PostgreSQL), or None."""
    query = select(Staff).where(Staff.id == staff_id)
    if db.dialect == "postgresql":
        query = query.with_for_update()
    return (await session.scalars(query)).first()


async def count_failure(
    audit: Audit,
    session: AsyncSession,
    staff: Staff,
    actor: Actor,
    step: str,
    moment: datetime,
    *,
    audit_failure: bool = True,
) -> datetime | None:
    """Count one failed attempt on ``staff`` (a row from :func:`staff_for_update`).

    Audits ``staff.login_failed`` (unless the caller audits its own event) and,
    when the count reaches a lock, ``staff.locked``. Returns the lock's end, if
    this failure locked the account.
    """
    staff.failed_logins = (staff.failed_logins or 0) + 1
    if audit_failure:
        await audit.record(
            session,
            "staff.login_failed",
            actor,
            outcome="denied",
            detail={"step": step, "failures": staff.failed_logins},
        )
    delay = lock_delay(staff.failed_logins)
    if delay is None:
        return None
    staff.locked_until = moment + delay
    await audit.record(
        session,
        "staff.locked",
        actor,
        detail={
            "staff_id": staff.id,
            "failures": staff.failed_logins,
            "seconds": int(delay.total_seconds()),
        },
    )
    return staff.locked_until
