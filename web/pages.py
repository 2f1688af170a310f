"""Rendering pages: one Jinja2 environment (autoescaped), shared filters, error pages.

Promises: every template is autoescaped; an undefined variable is an error
in tests, never a silent blank; error pages (404, 500, and the neutral link
page) show no detail of what went wrong and carry the security headers even
when produced outside the middleware.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from escrow.settings import Settings
from web.security import apply_headers

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"


def when(moment: datetime | None) -> str:
    """``23 November 2026, 14:05 UTC``: unambiguous for any reader."""
    if moment is None:
        return ""
    return f"{moment.day} {moment:%B %Y, %H:%M} UTC"


def size(count: int) -> str:
    """A byte count as people read it: ``840 bytes``, ``12 KB``, ``3.4 MB``."""
    if count < 1024:
        return f"{count} bytes"
    if count < 1024 * 1024:
        return f"{round(count / 1024)} KB"
    return f"{count / (1024 * 1024):.1f} MB"


class Pages:
    """Renders templates with the practice's name and the session's form token."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.env = Environment(
            loader=FileSystemLoader(TEMPLATES),
            autoescape=True,
            undefined=StrictUndefined,
            auto_reload=False,
        )
        self.env.filters["when"] = when
        self.env.filters["size"] = size
        self.env.globals["practice"] = settings.practice_name
        self.env.globals["practice_contact"] = settings.practice_contact
        self._hsts = settings.secure_cookies

    def html(self, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
        """A rendered page. ``context`` must supply what the template uses."""
        context.setdefault("csrf", "")
        context.setdefault("signed_in", False)
        context.setdefault("has_session", False)
        context.setdefault("title", "")
        body = self.env.get_template(template).render(**context)
        return HTMLResponse(body, status_code=status)

    # ------------------------------------------------------------ error pages

    async def not_found(self, _request: Request, exc: Exception) -> Response:
        """Unknown routes (and 405s) get the neutral not-found page, with the code kept."""
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        if status not in (404, 405):
            status = 404
        return self.html("not_found.html", status=status, title="Page not found")

    async def server_error(self, _request: Request, exc: Exception) -> Response:
        """A neutral page; the log gets the exception's type only (its text may quote input)."""
        log.error("unhandled error while serving a request (%s)", type(exc).__name__)
        response = self.html("error.html", status=500, title="Something went wrong")
        return apply_headers(response, hsts=self._hsts)
