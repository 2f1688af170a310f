"""Who may relay: STARTTLS before AUTH, staff passwords, trusted networks, envelope senders."""

from __future__ import annotations

import base64
import json
import logging

import pytest

from escrow.logs import mask_address
from escrow.models import StaffAlias
from tests.smtp.conftest import (
    OPERATOR,
    STAFF_EMAIL,
    STAFF_PASSWORD,
    EscrowServer,
    MakeEscrow,
    Sink,
    audit_events,
    client_context,
    connect,
    count_rows,
    eventually,
    in_thread,
    secured,
    signed_in,
    simple_message,
    submit,
)

CLIENT = "alex.client@example.net"
OTHER_STAFF = "dr.voss@riverside.example"


def b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def plain(login: str, password: str) -> str:
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


async def nothing_stored(escrow: EscrowServer) -> None:
    for table in ("message", "vault_item", "delivery", "outbox"):
        assert await count_rows(escrow.services, table) == 0, table


async def test_auth_is_offered_only_after_starttls(escrow: EscrowServer) -> None:
    def converse() -> tuple[dict[str, str], dict[str, str], list[int]]:
        client = connect(escrow.port)
        try:
            client.ehlo()
            before = dict(client.esmtp_features)
            codes = [
                client.mail(STAFF_EMAIL)[0],
                client.docmd("AUTH", f"PLAIN {plain(STAFF_EMAIL, STAFF_PASSWORD)}")[0],
            ]
            client.starttls(context=client_context(escrow.cafile))
            client.ehlo()
            after = dict(client.esmtp_features)
            codes.append(client.mail(STAFF_EMAIL)[0])  # still not signed in
            client.rset()
        finally:
            client.quit()
        return before, after, codes

    before, after, codes = await in_thread(converse)
    assert "starttls" in before
    assert "auth" not in before
    assert "starttls" not in after
    assert set(after["auth"].split()) >= {"PLAIN", "LOGIN"}
    assert codes == [530, 530, 530]
    assert await audit_events(escrow.services, "smtp.auth_ok") == []


async def test_auth_plain_and_login_both_sign_in(
    escrow: EscrowServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    staff_id = (await escrow.services.staff.list())[0].id

    def with_plain() -> tuple[int, int]:
        client = secured(escrow.port, escrow.cafile)
        try:
            code, _ = client.docmd("AUTH", f"PLAIN {plain(STAFF_EMAIL, STAFF_PASSWORD)}")
            mail, _ = client.mail(STAFF_EMAIL)
            client.rset()
        finally:
            client.quit()
        return code, mail

    def with_login() -> tuple[int, int, int]:
        client = secured(escrow.port, escrow.cafile)
        try:
            challenge, _ = client.docmd("AUTH", f"LOGIN {b64(STAFF_EMAIL)}")
            code, _ = client.docmd(b64(STAFF_PASSWORD))
            mail, _ = client.mail(STAFF_EMAIL)
            client.rset()
        finally:
            client.quit()
        return challenge, code, mail

    assert await in_thread(with_plain) == (235, 250)
    assert await in_thread(with_login) == (334, 235, 250)
    # aiosmtpd's notice about its own deprecated Session.login_data stays out of the log.
    assert not [r for r in caplog.records if "login_data" in r.getMessage()]
    events = await audit_events(escrow.services, "smtp.auth_ok")
    assert [(e.actor_id, e.remote_addr, e.outcome) for e in events] == [
        (staff_id, "127.0.0.1", "ok"),
        (staff_id, "127.0.0.1", "ok"),
    ]


async def test_wrong_password_is_refused_audited_and_throttled(escrow: EscrowServer) -> None:
    def converse() -> list[int]:
        client = secured(escrow.port, escrow.cafile)
        try:
            codes = [
                client.docmd("AUTH", f"PLAIN {plain(STAFF_EMAIL, 'wrong password 1')}")[0],
                client.docmd("AUTH", f"PLAIN {plain('nobody@riverside.example', 'x' * 12)}")[0],
                client.docmd("AUTH", f"LOGIN {b64(STAFF_EMAIL)}")[0],
                client.docmd(b64("wrong password 3"))[0],
                # Three failures on this connection: even the right password is refused now.
                client.docmd("AUTH", f"PLAIN {plain(STAFF_EMAIL, STAFF_PASSWORD)}")[0],
                client.mail(STAFF_EMAIL)[0],
            ]
        finally:
            client.quit()
        return codes

    assert await in_thread(converse) == [535, 535, 334, 535, 454, 530]

    failed = await audit_events(escrow.services, "smtp.auth_failed")
    assert len(failed) == 3
    logins = [json.loads(e.detail)["login"] for e in failed]
    assert logins == [
        mask_address(STAFF_EMAIL),
        mask_address("nobody@riverside.example"),
        mask_address(STAFF_EMAIL),
    ]
    for event in failed:
        assert event.outcome == "denied"
        assert event.remote_addr == "127.0.0.1"
        assert STAFF_EMAIL not in event.detail and "wrong password" not in event.detail
    assert await audit_events(escrow.services, "smtp.auth_ok") == []

    # The limit is per connection: a new one signs in.
    client = await in_thread(signed_in, escrow.port, escrow.cafile)
    await in_thread(client.quit)
    assert len(await audit_events(escrow.services, "smtp.auth_ok")) == 1


@pytest.mark.parametrize("networks", ["", "10.0.0.0/8,192.0.2.0/24"])
async def test_unauthenticated_relay_is_refused(
    make_escrow: MakeEscrow, sink: Sink, networks: str
) -> None:
    escrow = await make_escrow(ESCROW_TRUSTED_NETWORKS=networks)
    data = simple_message(STAFF_EMAIL, [CLIENT])
    for tls in (True, False):
        reply = await in_thread(
            submit, escrow.port, escrow.cafile, STAFF_EMAIL, [CLIENT], data, login=None, tls=tls
        )
        assert 500 <= reply.code < 600, (tls, reply)
    await nothing_stored(escrow)


async def test_trusted_network_relays_after_starttls(make_escrow: MakeEscrow, sink: Sink) -> None:
    escrow = await make_escrow(ESCROW_TRUSTED_NETWORKS="127.0.0.0/8")
    data = simple_message("frontdesk@riverside.example", [CLIENT])
    plaintext = await in_thread(
        submit, escrow.port, escrow.cafile, "frontdesk@riverside.example", [CLIENT], data,
        login=None, tls=False,
    )  # fmt: skip
    assert plaintext.code == 530
    await nothing_stored(escrow)

    reply = await in_thread(
        submit, escrow.port, escrow.cafile, "frontdesk@riverside.example", [CLIENT], data,
        login=None,
    )  # fmt: skip
    assert reply.code == 250, reply
    await eventually(lambda: sink.to(CLIENT), what="the notification")
    accepted = await audit_events(escrow.services, "message.accepted")
    assert [(e.actor_type, e.actor_id, e.remote_addr) for e in accepted] == [
        ("smtp", "trusted-network", "127.0.0.1")
    ]


async def test_trusted_network_without_tls_when_allowed(
    make_escrow: MakeEscrow, sink: Sink
) -> None:
    # Only 127.0.0.2 is trusted: a client on 127.0.0.1 stays bound to the usual rules.
    escrow = await make_escrow(
        ESCROW_TRUSTED_NETWORKS="127.0.0.2/32", ESCROW_TRUSTED_NETWORKS_REQUIRE_TLS="false"
    )
    data = simple_message("mta@riverside.example", [CLIENT])

    def ehlo_features(source: str) -> dict[str, str]:
        client = connect(escrow.port, source=source)
        try:
            client.ehlo()
            return dict(client.esmtp_features)
        finally:
            client.quit()

    assert "auth" not in await in_thread(ehlo_features, "127.0.0.2")

    untrusted = await in_thread(
        submit, escrow.port, escrow.cafile, "mta@riverside.example", [CLIENT], data,
        login=None, tls=False, source="127.0.0.1",
    )  # fmt: skip
    assert untrusted.code == 530
    await nothing_stored(escrow)

    trusted = await in_thread(
        submit, escrow.port, escrow.cafile, "mta@riverside.example", [CLIENT], data,
        login=None, tls=False, source="127.0.0.2",
    )  # fmt: skip
    assert trusted.code == 250, trusted
    await eventually(lambda: sink.to(CLIENT), what="the notification")
    accepted = await audit_events(escrow.services, "message.accepted")
    assert [e.remote_addr for e in accepted] == ["127.0.0.2"]

    # Later plaintext sessions from the untrusted address are still refused.
    again = await in_thread(
        submit, escrow.port, escrow.cafile, "mta@riverside.example", [CLIENT], data,
        login=None, tls=False, source="127.0.0.1",
    )  # fmt: skip
    assert again.code == 530


async def test_envelope_sender_must_be_the_signed_in_staff(escrow: EscrowServer) -> None:
    other_id = await escrow.add_staff(OTHER_STAFF, "another long password")
    async with escrow.services.db.write() as session:
        session.add(StaffAlias(address="intake@riverside.example", staff_id=other_id))

    def mail_from(login: str, password: str, senders: list[str]) -> list[int]:
        client = signed_in(escrow.port, escrow.cafile, login, password)
        try:
            codes = []
            for sender in senders:
                codes.append(client.mail(sender)[0])
                client.rset()
        finally:
            client.quit()
        return codes

    assert await in_thread(
        mail_from,
        STAFF_EMAIL,
        STAFF_PASSWORD,
        [OTHER_STAFF, "intake@riverside.example", "ceo@example.com", STAFF_EMAIL],
    ) == [553, 553, 553, 250]
    assert await in_thread(
        mail_from, OTHER_STAFF, "another long password", ["intake@riverside.example"]
    ) == [250]

    spoofed = await in_thread(
        submit,
        escrow.port,
        escrow.cafile,
        OTHER_STAFF,
        [CLIENT],
        simple_message(OTHER_STAFF, [CLIENT]),
    )
    assert spoofed.code == 553
    await nothing_stored(escrow)


async def test_disabled_staff_cannot_send(escrow: EscrowServer) -> None:
    data = simple_message(STAFF_EMAIL, [CLIENT])

    # Disabled while signed in: the next MAIL is refused.
    client = await in_thread(signed_in, escrow.port, escrow.cafile)
    try:
        await escrow.services.staff.disable(STAFF_EMAIL, actor=OPERATOR)
        code, _ = await in_thread(client.mail, STAFF_EMAIL)
        assert code == 553
    finally:
        await in_thread(client.quit)

    # And AUTH no longer works.
    def sign_in() -> int:
        session = secured(escrow.port, escrow.cafile)
        try:
            return int(session.docmd("AUTH", f"PLAIN {plain(STAFF_EMAIL, STAFF_PASSWORD)}")[0])
        finally:
            session.quit()

    assert await in_thread(sign_in) == 535
    reply = await in_thread(
        submit, escrow.port, escrow.cafile, STAFF_EMAIL, [CLIENT], data, login=None
    )
    assert reply.code == 530
    await nothing_stored(escrow)
