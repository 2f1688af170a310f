"""Shared fixtures: settings on a temporary data dir, SQLite and PostgreSQL databases.

Tests that take ``db_url`` (directly or through ``settings``/``services``) run
twice: on SQLite and on a fresh PostgreSQL database. When PostgreSQL cannot be
reached they skip locally but FAIL in CI (``CI=true``), so a broken service
cannot make the suite look green.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from escrow import migrate
from escrow.db import Database
from escrow.passwords import SecretHasher
from escrow.services import Services, build_services
from escrow.settings import Settings, load_settings
from keys import VaultKeyring

PG_ADMIN_DSN = os.environ.get("ESCROW_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() == "true"
MASTER = "test master passphrase, not secret"


def require(condition: bool, why: str) -> None:
    """Skip when a real part is missing locally; fail in CI, where it must be there."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {why}")
    pytest.skip(why)


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _pg_reachable() -> bool:
    try:
        asyncio.run(_pg_admin("SELECT 1"))
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    return True


@pytest.fixture(scope="session")
def pg_available() -> bool:
    return _pg_reachable()


@pytest.fixture
def pg_url(pg_available: bool) -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards."""
    require(pg_available, f"PostgreSQL is not reachable at {PG_ADMIN_DSN}")
    name = f"escrow_t_{secrets.token_hex(6)}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'escrow.db'}"
    return str(request.getfixturevalue("pg_url"))


def make_environ(data_dir: Path, db_url: str, **extra: str) -> dict[str, str]:
    """Settings environment for a test instance (never the real process environment)."""
    env = {
        "ESCROW_DATA_DIR": str(data_dir),
        "ESCROW_DATABASE_URL": db_url,
        "ESCROW_MASTER_PASSPHRASE": MASTER,
        "ESCROW_PRACTICE_NAME": "Riverside Counselling",
        "ESCROW_NOTIFY_FROM": "secure@riverside.example",
    }
    env.update(extra)
    return env


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return load_settings(make_environ(tmp_path / "var", db_url), dotenv_path=tmp_path / "no.env")


def fast_hasher() -> SecretHasher:
    """Argon2id with tiny parameters: the suite stays quick; production parameters are tested apart."""
    return SecretHasher(time_cost=1, memory_kib=8, parallelism=1)


async def initialise(settings: Settings) -> None:
    """What `escrow init` does, minus the certificate: keys and schema."""
    VaultKeyring.initialise(settings.keys_dir, MASTER)
    db = Database(settings.database_url)
    try:
        await migrate.upgrade(db)
    finally:
        await db.dispose()


@pytest.fixture
async def services(settings: Settings) -> AsyncIterator[Services]:
    await initialise(settings)
    built = build_services(settings, hasher=fast_hasher())
    try:
        yield built
    finally:
        await built.aclose()
