"""Schema migrations (Alembic), run by ``escrow init``, ``escrow db upgrade`` and at start-up.

The scripts ship inside the package (``escrow/migrations``), so an installed
server needs no ``alembic.ini``. Upgrading is idempotent: at head it does
nothing. Processes starting together (replicas, or ``escrow init`` beside a
running server) take turns: the first migrates, the others then find the
schema at head. On PostgreSQL an advisory lock does it. On SQLite an
exclusive ``flock`` on a file beside the database does, and it is taken
before the first connection: connections that open a brand-new database file
at the same moment race to switch it to WAL while another already writes in
rollback-journal mode, and the loser waits out the whole busy timeout and
fails with "database is locked". SQLite's own write lock cannot prevent that.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import make_url

from escrow.db import Database

MIGRATIONS = Path(__file__).parent / "migrations"
# Any constant distinct from the audit log's: the lock that serialises upgrades on PostgreSQL.
PG_MIGRATION_LOCK_KEY = 0x657363726F776D  # "escrowm"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def sqlite_lock_file(url: str) -> Path | None:
    """The file whose ``flock`` serialises migrations of the SQLite database at ``url``.

    None for PostgreSQL and for in-memory SQLite (one connection, nothing to share).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    path = Path(database)
    return path.with_name(f"{path.name}.migrate-lock")


@asynccontextmanager
async def _sqlite_migration_lock(db: Database) -> AsyncIterator[None]:
    """Hold the exclusive migration lock of ``db``'s SQLite file (no-op elsewhere).

    ``flock`` belongs to the open file description, so two engines in one process
    exclude each other just as two processes do; the kernel drops the lock when the
    descriptor is closed, also when the process dies. The wait runs in a thread: the
    holder may be a coroutine on this same event loop.
    """
    path = sqlite_lock_file(db.url)
    if path is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


async def upgrade(db: Database, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (default: the newest), in one transaction.

    Concurrent callers, in this process or others, wait for each other (module docstring).
    """

    def run(connection: Any) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    async with _sqlite_migration_lock(db), db.engine.begin() as conn:
        if db.dialect == "postgresql":
            # Transaction-scoped: released at commit or rollback, even if the process dies.
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK_KEY}
            )
        await conn.run_sync(run)


async def current_revision(db: Database) -> str | None:
    """The schema's revision, or None for an empty database."""

    def read(connection: Any) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async with db.engine.connect() as conn:
        return await conn.run_sync(read)
