"""HTTP security for every response, cookies and CSRF tokens.

Promises:

* :class:`SecurityHeaders` sets, on every response (pages, static files,
  redirects, errors): a strict Content-Security-Policy (no inline script or
  style, nothing from other origins, no framing), ``Referrer-Policy:
  no-referrer`` (the link token must not leak), ``X-Content-Type-Options:
  nosniff``, ``X-Frame-Options: DENY``, a minimal ``Permissions-Policy``, and
  ``Cache-Control: no-store`` on everything but ``/static/``. With an https
  ``ESCROW_PUBLIC_URL`` it adds HSTS.
* The session cookie is opaque, HttpOnly, SameSite=Strict, Path=/, and, for
  an https public URL, Secure with the ``__Host-`` prefix. It has no
  Max-Age: it ends with the browser, and the server ends it sooner.
* A CSRF token is an HMAC of the session id under the session's own
  ``csrf_secret``: valid for exactly one server-side session.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from escrow.sessions import SessionView

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
PERMISSIONS = "camera=(), microphone=(), geolocation=(), payment=(), usb=(), display-capture=()"
_STATIC_CACHE = b"public, max-age=3600"


def security_headers(*, hsts: bool) -> list[tuple[bytes, bytes]]:
    """The headers every response carries (Cache-Control is decided per path)."""
    headers = [
        (b"content-security-policy", CSP.encode()),
        (b"referrer-policy", b"no-referrer"),
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"permissions-policy", PERMISSIONS.encode()),
        (b"cross-origin-opener-policy", b"same-origin"),
        (b"cross-origin-resource-policy", b"same-origin"),
    ]
    if hsts:
        headers.append((b"strict-transport-security", b"max-age=31536000"))
    return headers


def apply_headers(response: Response, *, hsts: bool) -> Response:
    """Set the security headers on a response built outside the middleware (error pages)."""
    for name, value in security_headers(hsts=hsts):
        response.headers[name.decode()] = value.decode()
    response.headers["cache-control"] = "no-store"
    return response


class SecurityHeaders:
    """ASGI middleware: the security headers on every HTTP response (see module promises)."""

    def __init__(self, app: ASGIApp, *, hsts: bool = False) -> None:
        self.app = app
        self._headers = security_headers(hsts=hsts)
        self._names = {name for name, _ in self._headers} | {b"cache-control"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() not in self._names
                ]
                cache = _STATIC_CACHE if static else b"no-store"
                message["headers"] = [*kept, *self._headers, (b"cache-control", cache)]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Cookies:
    """The session cookie's name and attributes."""

    def __init__(self, *, secure: bool) -> None:
        self.secure = secure
        self.name = "__Host-escrow_session" if secure else "escrow_session"

    def read(self, cookies: dict[str, str]) -> str | None:
        return cookies.get(self.name)

    def set(self, response: Response, token: str) -> None:
        response.set_cookie(
            self.name, token, path="/", secure=self.secure, httponly=True, samesite="strict"
        )

    def clear(self, response: Response) -> None:
        response.delete_cookie(
            self.name, path="/", secure=self.secure, httponly=True, samesite="strict"
        )


def csrf_token(view: SessionView) -> str:
    """The CSRF token for forms of this session."""
    return hmac.new(bytes.fromhex(view.csrf_secret), view.id.encode(), hashlib.sha256).hexdigest()


def csrf_valid(view: SessionView | None, submitted: object) -> bool:
    """Whether ``submitted`` is this session's CSRF token (constant-time)."""
    if view is None or not isinstance(submitted, str) or len(submitted) != 64:
        return False
    return hmac.compare_digest(csrf_token(view), submitted)
