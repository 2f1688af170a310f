"""SMTP AUTH with app passwords, and the account password only until a second factor is enrolled."""

from __future__ import annotations

import base64
import json

import pyotp

from escrow.audit import Actor
from tests.smtp.conftest import (
    OPERATOR,
    STAFF_EMAIL,
    STAFF_PASSWORD,
    EscrowServer,
    Sink,
    audit_events,
    dump_tables,
    eventually,
    in_thread,
    leaks,
    secured,
    simple_message,
    submit,
)

CLIENT = "alex.client@example.net"
OTHER_STAFF = "dr.voss@riverside.example"
CONSOLE = Actor("staff", remote_addr="192.0.2.7")


def b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def plain(login: str, password: str) -> str:
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


def auth_code(escrow: EscrowServer, login: str, password: str) -> int:
    """The reply code to AUTH PLAIN on a fresh STARTTLS connection."""
    client = secured(escrow.port, escrow.cafile)
    try:
        return int(client.docmd("AUTH", f"PLAIN {plain(login, password)}")[0])
    finally:
        client.quit()


async def staff_id(escrow: EscrowServer, email: str = STAFF_EMAIL) -> str:
    staff = await escrow.services.staff_security.find(email)
    assert staff is not None
    return staff.id


async def enrol(escrow: EscrowServer, member_id: str) -> str:
    security = escrow.services.staff_security
    secret = security.new_totp_secret()
    await security.enrol_totp(member_id, secret, pyotp.TOTP(secret).now(), actor=CONSOLE)
    return secret


async def test_an_app_password_sends_mail_until_it_is_revoked(
    escrow: EscrowServer, sink: Sink
) -> None:
    member = await staff_id(escrow)
    security = escrow.services.staff_security
    info, secret = await security.create_app_password(member, "iPhone", actor=CONSOLE)
    data = simple_message(STAFF_EMAIL, [CLIENT])

    reply = await in_thread(
        submit, escrow.port, escrow.cafile, STAFF_EMAIL, [CLIENT], data, password=secret
    )
    assert reply.code == 250, reply
    await eventually(lambda: sink.to(CLIENT), what="the notification")
    [ok] = await audit_events(escrow.services, "smtp.auth_ok")
    assert (ok.actor_id, ok.remote_addr) == (member, "127.0.0.1")
    assert json.loads(ok.detail) == {"app_password": "iPhone"}
    [listed] = await security.list_app_passwords(member)
    assert listed.last_used_at is not None

    # AUTH LOGIN too, typed as phones show it (upper case, spaces for hyphens).
    loose = secret.replace("-", " ").upper()

    def with_login() -> tuple[int, int]:
        client = secured(escrow.port, escrow.cafile)
        try:
            challenge = client.docmd("AUTH", f"LOGIN {b64(STAFF_EMAIL)}")[0]
            return int(challenge), int(client.docmd(b64(loose))[0])
        finally:
            client.quit()

    assert await in_thread(with_login) == (334, 235)

    await security.revoke_app_password(member, info.id, actor=CONSOLE)
    assert await in_thread(auth_code, escrow, STAFF_EMAIL, secret) == 535
    failed = await audit_events(escrow.services, "smtp.auth_failed")
    assert [e.outcome for e in failed] == ["denied"]
    # Revoking one leaves the others working.
    _other, second = await security.create_app_password(member, "Outlook", actor=CONSOLE)
    assert await in_thread(auth_code, escrow, STAFF_EMAIL, second) == 235


async def test_the_account_password_stops_working_once_totp_is_enrolled(
    escrow: EscrowServer,
) -> None:
    member = await staff_id(escrow)
    security = escrow.services.staff_security
    _info, secret = await security.create_app_password(member, "Thunderbird", actor=CONSOLE)
    assert await in_thread(auth_code, escrow, STAFF_EMAIL, STAFF_PASSWORD) == 235
    [before] = await audit_events(escrow.services, "smtp.auth_ok")
    assert json.loads(before.detail) == {"account_password": True}

    await enrol(escrow, member)
    assert await in_thread(auth_code, escrow, STAFF_EMAIL, STAFF_PASSWORD) == 535
    assert await in_thread(auth_code, escrow, STAFF_EMAIL, secret) == 235
    # Removing the second factor (an admin's reset) brings the account password back.
    await security.reset_second_factor(member, actor=OPERATOR)
    assert await in_thread(auth_code, escrow, STAFF_EMAIL, STAFF_PASSWORD) == 235


async def test_an_app_password_signs_in_only_its_own_staff_member(escrow: EscrowServer) -> None:
    other = await escrow.add_staff(OTHER_STAFF, "another long password")
    security = escrow.services.staff_security
    _info, secret = await security.create_app_password(other, "iPad", actor=CONSOLE)
    assert await in_thread(auth_code, escrow, STAFF_EMAIL, secret) == 535
    assert await in_thread(auth_code, escrow, OTHER_STAFF, secret) == 235

    # A disabled account's app passwords stop at once.
    await escrow.services.staff.disable(OTHER_STAFF, actor=OPERATOR)
    assert await in_thread(auth_code, escrow, OTHER_STAFF, secret) == 535


async def test_each_live_app_password_is_tried(escrow: EscrowServer) -> None:
    member = await staff_id(escrow)
    security = escrow.services.staff_security
    secrets = [
        (await security.create_app_password(member, name, actor=CONSOLE))[1]
        for name in ("iPhone", "Outlook", "Thunderbird")
    ]
    await enrol(escrow, member)
    for secret in secrets:
        assert await in_thread(auth_code, escrow, STAFF_EMAIL, secret) == 235
    events = await audit_events(escrow.services, "smtp.auth_ok")
    names = [json.loads(e.detail)["app_password"] for e in events]
    assert sorted(names) == ["Outlook", "Thunderbird", "iPhone"]


async def test_no_secret_reaches_the_audit_log_or_the_database(escrow: EscrowServer) -> None:
    member = await staff_id(escrow)
    security = escrow.services.staff_security
    _info, secret = await security.create_app_password(member, "iPhone", actor=CONSOLE)
    totp_secret = await enrol(escrow, member)
    assert await in_thread(auth_code, escrow, STAFF_EMAIL, secret) == 235
    assert await in_thread(auth_code, escrow, STAFF_EMAIL, STAFF_PASSWORD) == 535

    wrong = secret[:-1] + ("a" if secret[-1] != "a" else "b")

    def wrong_then_right() -> list[int]:
        client = secured(escrow.port, escrow.cafile)
        try:
            return [
                int(client.docmd("AUTH", f"PLAIN {plain(STAFF_EMAIL, wrong)}")[0]),
                int(client.docmd("AUTH", f"PLAIN {plain(STAFF_EMAIL, secret)}")[0]),
            ]
        finally:
            client.quit()

    assert await in_thread(wrong_then_right) == [535, 235]
    tables = await dump_tables(escrow.services)
    needles = [secret, secret.replace("-", ""), wrong, STAFF_PASSWORD, totp_secret]
    assert leaks({"audit_event": tables["audit_event"]}, needles) == []
    assert leaks(tables, needles) == []
