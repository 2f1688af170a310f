"""/metrics: Prometheus text that parses, figures read from the database that move with
intake and delivery, latency by route template (never a raw path), and no global registry."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import httpx
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from escrow.audit import Actor
from escrow.db import Database
from escrow.intake import Submission
from escrow.services import Services
from smtp.worker import OutboxWorker
from web.app import create_app
from web.metrics import install_metrics

STAFF = "dr.hale@riverside.example"
CLIENTS = ["ana@clients.example", "ben@clients.example"]
TOKEN = "qY3v1Zk0secret-link-token-8d2FxW"


def message(subject: str = "Session notes") -> bytes:
    return (
        f"From: {STAFF}\r\nTo: {', '.join(CLIENTS)}\r\nSubject: {subject}\r\n"
        "Message-ID: <m1@riverside.example>\r\n\r\nSee you Tuesday.\r\n"
    ).encode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample by (name, sorted labels); parsing fails loudly on malformed text."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return found[(name, tuple(sorted(labels.items())))]


@pytest.fixture
async def client(services: Services) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://escrow.test") as http:
        yield http


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert response.headers["cache-control"] == "no-store"
    return samples(response.text)


async def accept(services: Services, recipients: Sequence[str] = CLIENTS) -> None:
    await services.intake.accept(
        Submission(
            mail_from=STAFF,
            recipients=list(recipients),
            content=message(),
            staff_id=None,
            remote_addr="127.0.0.1",
        )
    )


class RefusingTransport:
    """A smarthost that is down."""

    async def send(self, mail_from: str, rcpt_to: Sequence[str], data: bytes, job_id: str) -> None:
        raise ConnectionRefusedError

    async def close(self) -> None:
        return None


async def test_figures_move_with_intake_and_delivery(
    client: httpx.AsyncClient, services: Services
) -> None:
    before = await scrape(client)
    assert value(before, "escrow_database_up") == 1
    assert value(before, "escrow_messages_accepted_total") == 0
    assert value(before, "escrow_outbox_pending") == 0
    assert value(before, "escrow_outbox_oldest_pending_age_seconds") == 0

    await accept(services)
    queued = await scrape(client)
    assert value(queued, "escrow_messages_accepted_total") == 1
    assert value(queued, "escrow_outbox_pending") == 2
    assert value(queued, "escrow_outbox_oldest_pending_age_seconds") >= 0
    assert value(queued, "escrow_notifications_sent_total") == 0

    assert await OutboxWorker(services).run_once() == 2  # development capture
    sent = await scrape(client)
    assert value(sent, "escrow_notifications_sent_total") == 2
    assert value(sent, "escrow_outbox_pending") == 0
    # Counters read incrementally still hold the earlier events.
    assert value(sent, "escrow_messages_accepted_total") == 1
    assert value(sent, "escrow_audit_events_total", action="message.accepted") == 1
    assert value(sent, "escrow_audit_events_total", action="notification.sent") == 2

    await accept(services, CLIENTS[:1])
    assert await OutboxWorker(services).run_once([RefusingTransport()]) == 1
    failed = await scrape(client)
    assert value(failed, "escrow_notifications_failed_total", outcome="retry") == 1
    assert value(failed, "escrow_notifications_failed_total", outcome="gave_up") == 0
    assert value(failed, "escrow_outbox_pending") == 1
    assert value(failed, "escrow_messages_accepted_total") == 2


async def test_failed_logins_are_counted_by_kind(
    client: httpx.AsyncClient, services: Services
) -> None:
    for action, actor in (
        ("login.failed", Actor("recipient", id="r1", remote_addr="192.0.2.7")),
        ("login.failed", Actor("recipient", id="r1", remote_addr="192.0.2.7")),
        ("staff.login_failed", Actor("staff", id="s1")),
        ("smtp.auth_failed", Actor("smtp", remote_addr="192.0.2.9")),
    ):
        await services.audit.log(action, actor, outcome="denied")
    found = await scrape(client)
    assert value(found, "escrow_logins_failed_total", kind="recipient") == 2
    assert value(found, "escrow_logins_failed_total", kind="staff") == 1
    assert value(found, "escrow_logins_failed_total", kind="smtp") == 1


async def test_latency_is_labelled_by_route_template_never_by_path(
    services: Services,
) -> None:
    async def endpoint(_request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[
            Route("/m/{token}", endpoint, methods=["GET", "POST"]),
            Mount("/staff", routes=[Route("/messages/{id}", endpoint)]),
        ]
    )
    install_metrics(app, services)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://escrow.test") as http:
        assert (await http.get(f"/m/{TOKEN}")).status_code == 200
        assert (await http.post(f"/m/{TOKEN}")).status_code == 200
        assert (await http.delete(f"/m/{TOKEN}")).status_code == 405
        assert (await http.get("/staff/messages/0123abcd")).status_code == 200
        assert (await http.get(f"/staff/{TOKEN}")).status_code == 404
        assert (await http.get(f"/{TOKEN}")).status_code == 404
        response = await http.get("/metrics")
    text = response.text
    assert TOKEN not in text
    assert "0123abcd" not in text
    found = samples(text)
    count = "escrow_http_request_duration_seconds_count"
    assert value(found, count, method="GET", route="/m/{token}") == 1
    assert value(found, count, method="POST", route="/m/{token}") == 1
    assert value(found, count, method="DELETE", route="/m/{token}") == 1
    assert value(found, count, method="GET", route="/staff/messages/{id}") == 1
    assert value(found, count, method="GET", route="/staff/{path}") == 1
    assert value(found, count, method="GET", route="<unmatched>") == 1
    responses = "escrow_http_responses_total"
    assert value(found, responses, method="DELETE", route="/m/{token}", status="405") == 1
    assert value(found, responses, method="GET", route="<unmatched>", status="404") == 1


async def test_each_app_has_its_own_registry(client: httpx.AsyncClient, services: Services) -> None:
    await client.get("/healthz")
    found = await scrape(client)
    assert (
        value(found, "escrow_http_request_duration_seconds_count", method="GET", route="/healthz")
        == 1
    )
    assert prometheus_client.REGISTRY.get_sample_value("escrow_outbox_pending") is None

    other = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=other, base_url="http://escrow.test") as http:
        fresh = samples((await http.get("/metrics")).text)
    assert (
        "escrow_http_request_duration_seconds_count",
        (("method", "GET"), ("route", "/healthz")),
    ) not in fresh


async def test_a_database_outage_is_reported_not_raised(
    client: httpx.AsyncClient, services: Services
) -> None:
    await accept(services)
    assert value(await scrape(client), "escrow_messages_accepted_total") == 1
    working = services.db
    services.db = Database("sqlite+aiosqlite:////nonexistent-dir/escrow.db")
    try:
        found = await scrape(client)
    finally:
        await services.db.dispose()
        services.db = working
    assert value(found, "escrow_database_up") == 0
    # The last figures stay; counters never go backwards.
    assert value(found, "escrow_messages_accepted_total") == 1
    assert value(await scrape(client), "escrow_database_up") == 1
