"""The database: one SQLAlchemy async engine for PostgreSQL, two for SQLite.

Promises:

* SQLite runs in WAL mode with ``synchronous=FULL`` (an acknowledged commit
  survives power loss), foreign keys on, and a 30 s busy timeout.
* :meth:`Database.write` transactions on SQLite start with ``BEGIN IMMEDIATE``:
  writers queue on the database lock up front, so a read-then-write
  transaction (the audit chain, outbox claims) cannot interleave with another
  process's. :meth:`Database.read` transactions stay deferred, so readers never
  wait for writers.
* On PostgreSQL both are the same engine; serialisation where it matters is
  done with row locks and advisory locks by the callers.
* A transaction commits when its ``async with`` block ends without error and
  rolls back otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)


def _sqlite_engine(url: str, *, immediate: bool) -> AsyncEngine:
    engine = create_async_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN into our own hands (the driver's implicit BEGIN is deferred).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class Database:
    """Connections to the database of record. Build once; :meth:`dispose` at shutdown."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
        if self.dialect == "sqlite":
            self.engine = _sqlite_engine(url, immediate=True)
            self._read_engine = _sqlite_engine(url, immediate=False)
        else:
            self.engine = create_async_engine(
                url, pool_size=10, max_overflow=10, pool_pre_ping=True
            )
            self._read_engine = self.engine
        self._write_lock = asyncio.Lock() if self.dialect == "sqlite" else None
        self._writer = async_sessionmaker(self.engine, expire_on_commit=False)
        self._reader = async_sessionmaker(self._read_engine, expire_on_commit=False)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A read-write transaction, committed on success and rolled back on error."""
        if self._write_lock is None:
            async with self._writer() as session, session.begin():
                yield session
            return
        # SQLite has one writer at a time. Queueing here, rather than in SQLite's
        # busy handler (which sleeps up to 100 ms between polls), keeps latency low.
        async with self._write_lock, self._writer() as session, session.begin():
            yield session

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A transaction for reading; it never takes SQLite's write lock."""
        async with self._reader() as session, session.begin():
            yield session

    async def ping(self) -> None:
        """Raise if the database cannot answer a trivial query."""
        async with self._read_engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self._read_engine is not self.engine:
            await self._read_engine.dispose()
