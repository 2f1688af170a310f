"""Fixtures for the recipient portal: the real app over ASGI on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from escrow.services import Services, build_services
from escrow.settings import load_settings
from tests.conftest import fast_hasher, initialise, make_environ
from tests.web.helpers import Portal
from web.app import create_app

BASE_URL = "http://127.0.0.1:8080"
CLIENT_ADDRESS = ("198.51.100.7", 50000)

MakePortal = Callable[..., Awaitable[Portal]]


def browse(services: Services, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    """A client talking to create_app(services) in-process, from a fixed remote address."""
    transport = httpx.ASGITransport(
        app=create_app(services), client=CLIENT_ADDRESS, raise_app_exceptions=raise_app_exceptions
    )
    return httpx.AsyncClient(transport=transport, base_url=BASE_URL)


@pytest.fixture
async def make_portal(tmp_path: Path, db_url: str) -> AsyncIterator[MakePortal]:
    """Build a portal (services + client) with extra ``ESCROW_*`` settings; closed afterwards."""
    made: list[tuple[Services, httpx.AsyncClient]] = []

    async def make(**env: str) -> Portal:
        settings = load_settings(
            make_environ(tmp_path / "var", db_url, **env), dotenv_path=tmp_path / "no.env"
        )
        await initialise(settings)
        services = build_services(settings, hasher=fast_hasher())
        client = browse(services)
        made.append((services, client))
        return Portal(services, client)

    yield make
    for services, client in made:
        await client.aclose()
        await services.aclose()


@pytest.fixture
async def portal(make_portal: MakePortal) -> Portal:
    return await make_portal()
