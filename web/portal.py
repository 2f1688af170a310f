"""What every recipient-portal route shares: services, pages, the session cookie, the actor.

Promises:

* :meth:`Portal.current` resolves the session cookie once per request
  (idle and absolute timeouts enforced by :mod:`escrow.sessions`).
* :meth:`Portal.require` lets a handler run only for a live session at the
  required stage; otherwise the reader gets the calm "signed out" page
  (401), and a dead cookie is cleared.
* :meth:`Portal.page` fills in the practice name, the signed-in state and
  the CSRF token, so every form in every template can carry it.
* Audit actors carry the remote address and user agent, never a token.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from escrow.audit import Actor
from escrow.services import Services
from escrow.sessions import Resolved, SessionStore, SessionView
from web.pages import Pages
from web.security import Cookies, csrf_token


def client_address(request: Request) -> str:
    return request.client.host if request.client is not None else ""


def request_actor(request: Request, actor_type: str, actor_id: str) -> Actor:
    """Who is acting, from this address and browser (the user agent capped for the audit log)."""
    return Actor(
        actor_type,
        id=actor_id,
        remote_addr=client_address(request),
        user_agent=request.headers.get("user-agent", "")[:300],
    )


async def request_session(
    request: Request, sessions: SessionStore, cookies: Cookies, principal_type: str
) -> Resolved:
    """The request's session of ``principal_type`` (a recipient's cookie is no staff session,
    and the reverse), resolved once per request and remembered on it."""
    key = f"escrow.session.{principal_type}"
    cached = request.scope.get(key)
    if isinstance(cached, Resolved):
        return cached
    resolved = await sessions.resolve(cookies.read(request.cookies))
    if resolved.session is not None and resolved.session.principal_type != principal_type:
        resolved = Resolved(None)
    request.scope[key] = resolved
    return resolved


class Portal:
    """Shared helpers for the portal's route classes."""

    def __init__(self, services: Services, pages: Pages) -> None:
        self.services = services
        self.settings = services.settings
        self.domain = services.portal
        self.pages = pages
        self.cookies = Cookies(secure=services.settings.secure_cookies)

    def actor(self, request: Request, view: SessionView | None = None) -> Actor:
        """Who is acting: the session's recipient (if any), from this address and browser."""
        return request_actor(request, "recipient", view.principal_id if view is not None else "")

    async def current(self, request: Request) -> Resolved:
        """The request's session (resolved once, then remembered on the request)."""
        return await request_session(request, self.domain.sessions, self.cookies, "recipient")

    def page(
        self,
        template: str,
        *,
        view: SessionView | None,
        status: int = 200,
        **context: Any,
    ) -> Response:
        """A portal page with the session's CSRF token and navigation state."""
        return self.pages.html(
            template,
            status=status,
            csrf=csrf_token(view) if view is not None else "",
            signed_in=view is not None and view.signed_in,
            has_session=view is not None,
            **context,
        )

    def signed_out(self, *, expired: bool, status: int = 401) -> Response:
        """The page for "no session here": calm, with what to do next; clears a dead cookie."""
        response = self.page(
            "signed_out.html",
            view=None,
            status=status,
            reason="expired" if expired else "none",
            title="You are signed out",
        )
        self.cookies.clear(response)
        return response

    async def require(self, request: Request, *, full: bool = True) -> SessionView | Response:
        """The live session (signed in, unless ``full`` is False), or the page to show instead."""
        resolved = await self.current(request)
        view = resolved.session
        if view is None:
            return self.signed_out(expired=resolved.expired)
        if full and not view.signed_in:
            return redirect("/access")
        return view


def redirect(url: str) -> RedirectResponse:
    """303 See Other: after a POST, and to move the reader to a tokenless URL."""
    return RedirectResponse(url, status_code=303)
