"""Staff accounts: practice users who send through SMTP and sign in to the console.

Passwords are Argon2id hashes (:mod:`escrow.passwords`); a stale hash is
replaced on the next successful check. Addresses are stored lower-cased.
Every change is audited.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from escrow.audit import Actor, Audit
from escrow.db import Database
from escrow.errors import StaffError
from escrow.models import Staff, StaffAlias
from escrow.passwords import SecretHasher

MIN_PASSWORD_CHARS = 12


def normalise_address(address: str) -> str:
    return address.strip().lower()


def check_new_password(password: str) -> None:
    """Raise :class:`StaffError` if ``password`` is too weak to set."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise StaffError(f"the password must be at least {MIN_PASSWORD_CHARS} characters")


class StaffDirectory:
    """Creates, lists, disables and authenticates staff accounts."""

    def __init__(self, db: Database, hasher: SecretHasher, audit: Audit) -> None:
        self._db = db
        self._hasher = hasher
        self._audit = audit

    async def add(
        self, email: str, password: str, *, name: str = "", admin: bool = False, actor: Actor
    ) -> Staff:
        """Create an account; raises :class:`StaffError` on a duplicate or weak password."""
        address = normalise_address(email)
        if "@" not in address:
            raise StaffError(f"{email!r} is not a mail address")
        check_new_password(password)
        password_hash = await self._hasher.hash(password)
        try:
            async with self._db.write() as session:
                if await self._find(session, address) is not None:
                    raise StaffError(f"a staff account for {address} already exists")
                staff = Staff(
                    email=address,
                    name=name,
                    role="admin" if admin else "staff",
                    password_hash=password_hash,
                )
                session.add(staff)
                await session.flush()
                await self._audit.record(
                    session, "staff.added", actor, detail={"staff_id": staff.id, "role": staff.role}
                )
        except IntegrityError:
            # Another process added the same address between our check and insert.
            raise StaffError(f"a staff account for {address} already exists") from None
        return staff

    async def list(self) -> Sequence[Staff]:
        async with self._db.read() as session:
            return (await session.scalars(select(Staff).order_by(Staff.email))).all()

    async def disable(self, email: str, *, actor: Actor) -> Staff:
        """Disable an account; its SMTP AUTH and sign-ins stop working at once."""
        async with self._db.write() as session:
            staff = await self._find(session, normalise_address(email))
            if staff is None:
                raise StaffError(f"no staff account for {normalise_address(email)}")
            staff.disabled = True
            await self._audit.record(
                session, "staff.disabled", actor, detail={"staff_id": staff.id}
            )
        return staff

    async def authenticate(self, email: str, password: str) -> Staff | None:
        """The enabled account whose password this is, or None (same cost for unknown accounts)."""
        address = normalise_address(email)
        async with self._db.read() as session:
            staff = await self._find(session, address)
        check = await self._hasher.check(staff.password_hash if staff else None, password)
        if staff is None or not check.ok or staff.disabled:
            return None
        if check.new_hash is not None:
            async with self._db.write() as session:
                fresh = await session.get(Staff, staff.id)
                if fresh is not None:
                    fresh.password_hash = check.new_hash
        return staff

    async def get(self, staff_id: str) -> Staff | None:
        async with self._db.read() as session:
            return await session.get(Staff, staff_id)

    async def sender_allowed(self, staff: Staff, address: str) -> bool:
        """Whether ``staff`` may use ``address`` as envelope sender (own address or alias)."""
        wanted = normalise_address(address)
        if wanted == staff.email:
            return True
        async with self._db.read() as session:
            alias = await session.get(StaffAlias, wanted)
        return alias is not None and alias.staff_id == staff.id

    @staticmethod
    async def _find(session: AsyncSession, address: str) -> Staff | None:
        return (
            await session.scalars(select(Staff).where(func.lower(Staff.email) == address))
        ).first()
