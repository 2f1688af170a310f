"""The outbox worker: delivers due jobs through the smarthost, or captures them in development.

It claims leased batches from :class:`escrow.outbox.Outbox`, builds each
mail (:mod:`smtp.compose`), sends it, and marks the job done only after the
smarthost accepted it. Temporary failures (4xx, network) retry with back-off;
a 5xx reply from the smarthost is permanent. Errors are recorded by class or
SMTP code only, never with content.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import aiosmtplib

from escrow.logs import mask_address
from escrow.outbox import Job
from escrow.services import Services
from smtp import compose

log = logging.getLogger(__name__)

LANES = 4
BATCH = 40
IDLE_POLL_SECONDS = 1.0
# A batch's sent jobs are completed together when its last lane ends, and at least
# this often while a slow lane (a smarthost timing out) holds it open: well inside
# the outbox lease, so what the other lanes sent is not taken over and sent again.
# (The slow lane's own unsent jobs can outlast the lease, as they always could.)
COMPLETE_EVERY_SECONDS = 30.0


class PermanentFailure(Exception):
    """The smarthost refused for good (5xx)."""


class Transport(Protocol):
    async def send(
        self, mail_from: str, rcpt_to: Sequence[str], data: bytes, job_id: str
    ) -> None: ...

    async def close(self) -> None: ...


class CaptureTransport:
    """Development: each mail becomes ``<dir>/<job id>.eml`` (written atomically)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def send(self, mail_from: str, rcpt_to: Sequence[str], data: bytes, job_id: str) -> None:
        await asyncio.to_thread(self._write, mail_from, rcpt_to, data, job_id)

    def _write(self, mail_from: str, rcpt_to: Sequence[str], data: bytes, job_id: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        final = self.directory / f"{job_id}.eml"
        temporary = final.with_suffix(".tmp")
        envelope = (
            f"X-Escrow-Envelope-From: {mail_from}\r\nX-Escrow-Envelope-To: {', '.join(rcpt_to)}\r\n"
        )
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(envelope.encode("utf-8") + data)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(final)

    async def close(self) -> None:
        return None


class SmarthostTransport:
    """Sends through ``ESCROW_SMARTHOST`` over one reused connection per lane."""

    def __init__(self, services: Services) -> None:
        settings = services.settings
        assert settings.smarthost is not None
        self._host, self._port = settings.smarthost
        self._mode = settings.smarthost_tls
        self._user = settings.smarthost_user
        self._password = settings.smarthost_password
        self._client: aiosmtplib.SMTP | None = None

    async def _connect(self) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(
            hostname=self._host,
            port=self._port,
            use_tls=self._mode == "tls",
            start_tls=self._mode == "starttls",
            tls_context=ssl.create_default_context() if self._mode != "none" else None,
            timeout=60,
        )
        await client.connect()
        if self._user and self._password:
            await client.login(self._user, self._password.reveal())
        return client

    async def send(self, mail_from: str, rcpt_to: Sequence[str], data: bytes, job_id: str) -> None:
        if self._client is None or not self._client.is_connected:
            self._client = await self._connect()
        try:
            if self._client.is_ehlo_or_helo_needed:
                await self._client.ehlo()
            errors, _reply = await self._client.sendmail(
                mail_from,
                list(rcpt_to),
                data,
                mail_options=mail_options(self._client, mail_from, rcpt_to, data),
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = {r.code for r in exc.recipients}
            if all(500 <= code < 600 for code in codes):
                raise PermanentFailure(f"smarthost refused the recipient ({min(codes)})") from None
            raise
        except aiosmtplib.SMTPResponseException as exc:
            await self.close()
            if 500 <= exc.code < 600:
                raise PermanentFailure(f"smarthost refused the mail ({exc.code})") from None
            raise
        except Exception:
            await self.close()
            raise
        except BaseException:
            # Cancelled mid-transaction: the connection is in an unknown state.
            self._abandon()
            raise
        if errors:
            log.warning(
                "smarthost refused %d of %d recipients of job %s", len(errors), len(rcpt_to), job_id
            )

    def _abandon(self) -> None:
        """Drop the connection without a goodbye (no await: we may be being cancelled)."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and client.is_connected:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()


def mail_options(
    client: aiosmtplib.SMTP, mail_from: str, rcpt_to: Sequence[str], data: bytes
) -> list[str]:
    """SMTPUTF8 for non-ASCII addresses (RFC 6531), BODY=8BITMIME for 8-bit content (RFC 6152)."""
    options: list[str] = []
    if not (mail_from.isascii() and all(address.isascii() for address in rcpt_to)):
        options.append("SMTPUTF8")
    if not data.isascii() and client.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")
    return options


def reason_for(exc: BaseException) -> str:
    """A content-free description of a delivery error."""
    if isinstance(exc, PermanentFailure):
        return str(exc)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"smarthost replied {exc.code}"
    return f"delivery error ({type(exc).__name__})"


class OutboxWorker:
    """Runs until ``stop`` is set: claim, build, send, complete."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings
        self.outbox = services.outbox

    def _transport(self) -> Transport:
        if self.settings.smarthost is None:
            return CaptureTransport(self.settings.mail_capture_dir)
        return SmarthostTransport(self.services)

    async def run(self, stop: asyncio.Event) -> None:
        lanes = [self._transport() for _ in range(LANES)]
        try:
            while not stop.is_set():
                try:
                    done = await self.run_once(lanes)
                except Exception as exc:
                    log.error("outbox worker error (%s); retrying", type(exc).__name__)
                    done = 0
                if done == 0:
                    waiter = asyncio.create_task(self.outbox.wait_for_work(IDLE_POLL_SECONDS))
                    stopper = asyncio.create_task(stop.wait())
                    await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    stopper.cancel()
        finally:
            for lane in lanes:
                await lane.close()

    async def run_once(self, lanes: Sequence[Transport] | None = None) -> int:
        """Process one batch of due jobs; returns how many were claimed.

        Sent jobs are completed in one transaction when the batch ends (each
        commit costs more than its rows), and every
        :data:`COMPLETE_EVERY_SECONDS` before that. Every lane runs to its end
        first: a lane that failed must not leave the others' sent jobs
        uncompleted. Then the first lane's error, if any, is raised.
        """
        own = lanes is None
        transports = list(lanes) if lanes is not None else [self._transport()]
        jobs = await self.outbox.claim_due(BATCH)
        sent: list[Job] = []
        queues = [jobs[i :: len(transports)] for i in range(len(transports))]
        running = [
            asyncio.ensure_future(self._drain(t, q, sent))
            for t, q in zip(transports, queues, strict=True)
            if q
        ]
        try:
            pending: set[asyncio.Future[None]] = set(running)
            while pending:
                _, pending = await asyncio.wait(pending, timeout=COMPLETE_EVERY_SECONDS)
                if pending:
                    try:
                        await self._complete(sent)
                    except Exception as exc:
                        # Kept in ``sent``: the final completion tries them again.
                        log.error("outbox completion failed (%s); retrying", type(exc).__name__)
        finally:
            for lane in running:
                lane.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            try:
                # A crash before this only means these jobs are sent again.
                await self._complete(sent)
            finally:
                if own:
                    for transport in transports:
                        await transport.close()
        for lane in running:
            error = lane.exception()
            if error is not None:
                raise error
        return len(jobs)

    async def _complete(self, sent: list[Job]) -> None:
        """Complete the jobs sent so far, then take them off ``sent`` (lanes only append)."""
        done = sent[:]
        await self.outbox.complete_many(done)
        del sent[: len(done)]

    async def _drain(self, transport: Transport, jobs: Sequence[Job], sent: list[Job]) -> None:
        for job in jobs:
            if await self._process(transport, job):
                sent.append(job)

    async def _process(self, transport: Transport, job: Job) -> bool:
        try:
            data = await self._build(job)
            await transport.send(job.mail_from, job.rcpt_to, data, job.id)
        except Exception as exc:
            reason = reason_for(exc)
            outcome = await self.outbox.fail(
                job, reason, permanent=isinstance(exc, PermanentFailure)
            )
            log.warning("outbox job %s (%s) failed: %s; %s", job.id, job.kind, reason, outcome)
            return False
        return True

    async def _build(self, job: Job) -> bytes:
        if job.kind == "notification":
            assert job.delivery_id is not None
            token = self.services.links.token_for(job.delivery_id)
            if self.settings.smarthost is None:
                # Development capture only: lets a newcomer follow the link from the log.
                log.info(
                    "DEVELOPMENT mail capture: link for %s: %s/m/%s",
                    mask_address(job.rcpt_to[0]),
                    self.settings.public_url,
                    token,
                )
            return compose.notification(
                self.settings, job_id=job.id, to=job.rcpt_to[0], token=token
            )
        if job.kind == "receipt":
            assert job.delivery_id is not None
            facts = await self.services.receipts.facts(job.delivery_id)
            if facts is None:
                raise PermanentFailure("read receipt: the delivery is gone")
            return compose.read_receipt(
                self.settings,
                job_id=job.id,
                to=job.rcpt_to[0],
                recipient=facts.recipient,
                read_at=facts.read_at,
                original_message_id=facts.original_message_id,
            )
        payload = await self.outbox.open_payload(job)
        if job.kind == "bounce":
            notice = json.loads(payload)
            return compose.bounce(
                self.settings,
                job_id=job.id,
                to=job.rcpt_to[0],
                recipients=notice["recipients"],
                reason=notice["reason"],
                reference=notice.get("message_id"),
                passthrough=notice.get("kind") == "passthrough",
            )
        if job.kind == "reply" and compose.is_reply_notice(payload):
            # ESCROW_REPLY_MODE=notify: tell the therapist, carry no content.
            return compose.reply_notice(
                self.settings, job_id=job.id, to=job.rcpt_to[0], payload=payload
            )
        # passthrough and deliver-mode reply payloads are complete MIME messages.
        return payload
