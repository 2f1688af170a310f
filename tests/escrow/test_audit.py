"""The audit hash chain: appends, verification, tampering, export and concurrency."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import itertools
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Engine, event, select, text, update

from escrow import migrate
from escrow.audit import EXPORT_FIELDS, GENESIS, Actor, Audit, Verified, event_hash
from escrow.db import Database
from escrow.errors import AuditChainBroken
from escrow.models import AuditEvent


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    await migrate.upgrade(database)
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
def audit(db: Database) -> Audit:
    return Audit(db)


CLERK = Actor("staff", id="s-1", remote_addr="192.0.2.10", user_agent="Thunderbird/128")
CLIENT = Actor("recipient", id="r-1", remote_addr="198.51.100.7", user_agent="Firefox/130")


async def fill(audit: Audit, count: int) -> list[AuditEvent]:
    """``count`` varied events, one transaction each."""
    events = []
    for i in range(count):
        actor = CLERK if i % 2 else CLIENT
        events.append(
            await audit.log(
                ("message.viewed", "login.failed", "smtp.auth_ok")[i % 3],
                actor,
                message_id=f"m{i % 4}" if i % 5 else None,
                delivery_id=f"d{i}" if i % 3 == 0 else None,
                outcome="ok" if i % 4 else "denied",
                detail={"n": i, "note": "naïve café", "flag": i % 2 == 0, "none": None},
            )
        )
    return events


async def execute(db: Database, sql: str, **params: Any) -> None:
    async with db.write() as session:
        await session.execute(text(sql), params)


async def broken_at(audit: Audit, **kwargs: Any) -> int:
    with pytest.raises(AuditChainBroken) as caught:
        await audit.verify(**kwargs)
    return caught.value.seq


# ---------------------------------------------------------------- appending and verifying


async def test_empty_chain_verifies(audit: Audit) -> None:
    assert await audit.verify() == Verified(events=0, last_seq=0)


async def test_chain_of_many_events_verifies(audit: Audit) -> None:
    events = await fill(audit, 30)
    assert [e.seq for e in events] == list(range(1, 31))
    assert events[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(events))
    assert await audit.verify() == Verified(events=30, last_seq=30)


async def test_event_records_what_it_was_given(audit: Audit) -> None:
    before = datetime.now(UTC)
    logged = await audit.log(
        "attachment.downloaded",
        Actor("recipient", id="r-9", remote_addr="203.0.113.9", user_agent="x" * 400),
        message_id="m-1",
        delivery_id="d-1",
        outcome="ok",
        detail={"n": 2, "b": True},
    )
    async with audit._db.read() as session:
        stored = (await session.scalars(select(AuditEvent))).one()
    assert stored.seq == 1
    assert before <= stored.at <= datetime.now(UTC)
    assert stored.at.tzinfo is not None
    assert (stored.actor_type, stored.actor_id, stored.action) == (
        "recipient",
        "r-9",
        "attachment.downloaded",
    )
    assert (stored.message_id, stored.delivery_id) == ("m-1", "d-1")
    assert stored.remote_addr == "203.0.113.9"
    assert stored.user_agent == "x" * 300  # truncated to the column, not an error
    assert json.loads(stored.detail) == {"n": 2, "b": True}
    assert stored.hash == logged.hash == event_hash(stored)


async def test_event_commits_with_the_callers_transaction(db: Database, audit: Audit) -> None:
    class Refused(Exception):
        pass

    with pytest.raises(Refused):
        async with db.write() as session:
            await audit.record(session, "message.accepted", CLERK)
            raise Refused
    assert await audit.verify() == Verified(events=0, last_seq=0)
    assert (await audit.log("message.accepted", CLERK)).seq == 1


# ---------------------------------------------------------------- tampering


TAMPERED_VALUES: dict[str, Any] = {
    "at": datetime(2001, 1, 1, tzinfo=UTC).replace(tzinfo=None),
    "actor_type": "system",
    "actor_id": "mallory",
    "action": "login.ok",
    "message_id": "m-forged",
    "delivery_id": "d-forged",
    "remote_addr": "10.6.6.6",
    "user_agent": "curl/8",
    "outcome": "ok-ish",
    "detail": '{"n":999}',
    "prev_hash": "f" * 64,
    "hash": "e" * 64,
}


async def test_editing_any_column_of_one_event_is_detected_at_that_event(
    db: Database, audit: Audit
) -> None:
    await fill(audit, 10)
    for column, value in TAMPERED_VALUES.items():
        if column == "at" and db.dialect == "postgresql":
            value = value.replace(tzinfo=UTC)
        # Column names come from the fixed table above, never from input.
        select_sql = f"SELECT {column} FROM audit_event WHERE seq = 6"  # noqa: S608
        update_sql = f"UPDATE audit_event SET {column} = :v WHERE seq = 6"  # noqa: S608
        async with db.read() as session:
            original = (await session.execute(text(select_sql))).scalar_one()
        await execute(db, update_sql, v=value)
        with pytest.raises(AuditChainBroken) as caught:
            await audit.verify()
        assert caught.value.seq == 6, column
        # Put it back: the chain verifies again, so the next column is tested on its own.
        await execute(db, update_sql, v=original)
        assert await audit.verify() == Verified(events=10, last_seq=10), column


async def test_editing_an_event_and_rehashing_it_breaks_the_next_link(
    db: Database, audit: Audit
) -> None:
    await fill(audit, 10)
    async with db.write() as session:
        row = await session.get(AuditEvent, 4)
        assert row is not None
        row.outcome = "ok"
        row.actor_id = "someone-else"
        row.hash = event_hash(row)
    with pytest.raises(AuditChainBroken) as caught:
        await audit.verify()
    assert caught.value.seq == 5
    assert "previous-hash" in caught.value.reason


async def test_deleting_a_middle_event_is_detected_where_it_was(db: Database, audit: Audit) -> None:
    await fill(audit, 10)
    await execute(db, "DELETE FROM audit_event WHERE seq = 5")
    assert await broken_at(audit) == 5


async def test_deleting_the_first_event_is_detected(db: Database, audit: Audit) -> None:
    await fill(audit, 10)
    await execute(db, "DELETE FROM audit_event WHERE seq = 1")
    assert await broken_at(audit) == 1


async def test_deleting_the_newest_event_is_not_detectable_by_the_chain_alone(
    db: Database, audit: Audit
) -> None:
    """A hash chain cannot tell a truncated tail from a shorter history: verify
    reports the shorter chain as intact, and the next append links onto it.
    Catching truncation needs the last (seq, hash) kept somewhere else, such as
    an earlier export or the output of a previous ``escrow audit verify``."""
    events = await fill(audit, 10)
    await execute(db, "DELETE FROM audit_event WHERE seq = 10")
    assert await audit.verify() == Verified(events=9, last_seq=9)
    # What an operator can compare against a previously recorded head:
    assert (await audit.verify()).last_seq != events[-1].seq
    appended = await audit.log("message.viewed", CLIENT)
    assert (appended.seq, appended.prev_hash) == (10, events[8].hash)
    assert await audit.verify() == Verified(events=10, last_seq=10)


async def test_swapping_two_events_seq_is_detected_at_the_first_moved(
    db: Database, audit: Audit
) -> None:
    await fill(audit, 10)
    async with db.write() as session:
        await session.execute(text("UPDATE audit_event SET seq = -1 WHERE seq = 3"))
        await session.execute(text("UPDATE audit_event SET seq = 3 WHERE seq = 7"))
        await session.execute(text("UPDATE audit_event SET seq = 7 WHERE seq = -1"))
    assert await broken_at(audit) == 3


async def test_renumbering_the_newest_event_leaves_a_gap_that_is_detected(
    db: Database, audit: Audit
) -> None:
    await fill(audit, 5)
    await execute(db, "UPDATE audit_event SET seq = 9 WHERE seq = 5")
    assert await broken_at(audit) == 5


async def test_forged_event_appended_without_the_chain_is_detected(
    db: Database, audit: Audit
) -> None:
    await fill(audit, 5)
    async with db.write() as session:
        forged = AuditEvent(
            seq=6,
            at=datetime.now(UTC),
            actor_type="staff",
            actor_id="mallory",
            action="login.ok",
            remote_addr="",
            user_agent="",
            outcome="ok",
            detail="{}",
            prev_hash=GENESIS,
        )
        forged.hash = event_hash(forged)
        session.add(forged)
    assert await broken_at(audit) == 6


# ---------------------------------------------------------------- streaming verification


async def test_verify_streams_in_batches_and_links_across_them(db: Database, audit: Audit) -> None:
    await fill(audit, 50)
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        if "FROM audit_event" in statement:
            statements.append(statement)

    event.listen(Engine, "before_cursor_execute", count)
    try:
        assert await audit.verify(batch=7) == Verified(events=50, last_seq=50)
    finally:
        event.remove(Engine, "before_cursor_execute", count)
    # 7 full batches of 7, then one short batch (1 row) that ends the walk.
    assert len(statements) == 8

    # The previous hash is carried from the last event of one batch to the
    # first of the next: a consistent edit of event 7 shows at event 8.
    async with db.write() as session:
        row = await session.get(AuditEvent, 7)
        assert row is not None
        row.actor_id = "someone-else"
        row.hash = event_hash(row)
    assert await broken_at(audit, batch=7) == 8


async def test_verify_finds_tampering_deep_in_a_later_batch(db: Database, audit: Audit) -> None:
    await fill(audit, 50)
    await execute(db, "UPDATE audit_event SET action = 'login.ok' WHERE seq = 45")
    assert await broken_at(audit, batch=7) == 45


# ---------------------------------------------------------------- export


def _canonical_hash(row: dict[str, Any]) -> str:
    body = {k: v for k, v in row.items() if k != "hash"}
    encoded = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


async def export_text(audit: Audit, fmt: str, **kwargs: Any) -> str:
    return "".join([chunk async for chunk in audit.export(fmt, **kwargs)])


async def test_jsonl_export_round_trips_and_verifies_without_the_database(
    audit: Audit,
) -> None:
    events = await fill(audit, 12)
    lines = (await export_text(audit, "jsonl")).splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 12
    for row, logged in zip(rows, events, strict=True):
        assert list(row) == list(EXPORT_FIELDS)
        assert row["seq"] == logged.seq
        assert row["action"] == logged.action
        assert row["actor_type"] == logged.actor_type
        assert row["actor_id"] == logged.actor_id
        assert row["message_id"] == logged.message_id
        assert row["delivery_id"] == logged.delivery_id
        assert row["remote_addr"] == logged.remote_addr
        assert row["user_agent"] == logged.user_agent
        assert row["outcome"] == logged.outcome
        assert json.loads(row["detail"]) == json.loads(logged.detail)
        assert row["hash"] == logged.hash
        assert datetime.fromisoformat(row["at"]) == logged.at
    # An auditor holding only the export can check every hash and link.
    prev = GENESIS
    for row in rows:
        assert row["prev_hash"] == prev
        assert _canonical_hash(row) == row["hash"]
        prev = row["hash"]


async def test_csv_export_round_trips(audit: Audit) -> None:
    events = await fill(audit, 12)
    reader = csv.DictReader(io.StringIO(await export_text(audit, "csv")))
    assert tuple(reader.fieldnames or ()) == EXPORT_FIELDS
    rows = list(reader)
    assert len(rows) == 12
    for row, logged in zip(rows, events, strict=True):
        assert row["seq"] == str(logged.seq)
        assert row["action"] == logged.action
        assert row["message_id"] == (logged.message_id or "")
        assert row["delivery_id"] == (logged.delivery_id or "")
        assert row["user_agent"] == logged.user_agent
        assert json.loads(row["detail"]) == json.loads(logged.detail)
        assert row["prev_hash"] == logged.prev_hash
        assert row["hash"] == logged.hash


async def test_csv_export_of_an_empty_log_is_just_the_header(audit: Audit) -> None:
    assert await export_text(audit, "csv") == ",".join(EXPORT_FIELDS) + "\n"


async def test_export_since_keeps_only_later_events(db: Database, audit: Audit) -> None:
    await fill(audit, 8)
    # Spread the times out so the cut falls cleanly; the chain is not checked here.
    base = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    async with db.write() as session:
        for seq in range(1, 9):
            await session.execute(
                update(AuditEvent)
                .where(AuditEvent.seq == seq)
                .values(at=base + timedelta(hours=seq))
            )
    # 17:00 UTC given in another zone: events 5..8 (at 17:00 and later).
    since = datetime(2026, 3, 1, 19, 0, tzinfo=timezone(timedelta(hours=2)))
    rows = [
        json.loads(line) for line in (await export_text(audit, "jsonl", since=since)).splitlines()
    ]
    assert [r["seq"] for r in rows] == [5, 6, 7, 8]
    assert rows[0]["at"].startswith("2026-03-01T17:00:00")


async def test_export_message_filter(audit: Audit) -> None:
    await fill(audit, 20)
    rows = [
        json.loads(line)
        for line in (await export_text(audit, "jsonl", message_id="m1")).splitlines()
    ]
    # message_id is f"m{i % 4}" unless i % 5 == 0, for i = seq - 1.
    expected = [i + 1 for i in range(20) if i % 5 and i % 4 == 1]
    assert [r["seq"] for r in rows] == expected
    assert {r["message_id"] for r in rows} == {"m1"}
    assert await export_text(audit, "jsonl", message_id="m-none") == ""


# ---------------------------------------------------------------- concurrency


async def test_concurrent_appends_leave_one_unbroken_chain(audit: Audit) -> None:
    """On PostgreSQL the advisory lock serialises appends; on SQLite BEGIN IMMEDIATE does."""
    logged = await asyncio.gather(
        *(audit.log("message.viewed", CLIENT, detail={"i": i}) for i in range(50))
    )
    assert sorted(e.seq for e in logged) == list(range(1, 51))
    assert len({e.hash for e in logged}) == 50
    assert await audit.verify() == Verified(events=50, last_seq=50)


async def test_concurrent_appends_from_two_replicas_leave_one_chain(db_url: str) -> None:
    """Two Database objects (two engines and pools) stand for two server replicas."""
    first, second = Database(db_url), Database(db_url)
    try:
        await migrate.upgrade(first)
        audits = (Audit(first), Audit(second))
        logged = await asyncio.gather(
            *(audits[i % 2].log("login.ok", CLERK, detail={"i": i}) for i in range(50))
        )
        assert sorted(e.seq for e in logged) == list(range(1, 51))
        assert await audits[0].verify() == Verified(events=50, last_seq=50)
        assert await audits[1].verify() == Verified(events=50, last_seq=50)
    finally:
        await first.dispose()
        await second.dispose()
