"""App passwords: ``/staff/app-passwords``, one SMTP password per mail client or device.

Promises: a staff member creates, lists and revokes only their own app
passwords (CSRF-checked POSTs, audited by
:class:`escrow.staff_security.StaffSecurity`). A new password is shown once,
on the response to the POST that made it (``Cache-Control: no-store``), and
never again: only its hash is kept.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from escrow.errors import EscrowError, NotFound
from web.forms import field
from web.portal import redirect
from web.staff.shell import ID, Shell, Signed

MAX_NAME = 100


class DeviceRoutes:
    """Creating, listing and revoking app passwords."""

    def __init__(self, shell: Shell) -> None:
        self.shell = shell

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/staff/app-passwords", self.listing, methods=["GET"]),
            Route("/staff/app-passwords", self.create, methods=["POST"]),
            Route("/staff/app-passwords/{password_id}/revoke", self.revoke, methods=["POST"]),
        ]

    async def _page(
        self,
        signed: Signed,
        *,
        status: int = 200,
        created: tuple[str, str] | None = None,
        errors: tuple[str, ...] = (),
        notice: str = "",
    ) -> Response:
        passwords = await self.shell.services.staff_security.list_app_passwords(signed.staff.id)
        return self.shell.page(
            "staff/app_passwords.html",
            view=signed.view,
            staff=signed.staff,
            status=status,
            passwords=passwords,
            created=created,
            errors=errors,
            notice=notice,
            max_name=MAX_NAME,
            smtp_host=self.shell.settings.smtp_hostname,
            smtp_port=self.shell.settings.smtp_port,
            title="App passwords",
        )

    async def listing(self, request: Request) -> Response:
        signed = await self.shell.require(request)
        if isinstance(signed, Response):
            return signed
        revoked = request.query_params.get("done") == "revoked"
        return await self._page(signed, notice="The app password was revoked." if revoked else "")

    async def create(self, request: Request) -> Response:
        signed = await self.shell.require(request)
        if isinstance(signed, Response):
            return signed
        form = await self.shell.form(request, signed.view, "app_password.create")
        if form is None:
            return self.shell.refused(signed)
        name = " ".join(field(form, "name").split())
        if not name or len(name) > MAX_NAME:
            return await self._page(
                signed,
                status=400,
                errors=(f"Please name the device or mail client (up to {MAX_NAME} characters).",),
            )
        try:
            info, secret = await self.shell.services.staff_security.create_app_password(
                signed.staff.id, name, actor=self.shell.actor(request, signed.staff.id)
            )
        except EscrowError as refused:
            return await self._page(signed, status=400, errors=(str(refused).capitalize() + ".",))
        return await self._page(signed, created=(info.name, secret))

    async def revoke(self, request: Request) -> Response:
        signed = await self.shell.require(request)
        if isinstance(signed, Response):
            return signed
        password_id = str(request.path_params["password_id"])
        if not ID.fullmatch(password_id):
            return self.shell.not_found(signed)
        form = await self.shell.form(request, signed.view, "app_password.revoke")
        if form is None:
            return self.shell.refused(signed)
        try:
            await self.shell.services.staff_security.revoke_app_password(
                signed.staff.id, password_id, actor=self.shell.actor(request, signed.staff.id)
            )
        except (NotFound, EscrowError):
            return self.shell.not_found(signed)
        return redirect("/staff/app-passwords?done=revoked")
