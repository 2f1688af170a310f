"""Recipient access rules: lock delays, address throttling, passphrase strength, racing guesses."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from escrow.audit import Actor
from escrow.errors import NotFound
from escrow.intake import Submission
from escrow.lockout import (
    LOCK_AFTER_FAILURES,
    LOCK_BASE,
    LOCK_MAX,
    AddressThrottle,
    lock_delay,
)
from escrow.models import Delivery, Recipient, utcnow
from escrow.recipients import Outcome, RecipientState, Step, next_step
from escrow.services import Services
from escrow.strength import judge
from tests.web.helpers import CLIENT, GOOD, mime_message

ACTOR = Actor("recipient", remote_addr="192.0.2.50", user_agent="test")


def test_lock_starts_at_the_threshold_and_doubles_to_a_cap() -> None:
    assert [lock_delay(n) for n in range(LOCK_AFTER_FAILURES)] == [None] * LOCK_AFTER_FAILURES
    assert LOCK_AFTER_FAILURES <= 10
    assert lock_delay(LOCK_AFTER_FAILURES) == LOCK_BASE
    assert lock_delay(LOCK_AFTER_FAILURES + 1) == LOCK_BASE * 2
    assert lock_delay(LOCK_AFTER_FAILURES + 3) == LOCK_BASE * 8
    assert lock_delay(1000) == LOCK_MAX


def test_address_throttle_counts_failures_in_a_window() -> None:
    throttle = AddressThrottle(max_failures=3, window=timedelta(seconds=60))
    for moment in (0.0, 1.0, 2.0):
        assert not throttle.blocked("198.51.100.1", now=moment)
        throttle.failed("198.51.100.1", now=moment)
    assert throttle.blocked("198.51.100.1", now=3.0)
    assert not throttle.blocked("198.51.100.2", now=3.0)
    assert not throttle.blocked("198.51.100.1", now=61.0)  # the first failure aged out


@pytest.mark.parametrize(
    ("passphrase", "ok"),
    [
        ("abc", False),
        ("password1234", False),
        ("Riverside Counselling", False),
        ("sam.client is me", False),
        (GOOD, True),
        ("x7#Qm!2pL0zR", True),
        ("é" * 40 + " unicode words are fine too", True),
    ],
)
def test_strength(passphrase: str, ok: bool) -> None:
    result = judge(passphrase, passphrase, [CLIENT, "", "Riverside Counselling"])
    assert result.ok is ok
    assert all(passphrase not in text for text in (*result.problems, *result.suggestions))


def test_the_next_step_follows_the_first_visit_order() -> None:
    blank = RecipientState("r", CLIENT, "", False, True, False, None)
    assert next_step(blank, "link") is Step.CODE
    assert next_step(blank, "code") is Step.CONSENT
    consented = RecipientState("r", CLIENT, "", False, False, True, None)
    assert next_step(consented, "link") is Step.CHOOSE
    returning = RecipientState("r", CLIENT, "", True, True, True, None)
    assert next_step(returning, "link") is Step.SIGN_IN
    assert next_step(returning, "full") is Step.DONE


async def _link_session(services: Services) -> tuple[str, object]:
    content = mime_message()
    accepted = await services.intake.accept(
        Submission("ada@riverside.example", [CLIENT], content, None, "192.0.2.1")
    )
    async with services.db.read() as session:
        delivery = (
            await session.scalars(
                select(Delivery).where(Delivery.message_id == accepted.message_id)
            )
        ).one()
    target = await services.portal.recipients.open_link(
        services.links.token_for(delivery.id), ACTOR
    )
    assert target is not None
    started = await services.portal.sessions.start(
        "recipient", target.recipient_id, stage="link", actor=ACTOR, delivery_id=delivery.id
    )
    return target.recipient_id, started.session


async def test_concurrent_guesses_are_counted_exactly_and_then_locked(services: Services) -> None:
    recipient_id, view = await _link_session(services)
    access = services.portal.recipients
    digest = await services.hasher.hash(GOOD)
    async with services.db.write() as session:
        await session.execute(
            update(Recipient)
            .where(Recipient.id == recipient_id)
            .values(passphrase_hash=digest, consent_at=utcnow())
        )

    guesses = [f"wrong {n}" for n in range(12)]
    results = await asyncio.gather(*(access.sign_in(view, g, ACTOR) for g in guesses))  # type: ignore[arg-type]

    # Every guess was checked concurrently, yet the count is exact: only the
    # guesses before the limit hear "wrong"; the rest, checked meanwhile, hear "locked".
    outcomes = [r.outcome for r in results]
    assert outcomes.count(Outcome.WRONG) == LOCK_AFTER_FAILURES - 1
    assert outcomes.count(Outcome.LOCKED) == len(guesses) - LOCK_AFTER_FAILURES + 1
    assert (await access.state(recipient_id)).locked_until is not None
    right = await access.sign_in(view, GOOD, ACTOR)  # type: ignore[arg-type]
    assert right.outcome is Outcome.LOCKED and right.started is None


async def test_unknown_addresses_are_reported(services: Services) -> None:
    with pytest.raises(NotFound):
        await services.portal.recipients.reset("nobody@example.org", ACTOR)
    with pytest.raises(ValueError, match="4 to 64"):
        await services.portal.recipients.set_code(CLIENT, "12", ACTOR)
