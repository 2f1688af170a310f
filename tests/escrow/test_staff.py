"""Staff accounts: adding, listing, disabling, authenticating, and what is audited."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from escrow.audit import Actor
from escrow.errors import StaffError
from escrow.models import AuditEvent, Staff, StaffAlias
from escrow.passwords import SecretHasher
from escrow.services import Services
from escrow.staff import MIN_PASSWORD_CHARS, StaffDirectory

ADMIN = Actor("operator", id="it-admin", remote_addr="cli")
PASSWORD = "correct horse battery staple"


async def events(services: Services) -> list[AuditEvent]:
    async with services.db.read() as session:
        return list((await session.scalars(select(AuditEvent).order_by(AuditEvent.seq))).all())


async def stored_hash(services: Services, staff_id: str) -> str:
    async with services.db.read() as session:
        staff = await session.get(Staff, staff_id)
        assert staff is not None
        return staff.password_hash


async def test_add_and_list(services: Services) -> None:
    added = await services.staff.add(
        "Dr.Jones@Riverside.Example", PASSWORD, name="Dr Jones", admin=True, actor=ADMIN
    )
    await services.staff.add("amy@riverside.example", PASSWORD, actor=ADMIN)
    assert added.email == "dr.jones@riverside.example"
    assert added.role == "admin"
    assert PASSWORD not in added.password_hash

    listed = await services.staff.list()
    assert [(s.email, s.name, s.role, s.disabled) for s in listed] == [
        ("amy@riverside.example", "", "staff", False),
        ("dr.jones@riverside.example", "Dr Jones", "admin", False),
    ]


async def test_adding_is_audited_without_the_password(services: Services) -> None:
    staff = await services.staff.add("amy@riverside.example", PASSWORD, actor=ADMIN)
    [added] = await events(services)
    assert added.action == "staff.added"
    assert (added.actor_type, added.actor_id, added.remote_addr) == ("operator", "it-admin", "cli")
    assert json.loads(added.detail) == {"staff_id": staff.id, "role": "staff"}
    assert PASSWORD not in added.detail
    assert (await services.audit.verify()).events == 1


async def test_duplicate_address_is_refused_whatever_its_case(services: Services) -> None:
    await services.staff.add("amy@riverside.example", PASSWORD, actor=ADMIN)
    for again in ("amy@riverside.example", " AMY@Riverside.Example "):
        with pytest.raises(StaffError, match="already exists"):
            await services.staff.add(again, PASSWORD + "!", actor=ADMIN)
    assert len(await services.staff.list()) == 1
    assert [e.action for e in await events(services)] == ["staff.added"]


async def test_weak_password_is_refused_and_nothing_is_stored(services: Services) -> None:
    for password in ("", "short", "x" * (MIN_PASSWORD_CHARS - 1)):
        with pytest.raises(StaffError, match="password"):
            await services.staff.add("amy@riverside.example", password, actor=ADMIN)
    assert await services.staff.list() == []
    assert await events(services) == []


async def test_address_without_at_is_refused(services: Services) -> None:
    with pytest.raises(StaffError):
        await services.staff.add("amy.riverside.example", PASSWORD, actor=ADMIN)


async def test_authenticate(services: Services) -> None:
    added = await services.staff.add("amy@riverside.example", PASSWORD, actor=ADMIN)
    ok = await services.staff.authenticate("amy@riverside.example", PASSWORD)
    assert ok is not None and ok.id == added.id
    upper = await services.staff.authenticate("  AMY@RIVERSIDE.EXAMPLE", PASSWORD)
    assert upper is not None and upper.id == added.id
    assert await services.staff.authenticate("amy@riverside.example", PASSWORD.upper()) is None
    assert await services.staff.authenticate("amy@riverside.example", "") is None
    assert await services.staff.authenticate("bob@riverside.example", PASSWORD) is None


async def test_disabled_account_cannot_authenticate(services: Services) -> None:
    await services.staff.add("amy@riverside.example", PASSWORD, actor=ADMIN)
    disabled = await services.staff.disable("Amy@Riverside.example", actor=ADMIN)
    assert disabled.disabled
    assert await services.staff.authenticate("amy@riverside.example", PASSWORD) is None
    [listed] = await services.staff.list()
    assert listed.disabled
    assert [e.action for e in await events(services)] == ["staff.added", "staff.disabled"]


async def test_disabling_an_unknown_account_is_an_error(services: Services) -> None:
    with pytest.raises(StaffError, match="no staff account"):
        await services.staff.disable("ghost@riverside.example", actor=ADMIN)
    assert await events(services) == []


async def test_stale_hash_is_replaced_after_a_successful_sign_in(services: Services) -> None:
    staff = await services.staff.add("amy@riverside.example", PASSWORD, actor=ADMIN)
    first = await stored_hash(services, staff.id)
    assert "m=8,t=1,p=1" in first  # the suite's fast hasher

    upgraded = StaffDirectory(
        services.db, SecretHasher(time_cost=2, memory_kib=16, parallelism=1), services.audit
    )
    # A failed attempt changes nothing.
    assert await upgraded.authenticate("amy@riverside.example", "wrong password!!") is None
    assert await stored_hash(services, staff.id) == first

    assert await upgraded.authenticate("amy@riverside.example", PASSWORD) is not None
    second = await stored_hash(services, staff.id)
    assert second != first
    assert "m=16,t=2,p=1" in second

    # Now current: a further sign-in keeps it.
    assert await upgraded.authenticate("amy@riverside.example", PASSWORD) is not None
    assert await stored_hash(services, staff.id) == second


async def test_sender_allowed_own_address_and_aliases(services: Services) -> None:
    amy = await services.staff.add("amy@riverside.example", PASSWORD, actor=ADMIN)
    bob = await services.staff.add("bob@riverside.example", PASSWORD, actor=ADMIN)
    async with services.db.write() as session:
        session.add(StaffAlias(address="intake@riverside.example", staff_id=amy.id))
    assert await services.staff.sender_allowed(amy, "AMY@riverside.example")
    assert await services.staff.sender_allowed(amy, "Intake@Riverside.Example")
    assert not await services.staff.sender_allowed(bob, "intake@riverside.example")
    assert not await services.staff.sender_allowed(bob, "amy@riverside.example")
