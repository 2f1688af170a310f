"""Migrations: empty to head on both databases, idempotent, and in step with the models."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, MetaData, String, func, inspect, select, text
from sqlalchemy.exc import IntegrityError

from escrow import migrate
from escrow.db import Database
from escrow.models import Base, Staff


def _schema_diff(metadata: MetaData) -> Any:
    def compare(connection: Any) -> Any:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, metadata)

    return compare


async def _diff(db: Database, metadata: MetaData) -> list[Any]:
    async with db.engine.connect() as conn:
        return list(await conn.run_sync(_schema_diff(metadata)))


async def _tables(db: Database) -> set[str]:
    async with db.engine.connect() as conn:
        return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))


async def test_upgrade_from_empty_to_head(db_url: str) -> None:
    db = Database(db_url)
    try:
        assert await migrate.current_revision(db) is None
        assert await _tables(db) == set()

        await migrate.upgrade(db)

        assert await migrate.current_revision(db) == migrate.head_revision()
        assert await _tables(db) == set(Base.metadata.tables) | {"alembic_version"}
    finally:
        await db.dispose()


async def test_upgrading_twice_is_a_no_op(db_url: str) -> None:
    db = Database(db_url)
    try:
        await migrate.upgrade(db)
        async with db.write() as session:
            session.add(Staff(email="keeps@riverside.example", password_hash="x"))

        await migrate.upgrade(db)

        assert await migrate.current_revision(db) == migrate.head_revision()
        async with db.read() as session:
            assert (await session.scalar(select(func.count()).select_from(Staff))) == 1
            versions = (
                await session.execute(text("SELECT version_num FROM alembic_version"))
            ).all()
        assert [v[0] for v in versions] == [migrate.head_revision()]
    finally:
        await db.dispose()


async def test_schema_after_migrations_matches_the_models(db_url: str) -> None:
    """A model changed without a migration shows up here as a difference."""
    db = Database(db_url)
    try:
        await migrate.upgrade(db)
        assert await _diff(db, Base.metadata) == []
    finally:
        await db.dispose()


async def test_the_schema_comparison_does_see_a_missing_migration(db_url: str) -> None:
    """The comparison above is not blind: a column with no migration is reported."""
    db = Database(db_url)
    try:
        await migrate.upgrade(db)
        changed = MetaData()
        for table in Base.metadata.tables.values():
            table.to_metadata(changed)
        changed.tables["staff"].append_column(Column("nickname", String(40), nullable=True))
        diffs = await _diff(db, changed)
        assert [(d[0], d[3].name) for d in diffs] == [("add_column", "nickname")]
    finally:
        await db.dispose()


# ---------------------------------------------------------------- SQLite connections


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Database:
    return Database(f"sqlite+aiosqlite:///{tmp_path / 'escrow.db'}")


async def _pragmas(session: Any) -> dict[str, Any]:
    names = ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
    return {n: (await session.execute(text(f"PRAGMA {n}"))).scalar_one() for n in names}


async def test_sqlite_connections_are_durable_and_enforce_foreign_keys(
    sqlite_db: Database,
) -> None:
    expected = {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1, "busy_timeout": 30000}
    try:
        async with sqlite_db.write() as session:
            assert await _pragmas(session) == expected
        async with sqlite_db.read() as session:
            assert await _pragmas(session) == expected
        async with sqlite_db.engine.connect() as conn:
            assert (await conn.execute(text("PRAGMA synchronous"))).scalar_one() == 2
        # The thread-run transactions use connections of their own: the same promises.
        for run in (sqlite_db.run_read, sqlite_db.run_write):
            pragmas = await run(
                lambda s: {
                    n: s.execute(text(f"PRAGMA {n}")).scalar_one()
                    for n in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
                }
            )
            assert pragmas == expected
    finally:
        await sqlite_db.dispose()


async def test_sqlite_foreign_keys_are_enforced(sqlite_db: Database) -> None:
    try:
        await migrate.upgrade(sqlite_db)
        with pytest.raises(IntegrityError):
            async with sqlite_db.write() as session:
                await session.execute(
                    text("INSERT INTO staff_alias (address, staff_id) VALUES ('a@x', 'nobody')")
                )
    finally:
        await sqlite_db.dispose()


async def test_sqlite_write_transactions_take_the_lock_up_front(
    sqlite_db: Database, tmp_path: Path
) -> None:
    """``write()`` begins IMMEDIATE (holds the write lock from its first statement);
    ``read()`` stays deferred, so it never keeps another writer out."""
    await migrate.upgrade(sqlite_db)
    other = sqlite3.connect(tmp_path / "escrow.db", timeout=0, isolation_level=None)
    try:
        async with sqlite_db.read() as session:
            await session.execute(text("SELECT count(*) FROM staff"))
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
        async with sqlite_db.write() as session:
            await session.execute(text("SELECT count(*) FROM staff"))
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
    finally:
        other.close()
        await sqlite_db.dispose()


# ---------------------------------------------------------------- run_read / run_write


async def test_run_write_commits_on_return_and_rolls_back_on_error(db_url: str) -> None:
    db = Database(db_url)
    try:
        await migrate.upgrade(db)

        def add(email: str, fail: bool = False) -> Any:
            def work(session: Any) -> str:
                session.add(Staff(email=email, password_hash="x"))
                session.flush()
                if fail:
                    raise RuntimeError("after the insert")
                return email

            return work

        assert await db.run_write(add("kept@riverside.example")) == "kept@riverside.example"
        with pytest.raises(RuntimeError):
            await db.run_write(add("dropped@riverside.example", fail=True))

        emails = await db.run_read(lambda s: set(s.scalars(select(Staff.email)).all()))
        assert emails == {"kept@riverside.example"}
        async with db.read() as session:  # the async side sees the same
            assert set((await session.scalars(select(Staff.email))).all()) == emails
    finally:
        await db.dispose()


async def test_sqlite_run_write_waits_for_a_write_in_progress(sqlite_db: Database) -> None:
    """A thread-run write starts only after a ``write()`` in progress has committed."""
    import asyncio

    try:
        await migrate.upgrade(sqlite_db)
        order: list[str] = []
        entered = asyncio.Event()
        release = asyncio.Event()

        async def holder() -> None:
            async with sqlite_db.write() as session:
                session.add(Staff(email="first@riverside.example", password_hash="x"))
                await session.flush()
                order.append("write begun")
                entered.set()
                await release.wait()
                order.append("write ends")

        def second(session: Any) -> int:
            order.append("run_write runs")
            return len(session.scalars(select(Staff.email)).all())

        task = asyncio.create_task(holder())
        await entered.wait()
        pending = asyncio.create_task(sqlite_db.run_write(second))
        release.set()
        await task
        assert await pending == 1  # it ran after the first committed, and saw its row
        assert order == ["write begun", "write ends", "run_write runs"]
    finally:
        await sqlite_db.dispose()
