"""Liveness and readiness: /healthz answers while the process runs, /readyz only when
the database and the vault keys can be used."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from escrow.services import Services
from tests.conftest import _pg_admin
from web.app import create_app


@pytest.fixture
async def client(services: Services) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://escrow.test") as http:
        yield http


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.text == "ok\n"
    assert response.headers["cache-control"] == "no-store"


async def test_readyz_when_database_and_keys_are_usable(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.text == "ready\n"
    assert response.headers["cache-control"] == "no-store"


async def test_unknown_route_is_not_found(client: httpx.AsyncClient) -> None:
    assert (await client.get("/nothing-here")).status_code == 404


async def test_readyz_fails_once_the_keyring_is_closed(
    client: httpx.AsyncClient, services: Services
) -> None:
    services.keyring.close()
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.text == "not ready\n"
    # Liveness is about the process, not its dependencies.
    assert (await client.get("/healthz")).status_code == 200


async def test_readyz_fails_when_the_database_is_gone(
    client: httpx.AsyncClient, services: Services
) -> None:
    assert (await client.get("/readyz")).status_code == 200
    if services.db.dialect == "postgresql":
        name = services.settings.database_url.rsplit("/", 1)[1]
        await _pg_admin(f'DROP DATABASE "{name}" WITH (FORCE)')
    else:
        # Close pooled connections, then put something SQLite cannot open where the file was.
        await services.db.dispose()
        path = Path(services.settings.database_url.split("///", 1)[1])
        for leftover in (
            path,
            path.with_name(path.name + "-wal"),
            path.with_name(path.name + "-shm"),
        ):
            leftover.unlink(missing_ok=True)
        path.mkdir()
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.text == "not ready\n"
    assert (await client.get("/healthz")).status_code == 200
