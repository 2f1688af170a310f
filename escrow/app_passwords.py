"""SMTP app passwords: one named, revocable password per mail client.

Mail clients cannot ask for a second factor, so once a staff member has one
their account password stops working for SMTP and app passwords take its
place. Each is about 83 random bits (``abcd-efgh-ijkl-mnop``), shown once and
stored only as an Argon2id hash; AUTH checks the presented password against
each live one in the hasher's bounded worker threads, so at most
:data:`MAX_LIVE_APP_PASSWORDS` may be live per staff member to keep that cost
bounded. Names are chosen by staff ("iPhone") and are audited; secrets never.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from escrow import totp
from escrow.audit import Actor, Audit
from escrow.db import Database
from escrow.errors import StaffError
from escrow.lockout import is_locked
from escrow.models import AppPassword, Staff, utcnow
from escrow.passwords import SecretHasher
from escrow.staff import normalise_address
from escrow.staff_locks import (
    RepeatedPasswords,
    as_staff,
    count_failure,
    find_staff,
    staff_for_update,
)

# Every AUTH may check each live app password: this keeps its cost bounded.
MAX_LIVE_APP_PASSWORDS = 20
MAX_APP_PASSWORD_NAME_CHARS = 100


@dataclass(frozen=True)
class AppPasswordInfo:
    """An app password as staff see it (never its secret)."""

    id: str
    name: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @property
    def live(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class SmtpLogin:
    """A successful SMTP AUTH: who, and which app password (None: the account password)."""

    staff: Staff
    app_password_name: str | None


def _info(row: AppPassword) -> AppPasswordInfo:
    return AppPasswordInfo(row.id, row.name, row.created_at, row.last_used_at, row.revoked_at)


class AppPasswords:
    """Creates, lists and revokes app passwords, and checks SMTP AUTH credentials."""

    def __init__(self, db: Database, hasher: SecretHasher, audit: Audit) -> None:
        self._db = db
        self._hasher = hasher
        self._audit = audit
        self._repeated = RepeatedPasswords()

    async def create(
        self, staff_id: str, name: str, *, actor: Actor
    ) -> tuple[AppPasswordInfo, str]:
        """A new app password for SMTP; returns its description and the secret (show it once).

        ``name`` (1 to 100 characters) must differ from the staff member's other
        live app passwords, and at most :data:`MAX_LIVE_APP_PASSWORDS` may be
        live; :class:`StaffError` otherwise. Audits ``staff.app_password_created``
        with the name (never the secret).
        """
        label = " ".join(name.split())
        if not 1 <= len(label) <= MAX_APP_PASSWORD_NAME_CHARS:
            raise StaffError(
                f"an app password needs a name of 1 to {MAX_APP_PASSWORD_NAME_CHARS} characters"
            )
        secret = totp.new_app_password()
        secret_hash = await self._hasher.hash(totp.normalise_code(secret))
        async with self._db.write() as session:
            staff = await staff_for_update(session, self._db, staff_id)
            if staff is None or staff.disabled:
                raise StaffError("no such staff account, or it is disabled")
            live = await self._live(session, staff_id)
            if any(row.name.casefold() == label.casefold() for row in live):
                raise StaffError(f"there is already an app password named {label!r}")
            if len(live) >= MAX_LIVE_APP_PASSWORDS:
                raise StaffError(
                    f"at most {MAX_LIVE_APP_PASSWORDS} app passwords may be in use; revoke one first"
                )
            row = AppPassword(
                staff_id=staff_id, name=label, secret_hash=secret_hash, created_at=utcnow()
            )
            session.add(row)
            await session.flush()
            await self._audit.record(
                session,
                "staff.app_password_created",
                actor,
                detail={"staff_id": staff_id, "app_password_id": row.id, "name": label},
            )
        return _info(row), secret

    async def list_for(self, staff_id: str) -> list[AppPasswordInfo]:
        """The staff member's app passwords, live and revoked, newest first."""
        async with self._db.read() as session:
            rows = (
                await session.scalars(
                    select(AppPassword)
                    .where(AppPassword.staff_id == staff_id)
                    .order_by(AppPassword.created_at.desc(), AppPassword.id)
                )
            ).all()
        return [_info(row) for row in rows]

    async def revoke(self, staff_id: str, app_password_id: str, *, actor: Actor) -> None:
        """Revoke one app password at once (SMTP AUTH with it fails from now on).

        Audits ``staff.app_password_revoked``. Raises :class:`StaffError` if it
        is not this staff member's. Revoking a revoked one changes nothing.
        """
        async with self._db.write() as session:
            row = await session.get(AppPassword, app_password_id)
            if row is None or row.staff_id != staff_id:
                raise StaffError("no such app password for this staff member")
            if row.revoked_at is not None:
                return
            row.revoked_at = utcnow()
            await self._audit.record(
                session,
                "staff.app_password_revoked",
                actor,
                detail={"staff_id": staff_id, "app_password_id": row.id, "name": row.name},
            )

    # ------------------------------------------------------------ SMTP AUTH

    async def authenticate(
        self, login: str, password: str, *, actor: Actor, now: datetime | None = None
    ) -> SmtpLogin | None:
        """The staff member these SMTP credentials belong to, or None.

        Accepted: one of the account's live app passwords (its ``last_used_at``
        is updated), or the account password while no second factor is
        enrolled and the account is not locked. Every check runs in the
        hasher's bounded worker threads; an unknown or disabled account costs
        one check. A wrong account password counts toward the account's lock,
        once: the same wrong password again (a mail client retrying a stale
        saved password) is refused without counting again
        (:class:`escrow.staff_locks.RepeatedPasswords`). The caller audits the
        outcome.
        """
        async with self._db.read() as session:
            staff = await find_staff(session, normalise_address(login))
            live: Sequence[AppPassword] = ()
            if staff is not None and not staff.disabled:
                live = await self._live(session, staff.id)
        if staff is None or staff.disabled:
            await self._hasher.check(None, password)
            return None
        moment = now or utcnow()
        account_password = staff.totp_enrolled_at is None and not is_locked(
            staff.locked_until, moment
        )
        normalised = totp.normalise_code(password)
        if totp.looks_like_app_password(normalised):
            # The device used most recently is the likeliest: try it first.
            for row in sorted(live, key=lambda r: r.last_used_at or r.created_at, reverse=True):
                if (await self._hasher.check(row.secret_hash, normalised)).ok:
                    return await self._app_password_used(staff, row, moment)
        if not account_password:
            if not live or not totp.looks_like_app_password(normalised):
                await self._hasher.check(None, password)  # the same cost as a wrong password
            return None
        check = await self._hasher.check(staff.password_hash, password)
        async with self._db.write() as session:
            fresh = await staff_for_update(session, self._db, staff.id)
            moment = now or utcnow()
            if (
                fresh is None
                or fresh.disabled
                or fresh.totp_enrolled_at is not None
                or is_locked(fresh.locked_until, moment)
            ):
                return None
            if check.ok:
                if check.new_hash is not None:
                    fresh.password_hash = check.new_hash
                fresh.failed_logins = 0
                self._repeated.forget(fresh.id)
                return SmtpLogin(fresh, None)
            if self._repeated.seen(fresh.id, password, moment):
                return None
            await count_failure(
                self._audit,
                session,
                fresh,
                as_staff(actor, fresh.id),
                "smtp",
                moment,
                audit_failure=False,
            )
        # Remembered only once the failure is committed: a failed write must not hide it.
        self._repeated.remember(staff.id, password, moment)
        return None

    async def _app_password_used(
        self, staff: Staff, row: AppPassword, moment: datetime
    ) -> SmtpLogin | None:
        async with self._db.write() as session:
            fresh = await session.get(AppPassword, row.id)
            account = await session.get(Staff, staff.id)
            if fresh is None or fresh.revoked_at is not None or account is None or account.disabled:
                return None  # revoked or disabled while we checked it
            fresh.last_used_at = moment
        return SmtpLogin(account, fresh.name)

    @staticmethod
    async def _live(session: AsyncSession, staff_id: str) -> Sequence[AppPassword]:
        return (
            await session.scalars(
                select(AppPassword).where(
                    AppPassword.staff_id == staff_id, AppPassword.revoked_at.is_(None)
                )
            )
        ).all()
