"""Reading: ``/inbox``, ``/messages/{id}``, its attachments and inline images.

Promises: every route needs a signed-in session and shows only that
recipient's deliveries; any other id gets the neutral not-found page (404),
whether or not it exists. HTML bodies are sanitised (:mod:`web.sanitize`)
before they reach the page; withdrawn and expired messages show a notice
(410), never content.
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from escrow.errors import NotFound
from escrow.mailbox import Opened
from escrow.replies import MAX_TEXT_CHARS
from escrow.sessions import SessionView
from web.downloads import SAFE_IMAGES, part_response
from web.portal import Portal
from web.sanitize import display_html

_ID = re.compile(r"[0-9a-f]{32}")
MAX_PAGE = 100_000


class MailboxRoutes:
    """The inbox and message pages."""

    def __init__(self, portal: Portal) -> None:
        self.portal = portal
        self.mailbox = portal.domain.mailbox

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/inbox", self.inbox, methods=["GET"]),
            Route("/messages/{message_id}", self.message, methods=["GET"]),
            Route("/messages/{message_id}/attachments/{n:int}", self.attachment, methods=["GET"]),
            Route("/messages/{message_id}/images/{n:int}", self.image, methods=["GET"]),
        ]

    def not_found(self, view: SessionView | None) -> Response:
        return self.portal.page("not_found.html", view=view, status=404, title="Page not found")

    async def inbox(self, request: Request) -> Response:
        view = await self.portal.require(request)
        if isinstance(view, Response):
            return view
        raw = request.query_params.get("page", "1")
        page = int(raw) if raw.isdigit() and 0 < len(raw) < 7 else 1
        listing = await self.mailbox.inbox(view.principal_id, min(max(page, 1), MAX_PAGE))
        return self.portal.page("inbox.html", view=view, inbox=listing, title="Your messages")

    async def message(self, request: Request) -> Response:
        view = await self.portal.require(request)
        if isinstance(view, Response):
            return view
        message_id = str(request.path_params["message_id"])
        if not _ID.fullmatch(message_id):
            return self.not_found(view)
        try:
            opened = await self.mailbox.open(
                view.principal_id, message_id, self.portal.actor(request, view)
            )
        except NotFound:
            return self.not_found(view)
        return self.render(view, opened)

    def render(
        self,
        view: SessionView,
        opened: Opened,
        *,
        status: int = 200,
        reply_errors: tuple[str, ...] = (),
        reply_text: str = "",
    ) -> Response:
        """The message page (or the withdrawn/expired notice), with the reply form."""
        entry, content = opened.entry, opened.content
        if content is None:
            return self.portal.page(
                "unavailable.html", view=view, status=410, entry=entry, title="Message unavailable"
            )
        body_html = None
        if content.html is not None:
            by_cid = content.inline_by_cid

            def image_url(cid: str) -> str | None:
                index = by_cid.get(cid)
                return None if index is None else f"/messages/{entry.message_id}/images/{index}"

            body_html = display_html(content.html, image_url)
        return self.portal.page(
            "message.html",
            view=view,
            status=status,
            entry=entry,
            content=content,
            body_html=body_html,
            reply_errors=reply_errors,
            reply_text=reply_text,
            max_text=MAX_TEXT_CHARS,
            max_mb=self.portal.settings.max_message_mb,
            title="Message",
        )

    async def attachment(self, request: Request) -> Response:
        view = await self.portal.require(request)
        if isinstance(view, Response):
            return view
        message_id = str(request.path_params["message_id"])
        if not _ID.fullmatch(message_id):
            return self.not_found(view)
        try:
            part = await self.mailbox.attachment(
                view.principal_id,
                message_id,
                int(request.path_params["n"]),
                self.portal.actor(request, view),
            )
        except NotFound:
            return self.not_found(view)
        return part_response(part.data, part.filename, part.content_type)

    async def image(self, request: Request) -> Response:
        view = await self.portal.require(request)
        if isinstance(view, Response):
            return view
        message_id = str(request.path_params["message_id"])
        if not _ID.fullmatch(message_id):
            return self.not_found(view)
        try:
            part = await self.mailbox.inline(
                view.principal_id, message_id, int(request.path_params["n"])
            )
        except NotFound:
            return self.not_found(view)
        if part.content_type not in SAFE_IMAGES:
            return self.not_found(view)
        return part_response(part.data, part.filename, part.content_type, inline=True)
