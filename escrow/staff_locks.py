"""Staff rows for a check, and the failure count that locks them.

Shared by console sign-in (:mod:`escrow.staff_security`) and SMTP AUTH
(:mod:`escrow.app_passwords`). The lock follows :mod:`escrow.lockout`, as for
recipients: after :data:`~escrow.lockout.LOCK_AFTER_FAILURES` consecutive
failures the account is locked, each further failure doubles the lock, and
only a complete sign-in or staff (``escrow staff unlock``) clears the count.
Updates happen on the row read with :func:`staff_for_update`, so concurrent
attempts on PostgreSQL queue on the row lock (SQLite has one writer anyway).
"""

from __future__ import annotations

import dataclasses
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from escrow.audit import Actor, Audit
from escrow.db import Database
from escrow.lockout import lock_delay
from escrow.models import Staff


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
