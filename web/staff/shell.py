"""What every console route shares: the staff session, who is acting, pages, forms.

Promises:

* The console has its own session cookie (``__Host-escrow_staff`` on https,
  ``escrow_staff`` otherwise; HttpOnly, SameSite=Strict, Path=/), so a
  recipient's session and a staff session never stand in for each other,
  and only sessions whose principal is ``staff`` are accepted.
* :meth:`Shell.require` lets a handler run only for a live, fully signed-in
  session of an enabled staff account (and, with ``admin``, an admin);
  otherwise the sign-in page (no session) or the neutral not-found page
  (not an admin: admin pages are not confirmed to exist).
* :meth:`Shell.form` reads a small form and checks its CSRF token; a
  failure is audited (``csrf.failed``) and answered 400 with a calm page.
* Actors carry the staff id, remote address and user agent; never a token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response

from escrow.audit import Actor
from escrow.console import Console, Viewer
from escrow.models import Staff, utcnow
from escrow.services import Services
from escrow.sessions import Resolved, SessionView
from web.forms import FormInvalid, FormTooLarge, read_form
from web.pages import Pages
from web.portal import redirect, request_actor, request_session
from web.security import Cookies, csrf_token, csrf_valid

ID = re.compile(r"[0-9a-f]{32}")
PENDING = "mfa"  # password proven; second factor (or its enrolment) still to come


class StaffCookies(Cookies):
    """The console's own session cookie (see the module promises)."""

    def __init__(self, *, secure: bool) -> None:
        super().__init__(secure=secure)
        self.name = "__Host-escrow_staff" if secure else "escrow_staff"


@dataclass(frozen=True)
class Signed:
    """A fully signed-in staff request: the session, the account, and the query scope."""

    view: SessionView
    staff: Staff

    @property
    def viewer(self) -> Viewer:
        return Viewer(self.staff.id, self.staff.role == "admin")

    @property
    def admin(self) -> bool:
        return self.staff.role == "admin"


class Shell:
    """Shared helpers for the console's route classes."""

    def __init__(self, services: Services, pages: Pages, console: Console) -> None:
        self.services = services
        self.settings = services.settings
        self.sessions = services.portal.sessions
        self.pages = pages
        self.console = console
        self.cookies = StaffCookies(secure=services.settings.secure_cookies)

    def actor(self, request: Request, staff_id: str = "") -> Actor:
        return request_actor(request, "staff", staff_id)

    async def current(self, request: Request) -> Resolved:
        """The request's staff session (resolved once per request)."""
        return await request_session(request, self.sessions, self.cookies, "staff")

    def page(
        self,
        template: str,
        *,
        view: SessionView | None,
        staff: Staff | None = None,
        status: int = 200,
        **context: Any,
    ) -> Response:
        """A console page with the session's CSRF token and the navigation for ``staff``."""
        context.setdefault("errors", ())
        context.setdefault("notice", "")
        context.setdefault("now", utcnow())
        return self.pages.html(
            template,
            status=status,
            csrf=csrf_token(view) if view is not None else "",
            signed_in=view is not None and view.signed_in and staff is not None,
            has_session=view is not None,
            me=staff,
            is_admin=staff is not None and staff.role == "admin",
            **context,
        )

    def not_found(self, signed: Signed | None = None) -> Response:
        return self.page(
            "staff/not_found.html",
            view=signed.view if signed else None,
            staff=signed.staff if signed else None,
            status=404,
            title="Page not found",
        )

    def to_sign_in(self, *, expired: bool = False) -> Response:
        response = redirect("/staff/sign-in?expired=1" if expired else "/staff/sign-in")
        if expired:
            self.cookies.clear(response)
        return response

    async def require(self, request: Request, *, admin: bool = False) -> Signed | Response:
        """The signed-in staff member, or the response to give instead (see module promises)."""
        resolved = await self.current(request)
        view = resolved.session
        if view is None:
            return self.to_sign_in(expired=resolved.expired)
        if not view.signed_in:
            return redirect("/staff/second-factor")
        staff = await self.services.staff.get(view.principal_id)
        if staff is None or staff.disabled:
            await self.sessions.end(view, self.actor(request, view.principal_id), action="logout")
            response = self.to_sign_in()
            self.cookies.clear(response)
            return response
        signed = Signed(view, staff)
        if admin and not signed.admin:
            return self.not_found(signed)
        return signed

    async def form(
        self, request: Request, view: SessionView, name: str, *, max_fields: int = 20
    ) -> FormData | None:
        """The posted form if its CSRF token is this session's; None (audited) otherwise."""
        try:
            form = await read_form(request, max_fields=max_fields)
        except (FormTooLarge, FormInvalid):
            return None
        if not csrf_valid(view, form.get("csrf")):
            await self.services.audit.log(
                "csrf.failed",
                self.actor(request, view.principal_id),
                outcome="refused",
                detail={"form": f"staff.{name}"},
            )
            return None
        return form

    def refused(self, signed: Signed | None, view: SessionView | None = None) -> Response:
        """The page for a form whose token did not match (400)."""
        return self.page(
            "staff/form_expired.html",
            view=signed.view if signed else view,
            staff=signed.staff if signed else None,
            status=400,
            title="Please try again",
        )
