"""Staff second factor (TOTP, recovery codes), lockout, app passwords, and what is audited."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pyotp
import pytest
from sqlalchemy import select

from escrow import totp
from escrow.audit import Actor
from escrow.cli import parser
from escrow.errors import StaffError
from escrow.lockout import LOCK_AFTER_FAILURES, LOCK_BASE
from escrow.models import AppPassword, AuditEvent, RecoveryCode, Staff
from escrow.passwords import Check
from escrow.services import Services
from escrow.staff_security import MAX_LIVE_APP_PASSWORDS, StaffSecurity

ADMIN = Actor("operator", id="it-admin", remote_addr="cli")
BROWSER = Actor("staff", remote_addr="192.0.2.7", user_agent="Firefox")
EMAIL = "dr.hale@riverside.example"
PASSWORD = "correct horse battery staple"
# A fixed moment at the start of a 30 s step, so step arithmetic is exact.
T0 = datetime(2026, 11, 23, 9, 0, 0, tzinfo=UTC)


def code_at(secret: str, moment: datetime) -> str:
    return pyotp.TOTP(secret).at(moment)


async def add_staff(services: Services, *, admin: bool = False, email: str = EMAIL) -> str:
    return (await services.staff.add(email, PASSWORD, admin=admin, actor=ADMIN)).id


async def enrolled(services: Services, staff_id: str) -> tuple[str, list[str]]:
    """Enrol a fresh secret at T0; returns it and the recovery codes."""
    security = services.staff_security
    secret = security.new_totp_secret()
    codes = await security.enrol_totp(staff_id, secret, code_at(secret, T0), actor=BROWSER, now=T0)
    return secret, codes


async def events(services: Services, action: str | None = None) -> list[AuditEvent]:
    async with services.db.read() as session:
        query = select(AuditEvent).order_by(AuditEvent.seq)
        if action is not None:
            query = query.where(AuditEvent.action == action)
        return list((await session.scalars(query)).all())


async def staff_row(services: Services, staff_id: str) -> Staff:
    async with services.db.read() as session:
        row = await session.get(Staff, staff_id)
    assert row is not None
    return row


def without_required_totp(services: Services) -> StaffSecurity:
    """StaffSecurity as built with ESCROW_STAFF_REQUIRE_TOTP=false."""
    settings = dataclasses.replace(services.settings, staff_require_totp=False)
    return StaffSecurity(settings, services.db, services.hasher, services.audit, services.vault)


# ---------------------------------------------------------------- sign-in outcomes


async def test_sign_in_asks_to_enrol_when_a_second_factor_is_required(services: Services) -> None:
    assert services.settings.staff_require_totp is True  # the documented default
    staff_id = await add_staff(services)
    result = await services.staff_security.sign_in(EMAIL, PASSWORD, actor=BROWSER)
    assert result.outcome == "enrol"
    assert result.staff is not None and result.staff.id == staff_id
    # Not signed in yet: no login_ok until the sign-in is complete.
    assert await events(services, "staff.login_ok") == []


async def test_without_the_requirement_staff_sign_in_but_admins_must_enrol(
    services: Services,
) -> None:
    staff_id = await add_staff(services)
    await add_staff(services, admin=True, email="admin@riverside.example")
    security = without_required_totp(services)

    result = await security.sign_in(" Dr.Hale@Riverside.Example ", PASSWORD, actor=BROWSER)
    assert (result.outcome, result.staff.id if result.staff else None) == ("ok", staff_id)
    [ok] = await events(services, "staff.login_ok")
    assert (ok.actor_id, ok.remote_addr, ok.user_agent) == (staff_id, "192.0.2.7", "Firefox")
    assert (await staff_row(services, staff_id)).last_login_at is not None

    admin = await security.sign_in("admin@riverside.example", PASSWORD, actor=BROWSER)
    assert admin.outcome == "enrol"


async def test_enrolled_staff_need_the_second_factor(services: Services) -> None:
    staff_id = await add_staff(services)
    secret, _codes = await enrolled(services, staff_id)
    security = services.staff_security

    result = await security.sign_in(EMAIL, PASSWORD, actor=BROWSER)
    assert result.outcome == "second_factor"
    assert result.staff is not None and result.staff.id == staff_id
    assert await events(services, "staff.login_ok") == []

    later = T0 + timedelta(seconds=30)
    ok = await security.verify_second_factor(
        staff_id, code_at(secret, later), actor=BROWSER, now=later
    )
    assert ok == "ok"
    [login] = await events(services, "staff.login_ok")
    assert login.detail == '{"factor":"totp"}'


async def test_the_account_password_only_never_an_app_password(services: Services) -> None:
    staff_id = await add_staff(services)
    _info, secret = await services.staff_security.create_app_password(
        staff_id, "iPhone", actor=BROWSER
    )
    result = await services.staff_security.sign_in(EMAIL, secret, actor=BROWSER)
    assert (result.outcome, result.staff) == ("failed", None)


async def test_unknown_and_disabled_accounts_fail_like_a_wrong_password(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    await add_staff(services)
    await add_staff(services, email="gone@riverside.example")
    await services.staff.disable("gone@riverside.example", actor=ADMIN)
    checked: list[str | None] = []
    real_check = services.hasher.check

    async def counting(stored: str | None, secret: str) -> Check:
        checked.append(stored)
        return await real_check(stored, secret)

    monkeypatch.setattr(services.hasher, "check", counting)
    security = services.staff_security
    wrong = await security.sign_in(EMAIL, "not the password", actor=BROWSER)
    unknown = await security.sign_in("nobody@riverside.example", PASSWORD, actor=BROWSER)
    disabled = await security.sign_in("gone@riverside.example", PASSWORD, actor=BROWSER)
    assert wrong == unknown == disabled
    assert wrong.outcome == "failed" and wrong.staff is None
    # Every one paid for an Argon2 check (unknown ones against the dummy hash).
    assert len(checked) == 3
    failed = await events(services, "staff.login_failed")
    assert len(failed) == 3
    assert all(PASSWORD not in e.detail and "nobody@" not in e.detail for e in failed)


# ---------------------------------------------------------------- TOTP and recovery codes


async def test_a_totp_code_cannot_be_replayed(services: Services) -> None:
    staff_id = await add_staff(services)
    secret, _codes = await enrolled(services, staff_id)
    security = services.staff_security
    t1 = T0 + timedelta(seconds=30)

    # The code that enrolled is spent already.
    assert (
        await security.verify_second_factor(
            staff_id, code_at(secret, T0), actor=BROWSER, now=T0 + timedelta(seconds=5)
        )
        == "failed"
    )
    assert (
        await security.verify_second_factor(staff_id, code_at(secret, t1), actor=BROWSER, now=t1)
        == "ok"
    )
    # Same code again, within its window: refused.
    again = t1 + timedelta(seconds=10)
    assert (
        await security.verify_second_factor(staff_id, code_at(secret, t1), actor=BROWSER, now=again)
        == "failed"
    )
    # The next step's code is within the window (+1) and newer: accepted once.
    t2 = t1 + timedelta(seconds=30)
    assert (
        await security.verify_second_factor(
            staff_id, f" {code_at(secret, t2)[:3]} {code_at(secret, t2)[3:]}", actor=BROWSER, now=t1
        )
        == "ok"
    )
    assert (await staff_row(services, staff_id)).totp_last_step == totp.time_step(t2)
    # Outside the window, a right code for a far-away time is refused.
    far = t1 + timedelta(minutes=5)
    assert (
        await security.verify_second_factor(staff_id, code_at(secret, far), actor=BROWSER, now=t1)
        == "failed"
    )


async def test_enrolment_refuses_a_wrong_code_and_stores_nothing(services: Services) -> None:
    staff_id = await add_staff(services)
    security = services.staff_security
    secret = security.new_totp_secret()
    assert re.fullmatch(r"[A-Z2-7]{32}", secret)
    wrong = code_at(secret, T0 + timedelta(minutes=10))
    with pytest.raises(StaffError, match="code"):
        await security.enrol_totp(staff_id, secret, wrong, actor=BROWSER, now=T0)
    row = await staff_row(services, staff_id)
    assert (row.totp_secret, row.totp_enrolled_at) == (None, None)
    assert await security.recovery_codes_left(staff_id) == 0
    assert await events(services, "staff.totp_enrolled") == []


async def test_enrolment_seals_the_secret_and_cannot_silently_replace_it(
    services: Services,
) -> None:
    staff_id = await add_staff(services)
    secret, codes = await enrolled(services, staff_id)
    row = await staff_row(services, staff_id)
    assert row.totp_secret is not None and secret.encode() not in row.totp_secret
    assert await services.vault.open(row.totp_secret) == secret.encode()
    assert row.totp_enrolled_at == T0
    [event] = await events(services, "staff.totp_enrolled")
    assert event.actor_id == staff_id

    other = services.staff_security.new_totp_secret()
    t1 = T0 + timedelta(seconds=30)
    with pytest.raises(StaffError, match="already"):
        await services.staff_security.enrol_totp(
            staff_id, other, code_at(other, t1), actor=BROWSER, now=t1
        )
    new_codes = await services.staff_security.enrol_totp(
        staff_id, other, code_at(other, t1), actor=BROWSER, now=t1, replace=True
    )
    assert set(new_codes).isdisjoint(codes)
    # The old recovery codes are gone with the old secret.
    assert await services.staff_security.recovery_codes_left(staff_id) == 10
    assert (
        await services.staff_security.verify_second_factor(
            staff_id, codes[0], actor=BROWSER, now=t1
        )
        == "failed"
    )


async def test_recovery_codes_work_once_each(services: Services) -> None:
    staff_id = await add_staff(services)
    _secret, codes = await enrolled(services, staff_id)
    security = services.staff_security
    assert len(codes) == len(set(codes)) == 10
    assert all(re.fullmatch(r"[a-z0-9]{5}-[a-z0-9]{5}", c) for c in codes)
    async with services.db.read() as session:
        stored = (await session.scalars(select(RecoveryCode.code_hash))).all()
    assert len(stored) == 10
    assert all(h.startswith("$argon2id$") for h in stored)

    assert await security.verify_second_factor(staff_id, codes[0], actor=BROWSER) == "ok"
    assert await security.verify_second_factor(staff_id, codes[0], actor=BROWSER) == "failed"
    # Typed loosely (case, spaces, no hyphen) is fine.
    loose = codes[1].replace("-", " ").upper()
    assert await security.verify_second_factor(staff_id, loose, actor=BROWSER) == "ok"
    assert await security.recovery_codes_left(staff_id) == 8
    logins = await events(services, "staff.login_ok")
    assert [e.detail for e in logins] == ['{"factor":"recovery_code"}'] * 2


async def test_enrol_while_signing_in_completes_the_sign_in(services: Services) -> None:
    staff_id = await add_staff(services)
    assert (await services.staff_security.sign_in(EMAIL, PASSWORD, actor=BROWSER)).outcome == (
        "enrol"
    )
    secret = services.staff_security.new_totp_secret()
    await services.staff_security.enrol_totp(
        staff_id, secret, code_at(secret, T0), actor=BROWSER, now=T0, signing_in=True
    )
    [login] = await events(services, "staff.login_ok")
    assert login.actor_id == staff_id


async def test_reset_second_factor(services: Services) -> None:
    staff_id = await add_staff(services)
    secret, codes = await enrolled(services, staff_id)
    security = services.staff_security
    signed_in = await services.portal.sessions.start("staff", staff_id, stage="full", actor=BROWSER)
    assert (await services.portal.sessions.resolve(signed_in.token)).session is not None
    await security.reset_second_factor(staff_id, actor=ADMIN)

    # A console session signed in with the old factor ends with it.
    assert (await services.portal.sessions.resolve(signed_in.token)).session is None

    row = await staff_row(services, staff_id)
    assert (row.totp_secret, row.totp_enrolled_at, row.totp_last_step) == (None, None, None)
    assert await security.recovery_codes_left(staff_id) == 0
    [reset] = await events(services, "staff.totp_reset")
    assert (reset.actor_type, reset.actor_id) == ("operator", "it-admin")
    assert (await security.sign_in(EMAIL, PASSWORD, actor=BROWSER)).outcome == "enrol"
    t1 = T0 + timedelta(seconds=30)
    for code in (code_at(secret, t1), codes[0]):
        assert await security.verify_second_factor(staff_id, code, actor=BROWSER, now=t1) == (
            "failed"
        )
    with pytest.raises(StaffError):
        await security.reset_second_factor("0" * 32, actor=ADMIN)


# ---------------------------------------------------------------- lockout


async def test_lockout_holds_even_for_the_right_password(services: Services) -> None:
    staff_id = await add_staff(services)
    security = services.staff_security
    outcomes = []
    for _ in range(10):
        result = await security.sign_in(EMAIL, "wrong password!", actor=BROWSER, now=T0)
        outcomes.append(result.outcome)
        if result.outcome == "locked":
            break
    assert outcomes[-1] == "locked", outcomes  # within at most 10 failures
    assert set(outcomes[:-1]) == {"failed"}

    right = await security.sign_in(EMAIL, PASSWORD, actor=BROWSER, now=T0 + timedelta(seconds=1))
    assert right.outcome == "locked" and right.staff is None
    assert right.locked_until is not None and right.locked_until >= T0 + LOCK_BASE
    [locked] = await events(services, "staff.locked")
    assert locked.actor_id == staff_id

    # Growing delay: one more failure after the lock ends locks for longer.
    after = right.locked_until + timedelta(seconds=1)
    longer = await security.sign_in(EMAIL, "wrong password!", actor=BROWSER, now=after)
    assert longer.outcome == "locked" and longer.locked_until is not None
    assert longer.locked_until - after > right.locked_until - T0

    await security.unlock(staff_id, actor=ADMIN)
    assert [e.actor_id for e in await events(services, "staff.unlocked")] == ["it-admin"]
    row = await staff_row(services, staff_id)
    assert (row.failed_logins, row.locked_until) == (0, None)
    assert (await security.sign_in(EMAIL, PASSWORD, actor=BROWSER, now=after)).outcome == "enrol"
    with pytest.raises(StaffError):
        await security.unlock("0" * 32, actor=ADMIN)


async def test_lock_ends_by_itself_and_a_full_sign_in_clears_the_count(
    services: Services,
) -> None:
    await add_staff(services)
    security = without_required_totp(services)
    for _ in range(10):
        if (await security.sign_in(EMAIL, "nope nope nope", actor=BROWSER, now=T0)).outcome == (
            "locked"
        ):
            break
    later = T0 + timedelta(days=2)
    result = await security.sign_in(EMAIL, PASSWORD, actor=BROWSER, now=later)
    assert result.outcome == "ok"
    assert result.staff is not None
    row = await staff_row(services, result.staff.id)
    assert (row.failed_logins, row.locked_until) == (0, None)


async def test_wrong_second_factor_codes_count_toward_the_lock(services: Services) -> None:
    staff_id = await add_staff(services)
    secret, _codes = await enrolled(services, staff_id)
    security = services.staff_security
    t1 = T0 + timedelta(seconds=30)
    assert (await security.sign_in(EMAIL, PASSWORD, actor=BROWSER, now=t1)).outcome == (
        "second_factor"
    )
    outcomes = []
    for guess in range(10):
        outcome = await security.verify_second_factor(
            staff_id, f"{guess:06d}", actor=BROWSER, now=t1
        )
        outcomes.append(outcome)
        if outcome == "locked":
            break
    assert outcomes[-1] == "locked", outcomes
    # Locked: the right code and the right password are refused.
    right = code_at(secret, t1)
    assert await security.verify_second_factor(staff_id, right, actor=BROWSER, now=t1) == "locked"
    assert (await security.sign_in(EMAIL, PASSWORD, actor=BROWSER, now=t1)).outcome == "locked"
    # A right password in between does not reset the count (that would allow endless guesses).
    assert (await staff_row(services, staff_id)).failed_logins == len(outcomes)


# ---------------------------------------------------------------- app passwords


async def test_app_passwords_are_created_listed_and_revoked(services: Services) -> None:
    staff_id = await add_staff(services)
    other_id = await add_staff(services, email="dr.voss@riverside.example")
    security = services.staff_security

    iphone, secret = await security.create_app_password(staff_id, " iPhone ", actor=BROWSER)
    assert re.fullmatch(r"[a-z0-9]{4}(-[a-z0-9]{4}){3}", secret)
    assert (iphone.name, iphone.last_used_at, iphone.revoked_at) == ("iPhone", None, None)
    outlook, secret2 = await security.create_app_password(staff_id, "Outlook", actor=BROWSER)
    assert secret2 != secret
    async with services.db.read() as session:
        hashes = (await session.scalars(select(AppPassword.secret_hash))).all()
    assert all(h.startswith("$argon2id$") and secret not in h for h in hashes)

    listed = await security.list_app_passwords(staff_id)
    assert {i.id for i in listed} == {iphone.id, outlook.id}
    assert [i.created_at for i in listed] == sorted((i.created_at for i in listed), reverse=True)
    assert await security.list_app_passwords(other_id) == []

    with pytest.raises(StaffError, match="already"):
        await security.create_app_password(staff_id, "iphone", actor=BROWSER)
    for bad in ("", "   ", "x" * 101):
        with pytest.raises(StaffError, match="name"):
            await security.create_app_password(staff_id, bad, actor=BROWSER)
    with pytest.raises(StaffError):
        await security.revoke_app_password(other_id, iphone.id, actor=BROWSER)

    await security.revoke_app_password(staff_id, iphone.id, actor=BROWSER)
    await security.revoke_app_password(staff_id, iphone.id, actor=BROWSER)  # no change
    revoked = {i.id: i for i in await security.list_app_passwords(staff_id)}[iphone.id]
    assert revoked.revoked_at is not None and not revoked.live
    # The name is free again once revoked.
    again, _ = await security.create_app_password(staff_id, "iPhone", actor=BROWSER)
    assert (await security.list_app_passwords(staff_id))[0].id == again.id

    created = await events(services, "staff.app_password_created")
    assert [e.detail.count('"name":') for e in created] == [1, 1, 1]
    assert '"name":"iPhone"' in created[0].detail
    assert len(await events(services, "staff.app_password_revoked")) == 1


async def test_live_app_passwords_are_capped(services: Services) -> None:
    staff_id = await add_staff(services)
    security = services.staff_security
    for n in range(MAX_LIVE_APP_PASSWORDS):
        await security.create_app_password(staff_id, f"device {n}", actor=BROWSER)
    with pytest.raises(StaffError, match="at most"):
        await security.create_app_password(staff_id, "one too many", actor=BROWSER)
    first = (await security.list_app_passwords(staff_id))[-1]
    await security.revoke_app_password(staff_id, first.id, actor=BROWSER)
    await security.create_app_password(staff_id, "one too many", actor=BROWSER)


async def test_smtp_check_takes_app_passwords_and_the_account_password_until_enrolled(
    services: Services,
) -> None:
    staff_id = await add_staff(services)
    security = services.staff_security
    smtp = Actor("smtp", remote_addr="127.0.0.1")
    _info, secret = await security.create_app_password(staff_id, "Thunderbird", actor=BROWSER)

    by_app = await security.authenticate_smtp(EMAIL, secret.upper(), actor=smtp)
    assert by_app is not None and by_app.app_password_name == "Thunderbird"
    assert (await security.list_app_passwords(staff_id))[0].last_used_at is not None
    by_account = await security.authenticate_smtp(EMAIL, PASSWORD, actor=smtp)
    assert by_account is not None and by_account.app_password_name is None

    await enrolled(services, staff_id)
    assert await security.authenticate_smtp(EMAIL, PASSWORD, actor=smtp) is None
    assert await security.authenticate_smtp(EMAIL, secret, actor=smtp) is not None
    assert await security.authenticate_smtp("nobody@riverside.example", secret, actor=smtp) is None


async def test_a_stale_saved_password_counts_once_not_at_every_retry(
    services: Services,
) -> None:
    """A mail client retrying an old password all day must not lock its owner out."""
    staff_id = await add_staff(services)
    security = services.staff_security
    smtp = Actor("smtp", remote_addr="127.0.0.1")
    for minutes in range(0, 60, 5):
        moment = T0 + timedelta(minutes=minutes)
        assert (
            await security.authenticate_smtp(EMAIL, "the old one!", actor=smtp, now=moment) is None
        )
    row = await staff_row(services, staff_id)
    assert (row.failed_logins, row.locked_until) == (1, None)
    signed_in = await security.sign_in(EMAIL, PASSWORD, actor=BROWSER, now=T0 + timedelta(hours=1))
    assert signed_in.outcome == "enrol"

    # The right password forgets what was counted: the stale one counts again, once.
    assert await security.authenticate_smtp(EMAIL, PASSWORD, actor=smtp, now=moment) is not None
    for _ in range(3):
        await security.authenticate_smtp(EMAIL, "the old one!", actor=smtp, now=moment)
    assert (await staff_row(services, staff_id)).failed_logins == 1

    # A day later the same stale password counts again, once.
    day_later = moment + timedelta(days=1, minutes=1)
    for _ in range(3):
        await security.authenticate_smtp(EMAIL, "the old one!", actor=smtp, now=day_later)
    assert (await staff_row(services, staff_id)).failed_logins == 2

    # Different wrong passwords are guesses: each counts, and they lock the account.
    for n in range(LOCK_AFTER_FAILURES):
        await security.authenticate_smtp(EMAIL, f"guess {n}", actor=smtp, now=day_later)
    row = await staff_row(services, staff_id)
    assert row.locked_until is not None and row.locked_until > day_later
    right = await security.authenticate_smtp(EMAIL, PASSWORD, actor=smtp, now=day_later)
    assert right is None


# ---------------------------------------------------------------- QR, URI, audit


async def test_provisioning_uri_and_qr_code(services: Services) -> None:
    security = services.staff_security
    secret = security.new_totp_secret()
    uri = security.provisioning_uri(secret, EMAIL)
    parts = urlsplit(uri)
    query = parse_qs(parts.query)
    assert (parts.scheme, parts.netloc) == ("otpauth", "totp")
    assert query["secret"] == [secret]
    assert query["issuer"] == ["Riverside Counselling"]
    assert unquote(parts.path) == f"/Riverside Counselling:{EMAIL}"

    svg = security.qr_svg(uri)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert 'xmlns="http://www.w3.org/2000/svg"' in svg
    assert "<?xml" not in svg
    assert "<style" not in svg.lower() and "style=" not in svg.lower()
    assert "<script" not in svg.lower()
    assert "<path" in svg


async def test_the_audit_log_carries_no_secrets(services: Services) -> None:
    staff_id = await add_staff(services)
    security = services.staff_security
    secret, codes = await enrolled(services, staff_id)
    t1 = T0 + timedelta(seconds=30)
    totp_code = code_at(secret, t1)
    _info, app_password = await security.create_app_password(staff_id, "iPhone", actor=BROWSER)
    await security.sign_in(EMAIL, PASSWORD, actor=BROWSER, now=t1)
    await security.sign_in(EMAIL, "a wrong guess!!", actor=BROWSER, now=t1)
    await security.verify_second_factor(staff_id, "000000", actor=BROWSER, now=t1)
    await security.verify_second_factor(staff_id, totp_code, actor=BROWSER, now=t1)
    await security.verify_second_factor(staff_id, codes[0], actor=BROWSER, now=t1)
    await security.authenticate_smtp(EMAIL, app_password, actor=BROWSER)

    rows: list[dict[str, Any]] = []
    async with services.db.read() as session:
        for event in (await session.scalars(select(AuditEvent))).all():
            rows.append({c: getattr(event, c) for c in ("actor_id", "detail", "outcome")})
    text = repr(rows).lower()
    assert len(rows) >= 7
    needles = [secret, PASSWORD, "a wrong guess", totp_code, app_password, *codes]
    needles += [app_password.replace("-", ""), *(c.replace("-", "") for c in codes)]
    for needle in needles:
        assert needle.lower() not in text
    # Nor is the TOTP secret stored in clear anywhere on the staff row.
    row = await staff_row(services, staff_id)
    assert row.totp_secret is not None and secret.encode() not in row.totp_secret


# ---------------------------------------------------------------- the command line


async def test_cli_commands(services: Services, capsys: pytest.CaptureFixture[str]) -> None:
    staff_id = await add_staff(services)
    await enrolled(services, staff_id)

    async def run(*argv: str) -> str:
        args = parser().parse_args(list(argv))
        assert await args.services(services, args) == 0
        return capsys.readouterr().out

    out = await run("staff", "app-password", "add", EMAIL, "Work laptop")
    [secret] = re.findall(r"^[a-z0-9]{4}(?:-[a-z0-9]{4}){3}$", out, re.MULTILINE)
    assert await services.staff_security.authenticate_smtp(EMAIL, secret, actor=ADMIN)
    listed = await run("staff", "app-password", "list", EMAIL)
    assert "Work laptop" in listed and "live" in listed and secret not in listed
    await run("staff", "app-password", "revoke", EMAIL, "work laptop")
    assert "revoked" in await run("staff", "app-password", "list", EMAIL)
    assert await services.staff_security.authenticate_smtp(EMAIL, secret, actor=ADMIN) is None

    await run("staff", "reset-totp", EMAIL)
    assert (await staff_row(services, staff_id)).totp_enrolled_at is None
    async with services.db.write() as session:
        row = await session.get(Staff, staff_id)
        assert row is not None
        row.failed_logins, row.locked_until = 7, T0 + timedelta(days=365)
    await run("staff", "unlock", EMAIL)
    row = await staff_row(services, staff_id)
    assert (row.failed_logins, row.locked_until) == (0, None)
    assert [e.actor_type for e in await events(services, "staff.unlocked")] == ["operator"]

    args = parser().parse_args(["staff", "unlock", "nobody@riverside.example"])
    with pytest.raises(StaffError):
        await args.services(services, args)


def test_secret_shapes() -> None:
    assert totp.looks_like_app_password(totp.normalise_code(totp.new_app_password()))
    assert totp.looks_like_recovery_code(totp.normalise_code(totp.new_recovery_codes(1)[0]))
    assert not totp.looks_like_totp("12345a")
    assert totp.matching_step("not base32!", "123456", T0, after=None) is None
