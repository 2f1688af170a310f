"""``GET /metrics``: Prometheus text from a registry of the application's own.

* Business figures are read from the database at scrape time, so every
  replica on one PostgreSQL reports the same numbers and a restart loses
  none. Accepted messages, notifications and failed sign-ins are counted
  from the append-only audit log, read incrementally by sequence number
  (its primary key): each scrape reads only the events since the last one.
  Outbox depth and the age of the oldest pending job come from the outbox's
  ``(done_at, next_attempt_at)`` index, so they cost the backlog, not the
  history.
* Request latency is a histogram labelled by method and route template
  (``/m/{token}``), never by the raw path: link tokens and ids must never
  become label values. Paths that match no route share one label.
* No global registry: two applications in one process keep apart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from escrow.models import AuditEvent, OutboxJob, utcnow
from escrow.services import Services

log = logging.getLogger(__name__)

# A scrape waits at most this long for the database, then reports it down.
SCRAPE_TIMEOUT_SECONDS = 5.0
UNMATCHED = "<unmatched>"

# Failed sign-ins by where they happened: audit action -> ``kind`` label.
FAILED_LOGINS = {
    "login.failed": "recipient",
    "staff.login_failed": "staff",
    "smtp.auth_failed": "smtp",
}


@dataclass
class _Figures:
    """What the last scrape read from the database."""

    database_up: bool = False
    audit_after: int = 0
    audit: dict[tuple[str, str], int] = field(default_factory=dict)
    outbox_pending: int = 0
    outbox_oldest_age: float = 0.0


class _DatabaseCollector(Collector):
    """Turns the figures of the last scrape into metric families."""

    def __init__(self, figures: _Figures) -> None:
        self._figures = figures

    def _count(self, action: str, outcome: str | None = None) -> int:
        return sum(
            n
            for (a, o), n in self._figures.audit.items()
            if a == action and (outcome is None or o == outcome)
        )

    def collect(self) -> Iterator[Metric]:
        figures = self._figures
        yield GaugeMetricFamily(
            "escrow_database_up",
            "1 if the last scrape could read the database, else 0",
            value=1 if figures.database_up else 0,
        )
        yield CounterMetricFamily(
            "escrow_messages_accepted",
            "Messages accepted into the vault (audit action message.accepted)",
            value=self._count("message.accepted"),
        )
        yield CounterMetricFamily(
            "escrow_notifications_sent",
            "Notifications the smarthost accepted (audit action notification.sent)",
            value=self._count("notification.sent"),
        )
        failed = CounterMetricFamily(
            "escrow_notifications_failed",
            "Failed notification attempts, by outcome: retry or gave_up",
            labels=["outcome"],
        )
        for outcome in ("retry", "gave_up"):
            failed.add_metric([outcome], self._count("notification.failed", outcome))
        yield failed
        logins = CounterMetricFamily(
            "escrow_logins_failed",
            "Failed sign-ins, by kind: recipient (portal), staff (console), smtp (AUTH)",
            labels=["kind"],
        )
        for action, kind in FAILED_LOGINS.items():
            logins.add_metric([kind], self._count(action))
        yield logins
        events = CounterMetricFamily(
            "escrow_audit_events", "Audit events recorded, by action", labels=["action"]
        )
        totals: dict[str, int] = {}
        for (action, _outcome), n in figures.audit.items():
            totals[action] = totals.get(action, 0) + n
        for action in sorted(totals):
            events.add_metric([action], totals[action])
        yield events
        yield GaugeMetricFamily(
            "escrow_outbox_pending",
            "Outbox jobs (notifications, replies, pass-through) not yet done",
            value=figures.outbox_pending,
        )
        yield GaugeMetricFamily(
            "escrow_outbox_oldest_pending_age_seconds",
            "Age of the oldest outbox job not yet done (0 when none)",
            value=figures.outbox_oldest_age,
        )


def route_template(routes: Sequence[BaseRoute], scope: Scope) -> str | None:
    """The path template of the route that handles ``scope``, or None if none does.

    Mounts contribute their prefix (``/staff`` + ``/messages/{id}``); a path
    inside a mount that matches nothing there is ``<mount>/{path}``.
    """
    partial: str | None = None
    for route in routes:
        match, child = route.matches(scope)
        if match is Match.NONE:
            continue
        if isinstance(route, Mount):
            inner = route_template(route.routes, {**scope, **child}) if route.routes else None
            template = route.path + (inner if inner is not None else "/{path}")
        elif isinstance(route, Route):
            template = route.path
        else:
            template = getattr(route, "path", None) or UNMATCHED
        if match is Match.FULL:
            return template
        if partial is None:
            partial = template  # e.g. the path matched but not the method: 405
    return partial


class Metrics:
    """The registry of one application, its request instruments and its scrape endpoint."""

    def __init__(self, services: Services, app: Starlette) -> None:
        self._services = services
        self._app = app
        self._lock = asyncio.Lock()
        self._figures = _Figures()
        self.registry = CollectorRegistry()
        self.registry.register(_DatabaseCollector(self._figures))
        self.request_seconds = Histogram(
            "escrow_http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route template",
            ["method", "route"],
            registry=self.registry,
        )
        self.responses = Counter(
            "escrow_http_responses",
            "HTTP responses, by method, route template and status code",
            ["method", "route", "status"],
            registry=self.registry,
        )

    def route_of(self, scope: Scope) -> str:
        return route_template(self._app.routes, scope) or UNMATCHED

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        method = str(scope.get("method", "GET"))
        route = self.route_of(scope)
        self.request_seconds.labels(method, route).observe(seconds)
        self.responses.labels(method, route, str(status)).inc()

    async def refresh(self) -> None:
        """Read the database figures; on failure keep the last ones and report the database down."""
        async with self._lock:
            try:
                async with asyncio.timeout(SCRAPE_TIMEOUT_SECONDS):
                    await self._read()
            except Exception:
                log.warning("metrics: cannot read the database", exc_info=True)
                self._figures.database_up = False
            else:
                self._figures.database_up = True

    async def _read(self) -> None:
        figures = self._figures
        async with self._services.db.read() as session:
            rows = (
                await session.execute(
                    select(
                        AuditEvent.action,
                        AuditEvent.outcome,
                        func.count(),
                        func.max(AuditEvent.seq),
                    )
                    .where(AuditEvent.seq > figures.audit_after)
                    .group_by(AuditEvent.action, AuditEvent.outcome)
                )
            ).all()
            pending, oldest = (
                await session.execute(
                    select(func.count(), func.min(OutboxJob.created_at)).where(
                        OutboxJob.done_at.is_(None)
                    )
                )
            ).one()
        # Appends are serialised and commit in sequence order, so nothing at or
        # below the highest sequence seen can still appear later.
        for action, outcome, count, highest in rows:
            key = (str(action), str(outcome))
            figures.audit[key] = figures.audit.get(key, 0) + int(count)
            figures.audit_after = max(figures.audit_after, int(highest))
        figures.outbox_pending = int(pending or 0)
        figures.outbox_oldest_age = (
            max(0.0, (utcnow() - oldest).total_seconds()) if oldest is not None else 0.0
        )

    async def endpoint(self, _request: Request) -> Response:
        await self.refresh()
        # The classic text format (0.0.4): every Prometheus, 2.x and 3.x, reads it.
        return Response(
            generate_latest(self.registry),
            media_type=CONTENT_TYPE_PLAIN_0_0_4,
            headers={"Cache-Control": "no-store"},
        )


class RequestMetrics:
    """ASGI middleware: times every HTTP request and counts its status, by route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Routing rewrites the scope (mounts change root_path): match on the original.
        original: Mapping[str, Any] = dict(scope)
        status = 500
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe(dict(original), status, time.perf_counter() - started)


def install_metrics(app: Starlette, services: Services) -> Metrics:
    """Add ``GET /metrics`` (first, so no catch-all shadows it) and the request middleware."""
    metrics = Metrics(services, app)
    app.router.routes.insert(0, Route("/metrics", metrics.endpoint, methods=["GET"]))
    app.add_middleware(RequestMetrics, metrics=metrics)
    return metrics
