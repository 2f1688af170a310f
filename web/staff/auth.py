"""Signing in to the console: password, then the second factor (or enrolling one), sign-out.

Promises:

* The sign-in form carries a CSRF token before any session exists: a
  random value in a short-lived cookie of its own (``__Host-`` on https,
  SameSite=Strict, HttpOnly) that the form must repeat (double submit), so
  another site cannot sign a browser in to an account of its choosing.
* The password starts a session at stage ``mfa`` only; the console opens
  when the second factor is proven (or, where one is required and none is
  enrolled, once one is enrolled). Each step that raises the session's
  privilege ends the old session and issues a new cookie value (fixation).
  A second factor is required for admins always, and for everyone unless
  ``ESCROW_STAFF_REQUIRE_TOTP=false``.
* The pending TOTP secret during enrolment is never sent in a cookie or a
  form field: it is derived on the server from the session's own random
  ``csrf_secret`` (HMAC-SHA256, domain-separated), so it is stable while
  that session lives, dies with it, and is stored nowhere until enrolment
  succeeds (then :class:`escrow.staff_security.StaffSecurity` seals it).
  The QR code is an SVG drawn on the server. Recovery codes are shown once.
* Sign-out ends the session on the server and clears the cookie.
* Lockout and per-address throttling are those of the domain; the pages
  say only "did not match" or "paused until", never which part was wrong.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from escrow.errors import StaffError
from escrow.lockout import AddressThrottle
from escrow.models import Staff
from escrow.sessions import SessionView
from escrow.staff_security import StaffSecurity
from web.forms import FormInvalid, FormTooLarge, field, read_form
from web.portal import redirect
from web.security import csrf_valid
from web.staff.shell import PENDING, Shell

SIGN_IN_FAILED = "That email address and password do not match an account. Please try again."
THROTTLED = "There have been too many attempts from your network. Please wait 15 minutes."
CODE_FAILED = "That code does not match. Check the time on your device and try again."


def pending_totp_secret(view: SessionView) -> str:
    """The TOTP secret offered during enrolment in this session (see the module promises)."""
    digest = hmac.new(
        bytes.fromhex(view.csrf_secret),
        b"escrow staff totp enrolment\x00" + view.id.encode(),
        hashlib.sha256,
    ).digest()
    return base64.b32encode(digest[:20]).decode("ascii")


def _grouped(secret: str) -> str:
    return " ".join(secret[i : i + 4] for i in range(0, len(secret), 4))


class AuthRoutes:
    """Sign-in, second factor, enrolment and sign-out."""

    def __init__(self, shell: Shell) -> None:
        self.shell = shell
        self.sessions = shell.sessions
        secure = shell.settings.secure_cookies
        self.pre_cookie = "__Host-escrow_staff_form" if secure else "escrow_staff_form"
        self.secure = secure
        # Per remote address, in this process (as for recipients: escrow.lockout).
        self.throttle = AddressThrottle()

    @property
    def security(self) -> StaffSecurity:
        return self.shell.services.staff_security

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/staff", self.home, methods=["GET"]),
            Route("/staff/", self.home, methods=["GET"]),
            Route("/staff/sign-in", self.sign_in_page, methods=["GET"]),
            Route("/staff/sign-in", self.sign_in, methods=["POST"]),
            Route("/staff/second-factor", self.second_factor_page, methods=["GET"]),
            Route("/staff/second-factor", self.second_factor, methods=["POST"]),
            Route("/staff/enrol", self.enrol_page, methods=["GET"]),
            Route("/staff/enrol", self.enrol, methods=["POST"]),
            Route("/staff/sign-out", self.sign_out, methods=["POST"]),
            Route("/staff/signed-out", self.signed_out, methods=["GET"]),
        ]

    async def home(self, request: Request) -> Response:
        view = (await self.shell.current(request)).session
        if view is not None and view.signed_in:
            return redirect("/staff/messages")
        return redirect("/staff/sign-in")

    # ------------------------------------------------------------ password

    def _sign_in_form(
        self,
        *,
        status: int = 200,
        errors: tuple[str, ...] = (),
        email: str = "",
        expired: bool = False,
        locked_until: object = None,
    ) -> Response:
        token = secrets.token_hex(32)
        response = self.shell.page(
            "staff/sign_in.html",
            view=None,
            status=status,
            form_token=token,
            errors=errors,
            email=email,
            expired=expired,
            locked_until=locked_until,
            title="Staff sign-in",
        )
        response.set_cookie(
            self.pre_cookie,
            token,
            max_age=3600,
            path="/",
            secure=self.secure,
            httponly=True,
            samesite="strict",
        )
        return response

    async def sign_in_page(self, request: Request) -> Response:
        view = (await self.shell.current(request)).session
        if view is not None and view.signed_in:
            return redirect("/staff/messages")
        return self._sign_in_form(expired=request.query_params.get("expired") == "1")

    async def sign_in(self, request: Request) -> Response:
        try:
            form = await read_form(request)
        except (FormTooLarge, FormInvalid):
            return self._sign_in_form(status=400, errors=("That form could not be read.",))
        expected = request.cookies.get(self.pre_cookie, "")
        submitted = field(form, "form_token")
        email = field(form, "email").strip()[:320]
        actor = self.shell.actor(request)
        if len(expected) != 64 or not hmac.compare_digest(expected, submitted):
            await self.shell.services.audit.log(
                "csrf.failed", actor, outcome="refused", detail={"form": "staff.sign_in"}
            )
            return self._sign_in_form(
                status=400,
                email=email,
                errors=("This page was open for a long time. Please sign in again.",),
            )
        if self.throttle.blocked(actor.remote_addr):
            await self.shell.services.audit.log(
                "staff.login_failed", actor, outcome="throttled", detail={"step": "password"}
            )
            return self._sign_in_form(status=429, email=email, errors=(THROTTLED,))
        result = await self.security.sign_in(email, field(form, "password")[:1024], actor=actor)
        if result.outcome in ("failed", "locked"):
            self.throttle.failed(actor.remote_addr)
        if result.outcome == "locked":
            return self._sign_in_form(status=401, email=email, locked_until=result.locked_until)
        if result.outcome not in ("ok", "second_factor", "enrol") or result.staff is None:
            return self._sign_in_form(status=401, email=email, errors=(SIGN_IN_FAILED,))
        staff: Staff = result.staff
        outcome = result.outcome
        if outcome == "ok" and self._needs_factor(staff):
            outcome = "enrol"  # defence in depth: never skip a required second factor
        stage = "full" if outcome == "ok" else PENDING
        response = redirect("/staff/messages" if stage == "full" else "/staff/second-factor")
        await self._replace_session(request, response, staff.id, stage)
        response.delete_cookie(self.pre_cookie, path="/", secure=self.secure, httponly=True)
        return response

    def _needs_factor(self, staff: Staff) -> bool:
        required = staff.role == "admin" or self.shell.settings.staff_require_totp
        return required and staff.totp_enrolled_at is None

    async def _replace_session(
        self, request: Request, response: Response, staff_id: str, stage: str
    ) -> SessionView:
        """End the request's staff session (if any) and start a new one; set its cookie."""
        old = (await self.shell.current(request)).session
        actor = self.shell.actor(request, staff_id)
        async with self.shell.services.db.write() as session:
            if old is not None:
                await self.sessions.end_in(session, old.id)
            started = self.sessions.start_in(session, "staff", staff_id, stage=stage, actor=actor)
        self.shell.cookies.set(response, started.token)
        return started.session

    # ------------------------------------------------------------ second factor

    async def _pending(self, request: Request) -> tuple[SessionView, Staff] | Response:
        resolved = await self.shell.current(request)
        view = resolved.session
        if view is None:
            return self.shell.to_sign_in(expired=resolved.expired)
        if view.signed_in:
            return redirect("/staff/messages")
        staff = await self.shell.services.staff.get(view.principal_id)
        if staff is None or staff.disabled:
            return self.shell.to_sign_in()
        return view, staff

    def _code_form(
        self,
        view: SessionView,
        *,
        status: int = 200,
        errors: tuple[str, ...] = (),
        locked: bool = False,
    ) -> Response:
        return self.shell.page(
            "staff/second_factor.html",
            view=view,
            status=status,
            errors=errors,
            locked=locked,
            title="Second factor",
        )

    async def second_factor_page(self, request: Request) -> Response:
        pending = await self._pending(request)
        if isinstance(pending, Response):
            return pending
        view, staff = pending
        if staff.totp_enrolled_at is None:
            return redirect("/staff/enrol")
        return self._code_form(view)

    async def second_factor(self, request: Request) -> Response:
        pending = await self._pending(request)
        if isinstance(pending, Response):
            return pending
        view, staff = pending
        form = await self.shell.form(request, view, "second_factor")
        if form is None:
            return self._code_form(
                view, status=400, errors=("This page was open for a long time. Please try again.",)
            )
        code = field(form, "code").strip().replace(" ", "")[:64]
        actor = self.shell.actor(request, staff.id)
        if self.throttle.blocked(actor.remote_addr):
            await self.shell.services.audit.log(
                "staff.login_failed", actor, outcome="throttled", detail={"step": "second_factor"}
            )
            return self._code_form(view, status=429, errors=(THROTTLED,))
        outcome = await self.security.verify_second_factor(staff.id, code, actor=actor)
        if outcome != "ok":
            self.throttle.failed(actor.remote_addr)
        if outcome == "ok":
            response = redirect("/staff/messages")
            await self._replace_session(request, response, staff.id, "full")
            return response
        if outcome == "locked":
            return self._code_form(view, status=401, locked=True)
        return self._code_form(view, status=401, errors=(CODE_FAILED,))

    # ------------------------------------------------------------ enrolment

    async def _enrolling(self, request: Request) -> tuple[SessionView, Staff] | Response:
        """A session that may enrol: pending without a factor, or signed in without one."""
        resolved = await self.shell.current(request)
        view = resolved.session
        if view is None:
            return self.shell.to_sign_in(expired=resolved.expired)
        staff = await self.shell.services.staff.get(view.principal_id)
        if staff is None or staff.disabled:
            return self.shell.to_sign_in()
        if staff.totp_enrolled_at is not None:
            return redirect("/staff/messages" if view.signed_in else "/staff/second-factor")
        return view, staff

    def _enrol_form(
        self, view: SessionView, staff: Staff, *, status: int = 200, errors: tuple[str, ...] = ()
    ) -> Response:
        secret = pending_totp_secret(view)
        uri = self.security.provisioning_uri(secret, staff.email)
        return self.shell.page(
            "staff/enrol.html",
            view=view,
            staff=staff if view.signed_in else None,
            status=status,
            errors=errors,
            qr=self.security.qr_svg(uri),
            secret=_grouped(secret),
            title="Set up your second factor",
        )

    async def enrol_page(self, request: Request) -> Response:
        enrolling = await self._enrolling(request)
        if isinstance(enrolling, Response):
            return enrolling
        view, staff = enrolling
        return self._enrol_form(view, staff)

    async def enrol(self, request: Request) -> Response:
        enrolling = await self._enrolling(request)
        if isinstance(enrolling, Response):
            return enrolling
        view, staff = enrolling
        form = await self.shell.form(request, view, "enrol")
        if form is None:
            return self._enrol_form(
                view,
                staff,
                status=400,
                errors=("This page was open for a long time. Please try again.",),
            )
        code = field(form, "code").strip().replace(" ", "")[:16]
        try:
            codes = await self.security.enrol_totp(
                staff.id,
                pending_totp_secret(view),
                code,
                actor=self.shell.actor(request, staff.id),
                signing_in=not view.signed_in,
            )
        except StaffError:
            return self._enrol_form(view, staff, status=400, errors=(CODE_FAILED,))
        response = self.shell.page(
            "staff/recovery_codes.html",
            view=None,
            codes=codes,
            title="Your recovery codes",
        )
        # Proving a new factor completes the sign-in: a new session, a new cookie.
        await self._replace_session(request, response, staff.id, "full")
        return response

    # ------------------------------------------------------------ sign-out

    async def sign_out(self, request: Request) -> Response:
        view = (await self.shell.current(request)).session
        response = redirect("/staff/signed-out")
        self.shell.cookies.clear(response)
        if view is None:
            return response
        try:
            form = await read_form(request)
            token_ok = csrf_valid(view, form.get("csrf"))
        except (FormTooLarge, FormInvalid):
            token_ok = False
        if not token_ok:
            await self.shell.services.audit.log(
                "csrf.failed",
                self.shell.actor(request, view.principal_id),
                outcome="refused",
                detail={"form": "staff.sign_out"},
            )
            return self.shell.refused(None, view)
        await self.sessions.end(view, self.shell.actor(request, view.principal_id))
        response.headers["Clear-Site-Data"] = '"cache", "cookies", "storage"'
        return response

    async def signed_out(self, _request: Request) -> Response:
        return self.shell.page("staff/signed_out.html", view=None, title="Signed out")
