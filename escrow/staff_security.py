"""Staff sign-in with a second factor, and SMTP app passwords.

* Console sign-in is the account password, then a TOTP code (or a one-time
  recovery code) when a second factor is enrolled. Admins must enrol one;
  other staff too unless ``ESCROW_STAFF_REQUIRE_TOTP=false``.
* Failed attempts (password or code) are counted per staff account, in the
  database, with the growing lock of :mod:`escrow.lockout`. While locked even
  the right password is refused; a complete sign-in or :meth:`unlock` clears it.
* SMTP AUTH takes a staff member's live app passwords (named, revocable, one
  per mail client), and the account password only while no second factor is
  enrolled (mail clients cannot ask for a code).
* TOTP secrets are sealed with the vault key; recovery codes and app
  passwords are stored only as Argon2id hashes, checked in bounded worker
  threads. No secret, code or password is ever logged or audited.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from escrow import totp
from escrow.app_passwords import (
    MAX_APP_PASSWORD_NAME_CHARS,
    MAX_LIVE_APP_PASSWORDS,
    AppPasswordInfo,
    AppPasswords,
    SmtpLogin,
)
from escrow.audit import Actor, Audit
from escrow.db import Database
from escrow.errors import StaffError
from escrow.lockout import is_locked
from escrow.logs import mask_address
from escrow.models import RecoveryCode, Staff, utcnow
from escrow.passwords import SecretHasher
from escrow.sessions import end_sessions_of
from escrow.settings import Settings
from escrow.staff import normalise_address
from escrow.staff_locks import as_staff, count_failure, find_staff, staff_for_update
from escrow.vault import Vault

__all__ = [
    "MAX_APP_PASSWORD_NAME_CHARS",
    "MAX_LIVE_APP_PASSWORDS",
    "AppPasswordInfo",
    "ConsoleSignIn",
    "SmtpLogin",
    "StaffSecurity",
]

SignInOutcome = Literal["ok", "second_factor", "enrol", "failed", "locked"]
FactorOutcome = Literal["ok", "failed", "locked"]


@dataclass(frozen=True)
class ConsoleSignIn:
    """The answer to a console sign-in; ``staff`` is set for ok, second_factor and enrol."""

    outcome: SignInOutcome
    staff: Staff | None
    locked_until: datetime | None = None


class StaffSecurity:
    """Second factor, lockout and app passwords for staff accounts."""

    def __init__(
        self, settings: Settings, db: Database, hasher: SecretHasher, audit: Audit, vault: Vault
    ) -> None:
        self._settings = settings
        self._db = db
        self._hasher = hasher
        self._audit = audit
        self._vault = vault
        self.app_passwords = AppPasswords(db, hasher, audit)

    # ------------------------------------------------------------ look-ups

    async def find(self, email: str) -> Staff | None:
        """The staff account with this address (any case), or None."""
        async with self._db.read() as session:
            return await find_staff(session, normalise_address(email))

    def second_factor_required(self, staff: Staff) -> bool:
        """Whether ``staff`` must enrol a second factor before the console lets them in."""
        return staff.role == "admin" or self._settings.staff_require_totp

    # ------------------------------------------------------------ console sign-in

    async def sign_in(
        self, email: str, password: str, *, actor: Actor, now: datetime | None = None
    ) -> ConsoleSignIn:
        """Check the account password (never an app password) for the console.

        ``second_factor``: right password, now a code is needed; ``enrol``: right
        password, but a second factor must be enrolled first; ``ok``: signed in
        (audited ``staff.login_ok``). Unknown and disabled accounts fail like a
        wrong password, at the same cost. Failures are audited
        ``staff.login_failed`` and counted toward the account's lock.
        """
        address = normalise_address(email)
        async with self._db.read() as session:
            found = await find_staff(session, address)
        staff = found if found is not None and not found.disabled else None
        moment = now or utcnow()
        if staff is not None and is_locked(staff.locked_until, moment):
            await self._audit.log(
                "staff.login_failed",
                as_staff(actor, staff.id),
                outcome="locked",
                detail={"step": "password"},
            )
            return ConsoleSignIn("locked", None, staff.locked_until)
        check = await self._hasher.check(staff.password_hash if staff else None, password)
        if staff is None:
            await self._audit.log(
                "staff.login_failed",
                actor,
                outcome="denied",
                detail={"step": "password", "login": mask_address(address)},
            )
            return ConsoleSignIn("failed", None)
        async with self._db.write() as session:
            fresh = await staff_for_update(session, self._db, staff.id)
            moment = now or utcnow()
            refused = await self._refusal(session, fresh, actor, "password", moment)
            if refused is not None:
                return refused
            assert fresh is not None
            who = as_staff(actor, fresh.id)
            if not check.ok:
                locked_until = await count_failure(
                    self._audit, session, fresh, who, "password", moment
                )
                if locked_until is not None:
                    return ConsoleSignIn("locked", None, locked_until)
                return ConsoleSignIn("failed", None)
            if check.new_hash is not None:
                fresh.password_hash = check.new_hash
            if fresh.totp_enrolled_at is not None:
                return ConsoleSignIn("second_factor", fresh)
            if self.second_factor_required(fresh):
                return ConsoleSignIn("enrol", fresh)
            await self._signed_in(session, fresh, who, "password", moment)
            return ConsoleSignIn("ok", fresh)

    async def verify_second_factor(
        self, staff_id: str, code: str, *, actor: Actor, now: datetime | None = None
    ) -> FactorOutcome:
        """Check a TOTP code or an unused recovery code, completing a sign-in.

        A TOTP code is accepted one step either side of now, but never for a
        step at or before the last one accepted (no replay). A recovery code
        is spent when it is accepted. Success audits ``staff.login_ok`` and
        clears the failure count; failures count toward the same lock as
        wrong passwords.
        """
        moment = now or utcnow()
        normalised = totp.normalise_code(code)
        async with self._db.read() as session:
            staff = await session.get(Staff, staff_id)
            unused: Sequence[RecoveryCode] = ()
            if staff is not None and totp.looks_like_recovery_code(normalised):
                unused = (
                    await session.scalars(
                        select(RecoveryCode).where(
                            RecoveryCode.staff_id == staff_id, RecoveryCode.used_at.is_(None)
                        )
                    )
                ).all()
        if (
            staff is None
            or staff.disabled
            or staff.totp_secret is None
            or staff.totp_enrolled_at is None
        ):
            await self._audit.log(
                "staff.login_failed",
                as_staff(actor, staff_id),
                outcome="denied",
                detail={"step": "second_factor"},
            )
            return "failed"
        if is_locked(staff.locked_until, moment):
            await self._audit.log(
                "staff.login_failed",
                as_staff(actor, staff_id),
                outcome="locked",
                detail={"step": "second_factor"},
            )
            return "locked"
        step: int | None = None
        recovery_id: str | None = None
        if totp.looks_like_totp(normalised):
            secret = (await self._vault.open(staff.totp_secret)).decode("ascii")
            step = totp.matching_step(secret, normalised, moment, after=staff.totp_last_step)
        for candidate in unused:
            if (await self._hasher.check(candidate.code_hash, normalised)).ok:
                recovery_id = candidate.id
                break
        async with self._db.write() as session:
            fresh = await staff_for_update(session, self._db, staff_id)
            moment = now or utcnow()
            refused = await self._refusal(session, fresh, actor, "second_factor", moment)
            if refused is not None:
                return "locked" if refused.outcome == "locked" else "failed"
            assert fresh is not None
            who = as_staff(actor, fresh.id)
            if (
                step is not None
                and fresh.totp_last_step is not None
                and step <= fresh.totp_last_step
            ):
                step = None  # another request used this code while we checked it
            if recovery_id is not None:
                spent = await session.execute(
                    update(RecoveryCode)
                    .where(RecoveryCode.id == recovery_id, RecoveryCode.used_at.is_(None))
                    .values(used_at=moment)
                )
                if spent.rowcount != 1:  # type: ignore[attr-defined]
                    recovery_id = None
            if step is None and recovery_id is None:
                locked_until = await count_failure(
                    self._audit, session, fresh, who, "second_factor", moment
                )
                return "locked" if locked_until is not None else "failed"
            if step is not None:
                fresh.totp_last_step = step
            await self._signed_in(
                session, fresh, who, "totp" if step is not None else "recovery_code", moment
            )
        return "ok"

    # ------------------------------------------------------------ enrolment

    def new_totp_secret(self) -> str:
        """A fresh base32 TOTP secret (not stored until :meth:`enrol_totp`)."""
        return totp.new_totp_secret()

    def provisioning_uri(self, secret: str, email: str) -> str:
        """The ``otpauth://`` URI for ``secret``, issued by the practice name."""
        return totp.provisioning_uri(secret, email, self._settings.practice_name)

    def qr_svg(self, uri: str) -> str:
        """``uri`` as inline SVG (no XML declaration, no style): safe under a strict CSP."""
        return totp.qr_svg(uri)

    async def enrol_totp(
        self,
        staff_id: str,
        secret: str,
        code: str,
        *,
        actor: Actor,
        now: datetime | None = None,
        replace: bool = False,
        signing_in: bool = False,
    ) -> list[str]:
        """Enrol ``secret`` once ``code`` proves the authenticator has it.

        Seals the secret with the vault key, spends the code's time step,
        replaces the recovery codes with :data:`totp.RECOVERY_CODE_COUNT` new ones
        (returned, to be shown once; stored as Argon2id hashes) and audits
        ``staff.totp_enrolled``. Raises :class:`StaffError` on a wrong code, an
        unknown or disabled account, or (unless ``replace``) one that already
        has a second factor. With ``signing_in`` the enrolment also completes a
        console sign-in in progress (``staff.login_ok``, failure count cleared).
        """
        moment = now or utcnow()
        secret = secret.strip().upper()
        if not totp.is_totp_secret(secret):
            raise StaffError("the second-factor secret is not valid base32")
        step = totp.matching_step(secret, totp.normalise_code(code), moment, after=None)
        if step is None:
            raise StaffError("that code does not match; check the time on your device and retry")
        sealed = await self._vault.seal(secret.encode("ascii"))
        codes = totp.new_recovery_codes()
        # Bounded by the hasher's worker threads, so at most its limit run at once.
        hashes = await asyncio.gather(*(self._hasher.hash(totp.normalise_code(c)) for c in codes))
        async with self._db.write() as session:
            staff = await staff_for_update(session, self._db, staff_id)
            if staff is None or staff.disabled:
                raise StaffError("no such staff account, or it is disabled")
            if staff.totp_enrolled_at is not None and not replace:
                raise StaffError("a second factor is already enrolled; reset it first")
            staff.totp_secret = sealed.ciphertext
            staff.totp_enrolled_at = moment
            staff.totp_last_step = step
            await session.execute(delete(RecoveryCode).where(RecoveryCode.staff_id == staff_id))
            session.add_all(
                RecoveryCode(staff_id=staff_id, code_hash=h, created_at=moment) for h in hashes
            )
            who = as_staff(actor, staff_id)
            await self._audit.record(
                session,
                "staff.totp_enrolled",
                who,
                detail={"staff_id": staff_id, "recovery_codes": len(codes)},
            )
            if signing_in:
                await self._signed_in(session, staff, who, "totp", moment)
        return codes

    async def reset_second_factor(self, staff_id: str, *, actor: Actor) -> None:
        """Remove the second factor and recovery codes (an admin action); audits ``staff.totp_reset``.

        The account's console sessions end with it, and the next sign-in asks to
        enrol again. Raises :class:`StaffError` for an unknown account.
        """
        async with self._db.write() as session:
            staff = await staff_for_update(session, self._db, staff_id)
            if staff is None:
                raise StaffError("no such staff account")
            had = staff.totp_enrolled_at is not None
            staff.totp_secret = None
            staff.totp_enrolled_at = None
            staff.totp_last_step = None
            await session.execute(delete(RecoveryCode).where(RecoveryCode.staff_id == staff_id))
            # A session signed in with the old factor must not outlive it.
            ended = await end_sessions_of(session, "staff", staff_id)
            await self._audit.record(
                session,
                "staff.totp_reset",
                actor,
                detail={"staff_id": staff_id, "had": had, "sessions_ended": ended},
            )

    async def unlock(self, staff_id: str, *, actor: Actor) -> None:
        """Clear the failure count and lock; audits ``staff.unlocked``. StaffError if unknown."""
        async with self._db.write() as session:
            staff = await staff_for_update(session, self._db, staff_id)
            if staff is None:
                raise StaffError("no such staff account")
            staff.failed_logins = 0
            staff.locked_until = None
            await self._audit.record(
                session, "staff.unlocked", actor, detail={"staff_id": staff_id}
            )

    async def recovery_codes_left(self, staff_id: str) -> int:
        """How many unused recovery codes the staff member has."""
        async with self._db.read() as session:
            count = await session.scalar(
                select(func.count())
                .select_from(RecoveryCode)
                .where(RecoveryCode.staff_id == staff_id, RecoveryCode.used_at.is_(None))
            )
        return int(count or 0)

    # ------------------------------------------------------------ app passwords

    async def create_app_password(
        self, staff_id: str, name: str, *, actor: Actor
    ) -> tuple[AppPasswordInfo, str]:
        """A new SMTP app password: its description and the secret (show it once).

        See :meth:`escrow.app_passwords.AppPasswords.create`: names are 1 to 100
        characters and unique among the live ones, at most
        :data:`MAX_LIVE_APP_PASSWORDS` live; :class:`StaffError` otherwise.
        Audits ``staff.app_password_created`` with the name.
        """
        return await self.app_passwords.create(staff_id, name, actor=actor)

    async def list_app_passwords(self, staff_id: str) -> list[AppPasswordInfo]:
        """The staff member's app passwords, live and revoked, newest first."""
        return await self.app_passwords.list_for(staff_id)

    async def revoke_app_password(
        self, staff_id: str, app_password_id: str, *, actor: Actor
    ) -> None:
        """Revoke at once; audits ``staff.app_password_revoked``; StaffError if not theirs."""
        await self.app_passwords.revoke(staff_id, app_password_id, actor=actor)

    async def authenticate_smtp(
        self, login: str, password: str, *, actor: Actor, now: datetime | None = None
    ) -> SmtpLogin | None:
        """SMTP AUTH: a live app password, or the account password while no second factor
        is enrolled (see :meth:`escrow.app_passwords.AppPasswords.authenticate`)."""
        return await self.app_passwords.authenticate(login, password, actor=actor, now=now)

    # ------------------------------------------------------------ internals

    async def _refusal(
        self,
        session: AsyncSession,
        staff: Staff | None,
        actor: Actor,
        step: str,
        moment: datetime,
    ) -> ConsoleSignIn | None:
        """The answer when ``staff`` is gone, disabled or locked (audited), else None."""
        if staff is None or staff.disabled:
            await self._audit.record(
                session, "staff.login_failed", actor, outcome="denied", detail={"step": step}
            )
            return ConsoleSignIn("failed", None)
        if is_locked(staff.locked_until, moment):
            # Locked while we were checking: the answer is "locked", right or wrong.
            await self._audit.record(
                session,
                "staff.login_failed",
                as_staff(actor, staff.id),
                outcome="locked",
                detail={"step": step},
            )
            return ConsoleSignIn("locked", None, staff.locked_until)
        return None

    async def _signed_in(
        self, session: AsyncSession, staff: Staff, actor: Actor, factor: str, moment: datetime
    ) -> None:
        staff.failed_logins = 0
        staff.locked_until = None
        staff.last_login_at = moment
        await self._audit.record(session, "staff.login_ok", actor, detail={"factor": factor})
