"""The client's own session and history: ``/``, ``/activity``, ``/logout``, ``/exit``.

Promises:

* ``POST /logout`` ends the session server-side (``logout``), clears the
  cookie and asks the browser to drop its cache of this site
  (``Clear-Site-Data``), then shows the signed-out page.
* ``POST /exit`` (quick exit) does the same and sends the browser straight
  on to ``ESCROW_QUICK_EXIT_URL``. It is deliberately forgiving: a stale or
  missing CSRF token is audited (``csrf.failed``) but does not stop the exit,
  because the worst a forged exit can do is sign someone out, and a person
  in a hurry must never be stopped by a form error. The onward hop is a
  same-origin page with a refresh (a cross-origin redirect after a POST
  would be blocked by ``form-action 'self'``).
* ``/activity`` lists only the signed-in recipient's own events.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from escrow.activity import Activity
from web.forms import FormInvalid, FormTooLarge, read_form
from web.portal import Portal, redirect
from web.security import csrf_valid

CLEAR_SITE_DATA = '"cache", "cookies", "storage"'

DESCRIPTIONS: dict[str, Callable[[Activity], str]] = {
    "login.ok": lambda e: "Signed in",
    "login.failed": lambda e: (
        "Sign-in refused: signing in was paused"
        if e.outcome in ("locked", "throttled")
        else "Sign-in attempt with a passphrase or code that did not match"
    ),
    "recipient.locked": lambda e: "Signing in paused after attempts that did not match",
    "passphrase.set": lambda e: "Passphrase chosen",
    "consent.given": lambda e: "Read and accepted the notice about secure messages",
    "message.viewed": lambda e: "Opened a message",
    "attachment.downloaded": lambda e: "Downloaded an attachment",
    "reply.sent": lambda e: "Sent a reply",
    "logout": lambda e: "Signed out",
    "session.expired": lambda e: "Signed out automatically after a time without activity",
}


def describe(event: Activity) -> str:
    render = DESCRIPTIONS.get(event.action)
    return render(event) if render is not None else event.action


class AccountRoutes:
    """Landing, activity, sign-out and quick exit."""

    def __init__(self, portal: Portal) -> None:
        self.portal = portal
        self.sessions = portal.domain.sessions

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.home, methods=["GET"]),
            Route("/activity", self.activity, methods=["GET"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/exit", self.quick_exit, methods=["POST"]),
            Route("/signed-out", self.signed_out, methods=["GET"]),
        ]

    async def home(self, request: Request) -> Response:
        view = (await self.portal.current(request)).session
        if view is not None and view.signed_in:
            return redirect("/inbox")
        return self.portal.page("landing.html", view=view, title="Secure messages")

    async def activity(self, request: Request) -> Response:
        view = await self.portal.require(request)
        if isinstance(view, Response):
            return view
        events = await self.portal.domain.activity.recent(view.principal_id)
        return self.portal.page(
            "activity.html",
            view=view,
            events=events,
            describe=describe,
            title="Your recent activity",
        )

    async def signed_out(self, _request: Request) -> Response:
        return self.portal.page("signed_out.html", view=None, reason="ended", title="Signed out")

    def _forget(self, response: Response) -> Response:
        self.portal.cookies.clear(response)
        response.headers["Clear-Site-Data"] = CLEAR_SITE_DATA
        return response

    async def logout(self, request: Request) -> Response:
        view = (await self.portal.current(request)).session
        if view is None:
            return self._forget(redirect("/signed-out"))
        try:
            form = await read_form(request)
        except (FormTooLarge, FormInvalid):
            form = None
        if form is None or not csrf_valid(view, form.get("csrf")):
            await self.portal.services.audit.log(
                "csrf.failed",
                self.portal.actor(request, view),
                outcome="refused",
                detail={"form": "logout"},
            )
            return self.portal.page("logout_retry.html", view=view, status=400, title="Sign out")
        await self.sessions.end(view, self.portal.actor(request, view))
        return self._forget(redirect("/signed-out"))

    async def quick_exit(self, request: Request) -> Response:
        view = (await self.portal.current(request)).session
        if view is not None:
            actor = self.portal.actor(request, view)
            try:
                form = await read_form(request)
                token_ok = csrf_valid(view, form.get("csrf"))
            except (FormTooLarge, FormInvalid):
                token_ok = False
            if not token_ok:
                await self.portal.services.audit.log(
                    "csrf.failed", actor, outcome="ignored", detail={"form": "exit"}
                )
            await self.sessions.end(view, actor, detail={"quick_exit": True})
        url = self.portal.settings.quick_exit_url
        response = self.portal.pages.html("exit.html", exit_url=url)
        response.headers["Refresh"] = f"0; url={url}"
        return self._forget(response)
