"""Sent messages: ``/staff/messages``, one message, revoking, legal hold, replies.

Promises:

* A staff member lists and opens only their own messages; an admin, all.
  Anything else is the neutral 404, so message ids are never confirmed.
* The list is keyset-paginated (``?after=``) and filtered by recipient
  address and delivery state; its cost does not grow with the vault.
* Revoking is a POST with the CSRF token, reached through a confirmation
  page; the legal hold is a POST for admins only. Both are done and audited
  by :mod:`escrow.lifecycle`.
* ``/staff/messages/{id}`` also serves a client's reply (the link a
  ``notify``-mode notice carries points at the original): the reply's text
  and attachments are opened only for the staff member it was addressed to,
  and that is audited.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from escrow.console import STATUSES
from escrow.errors import EscrowError, NotFound
from web.downloads import part_response
from web.forms import field
from web.portal import redirect
from web.staff.shell import ID, Shell, Signed


class MessageRoutes:
    """The sent-messages pages."""

    def __init__(self, shell: Shell) -> None:
        self.shell = shell
        self.console = shell.console

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/staff/messages", self.listing, methods=["GET"]),
            Route("/staff/messages/{message_id}", self.detail, methods=["GET"]),
            Route("/staff/messages/{message_id}/revoke", self.confirm_revoke, methods=["GET"]),
            Route("/staff/messages/{message_id}/revoke", self.revoke, methods=["POST"]),
            Route("/staff/messages/{message_id}/hold", self.hold, methods=["POST"]),
            Route(
                "/staff/messages/{message_id}/attachments/{n:int}",
                self.attachment,
                methods=["GET"],
            ),
        ]

    async def listing(self, request: Request) -> Response:
        signed = await self.shell.require(request)
        if isinstance(signed, Response):
            return signed
        recipient = request.query_params.get("recipient", "")[:320]
        status = request.query_params.get("status", "")
        status = status if status in STATUSES else ""
        page = await self.console.sent(
            signed.viewer,
            recipient=recipient,
            status=status,
            cursor=request.query_params.get("after"),
        )
        return self.shell.page(
            "staff/messages.html",
            view=signed.view,
            staff=signed.staff,
            sent=page,
            recipient=recipient,
            state=status,
            statuses=STATUSES,
            first=not request.query_params.get("after"),
            title="Sent messages" if not signed.admin else "All messages",
        )

    async def _detail(self, signed: Signed, message_id: str, request: Request) -> Response:
        detail = await self.console.message(signed.viewer, message_id)
        if detail.direction == "reply":
            opened = None
            if detail.message.staff_id == signed.staff.id:
                opened = await self.console.open_reply(
                    signed.viewer, message_id, self.shell.actor(request, signed.staff.id)
                )
            return self.shell.page(
                "staff/reply.html",
                view=signed.view,
                staff=signed.staff,
                detail=detail,
                reply=opened,
                title="Reply from a client",
            )
        names = await self.console.staff_names(
            {e.actor_id for e in detail.trail if e.actor_type == "staff"}
        )
        return self.shell.page(
            "staff/message.html",
            view=signed.view,
            staff=signed.staff,
            detail=detail,
            m=detail.message,
            staff_names=names,
            notice=request.query_params.get("done", ""),
            title="Message",
        )

    async def detail(self, request: Request) -> Response:
        signed = await self.shell.require(request)
        if isinstance(signed, Response):
            return signed
        message_id = str(request.path_params["message_id"])
        if not ID.fullmatch(message_id):
            return self.shell.not_found(signed)
        try:
            return await self._detail(signed, message_id, request)
        except NotFound:
            return self.shell.not_found(signed)

    async def confirm_revoke(self, request: Request) -> Response:
        signed = await self.shell.require(request)
        if isinstance(signed, Response):
            return signed
        message_id = str(request.path_params["message_id"])
        try:
            detail = await self.console.message(signed.viewer, message_id)
        except NotFound:
            return self.shell.not_found(signed)
        if detail.direction != "outbound":
            return self.shell.not_found(signed)
        return self.shell.page(
            "staff/revoke.html",
            view=signed.view,
            staff=signed.staff,
            m=detail.message,
            title="Withdraw this message?",
        )

    async def revoke(self, request: Request) -> Response:
        signed = await self.shell.require(request)
        if isinstance(signed, Response):
            return signed
        message_id = str(request.path_params["message_id"])
        try:
            await self.console.message(signed.viewer, message_id)
        except NotFound:
            return self.shell.not_found(signed)
        form = await self.shell.form(request, signed.view, "revoke")
        if form is None:
            return self.shell.refused(signed)
        try:
            await self.shell.services.lifecycle.revoke(
                message_id, staff=signed.staff, actor=self.shell.actor(request, signed.staff.id)
            )
        except NotFound:
            return self.shell.not_found(signed)
        except EscrowError:
            return self.shell.not_found(signed)
        return redirect(f"/staff/messages/{message_id}?done=revoked")

    async def hold(self, request: Request) -> Response:
        signed = await self.shell.require(request, admin=True)
        if isinstance(signed, Response):
            return signed
        message_id = str(request.path_params["message_id"])
        try:
            await self.console.message(signed.viewer, message_id)
        except NotFound:
            return self.shell.not_found(signed)
        form = await self.shell.form(request, signed.view, "hold")
        if form is None:
            return self.shell.refused(signed)
        hold = field(form, "hold") == "on"
        try:
            await self.shell.services.lifecycle.set_legal_hold(
                message_id,
                hold,
                staff=signed.staff,
                actor=self.shell.actor(request, signed.staff.id),
            )
        except EscrowError:
            return self.shell.not_found(signed)
        return redirect(f"/staff/messages/{message_id}?done={'held' if hold else 'released'}")

    async def attachment(self, request: Request) -> Response:
        """An attachment of a client's reply, for the staff member it was addressed to."""
        signed = await self.shell.require(request)
        if isinstance(signed, Response):
            return signed
        message_id = str(request.path_params["message_id"])
        try:
            part = await self.console.reply_attachment(
                signed.viewer,
                message_id,
                int(request.path_params["n"]),
                self.shell.actor(request, signed.staff.id),
            )
        except NotFound:
            return self.shell.not_found(signed)
        return part_response(part.data, part.filename, part.content_type)
