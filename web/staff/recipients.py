"""Recipients: ``/staff/recipients`` (search by address), one recipient, and staff help.

Promises: any signed-in staff member may list recipients, see one's access
history (their own audited actions) and reset their passphrase, set a
first-access code or lift a lock. Those three are CSRF-checked POSTs done by
:class:`escrow.recipients.RecipientAccess` (the same code the CLI uses), so
each is audited and old messages stay readable after a reset. A code is
never echoed back or logged.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from escrow.errors import NotFound
from web.forms import field
from web.portal import redirect
from web.staff.shell import ID, Shell, Signed

DONE = {
    "reset": "The passphrase was cleared. The next time they open a link they will choose a new one.",
    "code": "The first-access code was set. Tell it to the client in person or by phone.",
    "unlock": "Signing in is no longer paused for this client.",
}


class RecipientRoutes:
    """Listing and helping recipients."""

    def __init__(self, shell: Shell) -> None:
        self.shell = shell
        self.access = shell.services.portal.recipients

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/staff/recipients", self.listing, methods=["GET"]),
            Route("/staff/recipients/{recipient_id}", self.detail, methods=["GET"]),
            Route("/staff/recipients/{recipient_id}/{action}", self.act, methods=["POST"]),
        ]

    async def listing(self, request: Request) -> Response:
        signed = await self.shell.require(request)
        if isinstance(signed, Response):
            return signed
        query = request.query_params.get("q", "")[:320]
        page = await self.shell.console.recipients(
            prefix=query, cursor=request.query_params.get("after")
        )
        return self.shell.page(
            "staff/recipients.html",
            view=signed.view,
            staff=signed.staff,
            listing=page,
            q=query,
            first=not request.query_params.get("after"),
            title="Recipients",
        )

    async def _render(
        self,
        signed: Signed,
        recipient_id: str,
        *,
        status: int = 200,
        notice: str = "",
        errors: tuple[str, ...] = (),
    ) -> Response:
        try:
            row, history = await self.shell.console.recipient(recipient_id)
        except NotFound:
            return self.shell.not_found(signed)
        return self.shell.page(
            "staff/recipient.html",
            view=signed.view,
            staff=signed.staff,
            status=status,
            r=row,
            history=history,
            notice=notice,
            errors=errors,
            title=f"Recipient {row.email}",
        )

    async def detail(self, request: Request) -> Response:
        signed = await self.shell.require(request)
        if isinstance(signed, Response):
            return signed
        done = request.query_params.get("done", "")
        return await self._render(
            signed, str(request.path_params["recipient_id"]), notice=DONE.get(done, "")
        )

    async def act(self, request: Request) -> Response:
        signed = await self.shell.require(request)
        if isinstance(signed, Response):
            return signed
        recipient_id = str(request.path_params["recipient_id"])
        action = str(request.path_params["action"])
        if not ID.fullmatch(recipient_id) or action not in DONE:
            return self.shell.not_found(signed)
        try:
            row, _history = await self.shell.console.recipient(recipient_id)
        except NotFound:
            return self.shell.not_found(signed)
        form = await self.shell.form(request, signed.view, f"recipient.{action}")
        if form is None:
            return self.shell.refused(signed)
        actor = self.shell.actor(request, signed.staff.id)
        if action == "reset":
            await self.access.reset(row.email, actor)
        elif action == "unlock":
            await self.access.unlock(row.email, actor)
        else:
            try:
                await self.access.set_code(row.email, field(form, "code"), actor)
            except ValueError:
                return await self._render(
                    signed,
                    recipient_id,
                    status=400,
                    errors=("A first-access code must be 4 to 64 characters.",),
                )
        return redirect(f"/staff/recipients/{recipient_id}?done={action}")
