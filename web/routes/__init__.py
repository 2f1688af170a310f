"""The recipient portal's routes, split by noun; :func:`install_portal` wires them into the app."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from escrow.services import Services
from web.pages import Pages
from web.portal import Portal
from web.routes.account import AccountRoutes
from web.routes.link import LinkRoutes
from web.routes.mailbox import MailboxRoutes
from web.routes.reply import ReplyRoutes
from web.security import SecurityHeaders

STATIC = Path(__file__).resolve().parent.parent / "static"


def install_portal(app: Starlette, services: Services) -> Portal:
    """Add the portal's routes, static files, neutral error pages and security headers to ``app``.

    Routes are appended after any already there (``/healthz``, ``/readyz``).
    The security-header middleware is added here, so call this before
    middleware that should see the final response (metrics) is added.
    """
    pages = Pages(services.settings)
    portal = Portal(services, pages)
    mailbox = MailboxRoutes(portal)
    for group in (
        LinkRoutes(portal),
        mailbox,
        ReplyRoutes(portal, mailbox),
        AccountRoutes(portal),
    ):
        app.router.routes.extend(group.routes())
    app.router.routes.append(Mount("/static", StaticFiles(directory=STATIC), name="static"))
    app.add_exception_handler(404, pages.not_found)
    app.add_exception_handler(405, pages.not_found)
    app.add_exception_handler(HTTPException, pages.not_found)
    app.add_exception_handler(Exception, pages.server_error)
    app.add_middleware(SecurityHeaders, hsts=services.settings.secure_cookies)
    return portal
