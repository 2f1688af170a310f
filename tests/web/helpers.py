"""Helpers for portal tests: real MIME messages through real intake, and a browsing client."""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import make_msgid

import httpx
from sqlalchemy import select

from escrow.intake import Submission
from escrow.models import Delivery, Message
from escrow.services import Services

THERAPIST = "ada@riverside.example"
CLIENT = "sam.client@example.org"
GOOD = "copper kettle under seven maple leaves"
PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"
    b"\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\xcf\xc0\xf0\x1f\x00\x05\x00\x01\xff\x89\x99"
    b"=\x1d\x00\x00\x00\x00IEND\xaeB`\x82"
)
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n" + bytes(range(256))
_CSRF = re.compile(r'name="csrf" value="([0-9a-f]{64})"')


def mime_message(
    *,
    subject: str = "Notes from our session",
    text: str = "Hello Sam,\nhere are the notes we talked about.\n",
    html: str | None = None,
    inline_png: bool = False,
    attachments: tuple[tuple[str, str, bytes], ...] = (),
    to: str = CLIENT,
    message_id: str | None = None,
) -> bytes:
    """A real message as a mail client would send it."""
    message = EmailMessage(policy=SMTP)
    message["From"] = f"Ada Lovelace <{THERAPIST}>"
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = message_id or make_msgid(domain="riverside.example")
    message.set_content(text)
    if html is not None:
        message.add_alternative(html, subtype="html")
        if inline_png:
            html_part = message.get_payload()[1]
            html_part.add_related(PNG, maintype="image", subtype="png", cid="<logo@riverside>")
    for filename, ctype, data in attachments:
        maintype, subtype = ctype.split("/")
        message.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return message.as_bytes()


@dataclass
class Sent:
    token: str
    message_id: str
    delivery_id: str
    rfc_message_id: str


def csrf_of(page: httpx.Response) -> str:
    found = _CSRF.search(page.text)
    assert found, "page has no CSRF token"
    return found.group(1)


@dataclass
class Portal:
    """A browsing client against create_app(services), plus ways to put mail in."""

    services: Services
    client: httpx.AsyncClient

    async def send(self, content: bytes | None = None, *, to: str = CLIENT) -> Sent:
        """Accept a message through intake and read the link token from its notification job."""
        content = content or mime_message(to=to)
        accepted = await self.services.intake.accept(
            Submission(
                mail_from=THERAPIST,
                recipients=[to],
                content=content,
                staff_id=None,
                remote_addr="192.0.2.1",
            )
        )
        assert accepted.message_id is not None
        async with self.services.db.read() as session:
            delivery = (
                await session.scalars(
                    select(Delivery).where(Delivery.message_id == accepted.message_id)
                )
            ).one()
            message = await session.get(Message, accepted.message_id)
            assert message is not None
        token = self.services.links.token_for(delivery.id)
        return Sent(token, accepted.message_id, delivery.id, message.rfc_message_id)

    async def open(self, token: str) -> httpx.Response:
        """Follow a link, then the redirect to the access page."""
        return await self.client.get(f"/m/{token}", follow_redirects=True)

    async def post(
        self, path: str, data: dict[str, str], page: httpx.Response | None = None
    ) -> httpx.Response:
        """POST a form with the CSRF token of ``page`` (or of a fresh GET of /access)."""
        if page is None:
            page = await self.client.get("/access")
        return await self.client.post(path, data={"csrf": csrf_of(page), **data})

    async def set_up(self, sent: Sent, passphrase: str = GOOD) -> httpx.Response:
        """First visit: consent, choose a passphrase; returns the message page."""
        page = await self.open(sent.token)
        assert "Before you start" in page.text, page.text
        page = await self.post("/access/consent", {"agree": "yes"}, page)
        assert page.status_code == 303
        page = await self.client.get("/access")
        response = await self.post(
            "/access/passphrase", {"passphrase": passphrase, "confirm": passphrase}, page
        )
        assert response.status_code == 303, response.text
        return await self.client.get(response.headers["location"])

    async def sign_in(self, sent: Sent, passphrase: str = GOOD) -> httpx.Response:
        page = await self.open(sent.token)
        return await self.post("/access/sign-in", {"passphrase": passphrase}, page)
