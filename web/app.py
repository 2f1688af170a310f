"""The Starlette application: built by :func:`create_app` from the shared services."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from escrow.services import Services
from web.metrics import install_metrics
from web.routes import install_portal
from web.staff import install_console

log = logging.getLogger(__name__)


def create_app(services: Services) -> Starlette:
    """The web application. The caller owns ``services`` (and closes them)."""

    async def healthz(_request: Request) -> Response:
        return PlainTextResponse("ok\n", headers={"Cache-Control": "no-store"})

    async def readyz(_request: Request) -> Response:
        try:
            # A hung database must make the probe fail, not hang.
            await asyncio.wait_for(services.db.ping(), timeout=5)
            services.keyring.active_fingerprint  # noqa: B018 (raises if the keyring is closed)
        except Exception:
            log.warning("readiness check failed", exc_info=True)
            return PlainTextResponse(
                "not ready\n", status_code=503, headers={"Cache-Control": "no-store"}
            )
        return PlainTextResponse("ready\n", headers={"Cache-Control": "no-store"})

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[dict[str, Services]]:
        yield {"services": services}

    app = Starlette(
        routes=[Route("/healthz", healthz), Route("/readyz", readyz)],
        lifespan=lifespan,
    )
    install_portal(app, services)
    install_console(app, services)
    install_metrics(app, services)
    return app
