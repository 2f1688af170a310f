"""Staff reset through the real `escrow` command: a new passphrase, and old messages still read."""

from __future__ import annotations

import asyncio
import os
import sys

from sqlalchemy import select

from escrow.models import AuditEvent, Recipient
from tests.conftest import MASTER
from tests.web.helpers import CLIENT, GOOD, Portal, csrf_of

NEW = "seven quiet herons over the canal"


async def escrow(portal: Portal, *args: str, stdin: str = "") -> tuple[int, str, str]:
    settings = portal.services.settings
    env = {
        "PATH": os.environ.get("PATH", ""),
        "ESCROW_DATA_DIR": str(settings.data_dir),
        "ESCROW_DATABASE_URL": settings.database_url,
        "ESCROW_MASTER_PASSPHRASE": MASTER,
        "ESCROW_NOTIFY_FROM": settings.notify_from,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "escrow.cli",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=str(settings.data_dir.parent),
    )
    out, err = await process.communicate(stdin.encode())
    return process.returncode or 0, out.decode(), err.decode()


async def test_after_a_reset_the_client_chooses_a_new_passphrase_and_reads_old_mail(
    portal: Portal,
) -> None:
    sent = await portal.send()
    await portal.set_up(sent)
    old_cookie = portal.client.cookies["escrow_session"]

    code, out, err = await escrow(portal, "recipient", "reset", CLIENT)

    assert code == 0, err
    assert "reset" in out
    portal.client.cookies.set("escrow_session", old_cookie)
    assert (await portal.client.get("/inbox")).status_code == 401  # sessions ended
    portal.client.cookies.clear()
    page = await portal.open(sent.token)
    assert "Choose a passphrase" in page.text  # consent is not asked twice
    response = await portal.post("/access/passphrase", {"passphrase": NEW, "confirm": NEW}, page)
    assert response.status_code == 303
    message = await portal.client.get(f"/messages/{sent.message_id}")
    assert message.status_code == 200
    assert "here are the notes we talked about" in message.text
    portal.client.cookies.clear()
    old = await portal.sign_in(sent, GOOD)
    assert old.status_code == 401


async def test_set_code_then_reset_asks_for_the_code_first(portal: Portal) -> None:
    sent = await portal.send()
    await portal.set_up(sent)

    code, _out, err = await escrow(
        portal, "recipient", "set-code", CLIENT, "--code-stdin", stdin="2468-1357\n"
    )
    assert code == 0, err
    code, _out, err = await escrow(portal, "recipient", "reset", CLIENT)
    assert code == 0, err
    portal.client.cookies.clear()

    page = await portal.open(sent.token)
    assert "first-access code" in page.text
    async with portal.services.db.read() as session:
        row = (await session.scalars(select(Recipient).where(Recipient.email == CLIENT))).one()
        events = (await session.scalars(select(AuditEvent))).all()
    assert row.access_code_hash is not None and "2468" not in row.access_code_hash
    assert all("2468" not in e.detail for e in events)
    right = await portal.client.post(
        "/access/code", data={"csrf": csrf_of(page), "code": "2468-1357"}
    )
    assert right.status_code == 303


async def test_unlock_and_unknown_addresses(portal: Portal) -> None:
    sent = await portal.send()
    await portal.set_up(sent)

    code, out, err = await escrow(portal, "recipient", "unlock", CLIENT)
    assert code == 0, err
    assert "unlocked" in out
    code, _out, err = await escrow(portal, "recipient", "reset", "nobody@example.org")
    assert code == 1
    assert "no recipient" in err
    assert "Traceback" not in err
