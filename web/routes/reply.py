"""Replying: ``POST /messages/{id}/reply`` and its confirmation page.

Promises: the form is CSRF-checked and size-limited while it streams in
(text and files together at most ``ESCROW_MAX_MESSAGE_MB``, plus form
overhead); uploads never touch the disk in clear (:mod:`web.forms`). A
refused reply redraws the message page with the typed text kept and a plain
reason (400, or 413 when too large); an accepted one redirects to a
confirmation page, so reloading cannot send it twice.
"""

from __future__ import annotations

import re

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from escrow.errors import NotFound
from escrow.mime import Upload
from escrow.replies import MAX_FILES, MAX_TEXT_CHARS, ReplyRefused
from escrow.sessions import SessionView
from web.forms import FormInvalid, FormTooLarge, field, read_form
from web.portal import Portal, redirect
from web.routes.link import CSRF_MESSAGE
from web.routes.mailbox import MailboxRoutes
from web.security import csrf_valid

_ID = re.compile(r"[0-9a-f]{32}")
# Multipart boundaries and part headers on top of the content itself.
FORM_OVERHEAD = 256 * 1024


class ReplyRoutes:
    """Sending a reply."""

    def __init__(self, portal: Portal, mailbox_routes: MailboxRoutes) -> None:
        self.portal = portal
        self.pages = mailbox_routes
        self.replies = portal.domain.replies
        self.mailbox = portal.domain.mailbox

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/messages/{message_id}/reply", self.reply, methods=["POST"]),
            Route("/messages/{message_id}/replied", self.replied, methods=["GET"]),
        ]

    def _reasons(self, reason: str) -> tuple[str, ...]:
        limit = self.portal.settings.max_message_mb
        return {
            "empty": ("Please write a reply or attach a file.",),
            "too_large": (
                f"Your reply and its files are larger than {limit} MB. Please send fewer or smaller files.",
            ),
            "too_many_files": (f"Please attach at most {MAX_FILES} files to one reply.",),
            "too_long": (
                f"Your reply is longer than {MAX_TEXT_CHARS:,} characters. Please shorten it or send it in parts.",
            ),
            "invalid": ("Your reply could not be read. Please try again.",),
            "csrf": (CSRF_MESSAGE,),
        }.get(reason, ("Your reply could not be sent. Please try again.",))

    async def _redraw(
        self, view: SessionView, message_id: str, reason: str, text: str, status: int
    ) -> Response:
        try:
            opened = await self.mailbox.peek(view.principal_id, message_id)
        except NotFound:
            return self.pages.not_found(view)
        return self.pages.render(
            view, opened, status=status, reply_errors=self._reasons(reason), reply_text=text
        )

    async def reply(self, request: Request) -> Response:
        view = await self.portal.require(request)
        if isinstance(view, Response):
            return view
        message_id = str(request.path_params["message_id"])
        if not _ID.fullmatch(message_id):
            return self.pages.not_found(view)
        try:
            form = await read_form(
                request,
                max_bytes=self.portal.settings.max_message_bytes + FORM_OVERHEAD,
                max_files=MAX_FILES,
                max_fields=10,
                max_field_bytes=MAX_TEXT_CHARS * 4 + 1024,
            )
        except FormTooLarge:
            return await self._redraw(view, message_id, "too_large", "", 413)
        except FormInvalid:
            return await self._redraw(view, message_id, "invalid", "", 400)
        text = field(form, "text")
        if not csrf_valid(view, form.get("csrf")):
            await self.portal.services.audit.log(
                "csrf.failed",
                self.portal.actor(request, view),
                outcome="refused",
                message_id=message_id,
                detail={"form": "reply"},
            )
            return await self._redraw(view, message_id, "csrf", text, 400)
        uploads = []
        for item in form.getlist("files"):
            if not isinstance(item, UploadFile):
                continue
            data = await item.read()
            if not item.filename and not data:  # the empty part a browser sends for "no file"
                continue
            uploads.append(
                Upload(item.filename or "", item.content_type or "application/octet-stream", data)
            )
        try:
            await self.replies.send(
                view.principal_id, message_id, text, uploads, self.portal.actor(request, view)
            )
        except NotFound:
            return self.pages.not_found(view)
        except ReplyRefused as refused:
            status = 413 if refused.reason == "too_large" else 400
            if refused.reason == "unavailable":
                return await self._redraw(view, message_id, refused.reason, "", 410)
            return await self._redraw(view, message_id, refused.reason, text, status)
        finally:
            await form.close()
        return redirect(f"/messages/{message_id}/replied")

    async def replied(self, request: Request) -> Response:
        view = await self.portal.require(request)
        if isinstance(view, Response):
            return view
        message_id = str(request.path_params["message_id"])
        if not _ID.fullmatch(message_id):
            return self.pages.not_found(view)
        try:
            entry = await self.mailbox.entry(view.principal_id, message_id)
        except NotFound:
            return self.pages.not_found(view)
        return self.portal.page("reply_sent.html", view=view, entry=entry, title="Reply sent")
