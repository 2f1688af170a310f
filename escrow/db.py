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
* :meth:`Database.run_read` and :meth:`Database.run_write` run a plain
  function over a synchronous ORM session in one transaction, with the same
  promises as :meth:`read` and :meth:`write`. On SQLite that function runs
  whole on a worker thread (pysqlite, the same pragmas): one hand-off instead
  of one per statement, which makes a page's session and message reads and
  its audit commit about four times cheaper in CPU. On PostgreSQL it runs
  through asyncpg like everything else (``AsyncSession.run_sync``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")
# Threads for Database.run_read on SQLite (each keeps its connection busy only for one read).
SQLITE_READ_THREADS = 4


def _sqlite_engine(url: str, *, immediate: bool) -> AsyncEngine:
    engine = create_async_engine(url, connect_args={"timeout": 30})
    _configure_sqlite(engine.sync_engine, immediate=immediate)
    return engine


def _sqlite_sync_engine(url: str, *, immediate: bool = False) -> Engine:
    engine = create_engine(
        url.replace("+aiosqlite", "", 1),
        connect_args={"timeout": 30, "check_same_thread": False},
        pool_size=SQLITE_READ_THREADS,
    )
    _configure_sqlite(engine, immediate=immediate)
    return engine


def _configure_sqlite(engine: Engine, *, immediate: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN into our own hands (the driver's implicit BEGIN is deferred).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


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
        self._sync_engines: list[Engine] = []
        self._sync_reader: sessionmaker[Session] | None = None
        self._sync_writer: sessionmaker[Session] | None = None
        self._read_threads: ThreadPoolExecutor | None = None
        self._write_thread: ThreadPoolExecutor | None = None
        if self.dialect == "sqlite":
            reads, writes = _sqlite_sync_engine(url), _sqlite_sync_engine(url, immediate=True)
            self._sync_engines = [reads, writes]
            self._sync_reader = sessionmaker(reads, expire_on_commit=False)
            self._sync_writer = sessionmaker(writes, expire_on_commit=False)
            self._read_threads = ThreadPoolExecutor(SQLITE_READ_THREADS, "sqlite-read")
            self._write_thread = ThreadPoolExecutor(1, "sqlite-write")

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

    async def run_read(self, work: Callable[[Session], T]) -> T:
        """``work(session)`` in one read transaction; it must not write.

        Returns what ``work`` returns; its exceptions propagate. ORM objects it
        returns are detached: the attributes it loaded stay readable, lazy
        loads do not work.
        """
        if self._sync_reader is None or self._read_threads is None:
            async with self._reader() as session, session.begin():
                return await session.run_sync(work)
        return await asyncio.get_running_loop().run_in_executor(
            self._read_threads, self._read_sync, work
        )

    async def run_write(self, work: Callable[[Session], T]) -> T:
        """``work(session)`` in one write transaction, committed if it returns, else rolled back.

        On SQLite a caller cancelled while ``work`` runs does not stop it: the
        transaction still ends (commit or rollback) on its thread, and SQLite's
        own lock keeps the next writer waiting until it has.
        """
        if self._sync_writer is None or self._write_thread is None or self._write_lock is None:
            async with self._writer() as session, session.begin():
                return await session.run_sync(work)
        async with self._write_lock:
            return await asyncio.get_running_loop().run_in_executor(
                self._write_thread, _in_transaction, self._sync_writer, work
            )

    def _read_sync(self, work: Callable[[Session], T]) -> T:
        assert self._sync_reader is not None
        return _in_transaction(self._sync_reader, work)

    async def ping(self) -> None:
        """Raise if the database cannot answer a trivial query."""
        async with self._read_engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self._read_engine is not self.engine:
            await self._read_engine.dispose()
        for threads in (self._read_threads, self._write_thread):
            if threads is not None:
                threads.shutdown(wait=True)
        for engine in self._sync_engines:
            engine.dispose()


def _in_transaction(sessions: sessionmaker[Session], work: Callable[[Session], T]) -> T:
    with sessions() as session, session.begin():
        return work(session)
