#!/usr/bin/env python3
"""Reading benchmark: message-page latency with 50 signed-in readers, then with sign-ins in flight.

Sets up a fresh instance (SQLite in a temporary directory, or
``--database-url``/``ESCROW_DATABASE_URL``, which must be an empty database),
accepts one realistic message (text, HTML, a small PDF) for each of N
recipients through intake, and starts a signed-in session for each. Then it
runs ``escrow serve --no-smtp --no-worker`` (uvicorn, production Argon2
parameters) on a free port in its own process and measures ``GET
/messages/{id}`` with 50 signed-in readers (a minimal keep-alive HTTP/1.1
client, so that the load generator's own CPU does not show up as latency;
sign-ins use httpx), each loading a page and
then reading it for a random 0 to 2x ``--think`` seconds: alone, and while 10
clients keep signing in (each sign-in a real Argon2id check with production
parameters). A last row drops the reading time (closed loop) to show capacity.
Prints a markdown table.

Target: p99 under 50 ms, and sign-ins in flight do not move it.

    .venv/bin/python bench/reading.py [--readers 50] [--requests 30] [--think 1.0]
        [--sign-ins 10] [--database-url postgresql+asyncpg://...]

``BENCH_VERBOSE=1`` prints server and load-generator CPU seconds per phase;
``BENCH_PYSPY=FILE`` records a py-spy profile of the server (py-spy on PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import httpx
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from escrow import migrate  # noqa: E402
from escrow.audit import Actor  # noqa: E402
from escrow.intake import Submission  # noqa: E402
from escrow.models import Delivery, Recipient, utcnow  # noqa: E402
from escrow.services import build_services  # noqa: E402
from escrow.settings import load_settings  # noqa: E402
from keys import VaultKeyring  # noqa: E402

ESCROW = ROOT / ".venv" / "bin" / "escrow"
MASTER = "benchmark master passphrase, not secret"
PASSPHRASE = "copper kettle under seven maple leaves"  # noqa: S105 (benchmark accounts)
THERAPIST = "ada@practice.example"
_CSRF = re.compile(r'name="csrf" value="([0-9a-f]{64})"')


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def message(to: str, n: int) -> bytes:
    mail = EmailMessage(policy=SMTP)
    mail["From"] = f"Dr Ada <{THERAPIST}>"
    mail["To"] = to
    mail["Subject"] = f"Notes from session {n}"
    mail["Message-ID"] = f"<bench-{n}@practice.example>"
    paragraph = "We talked about sleep, routines and the week ahead. " * 20
    mail.set_content(f"Dear client,\n\n{paragraph}\n\nBest wishes,\nAda\n")
    mail.add_alternative(
        f"<p>Dear client,</p><p>{paragraph}</p><p><a href='https://example.org/'>Worksheet</a></p>",
        subtype="html",
    )
    mail.add_attachment(
        b"%PDF-1.4\n" + bytes(range(256)) * 8,
        maintype="application",
        subtype="pdf",
        filename="worksheet.pdf",
    )
    return mail.as_bytes()


@dataclass
class Reader:
    cookie: str
    path: str


@dataclass
class Signer:
    link: str


async def prepare(
    env: dict[str, str], readers: int, signers: int
) -> tuple[list[Reader], list[Signer], str]:
    """Keys, schema, messages and sessions, made through the domain services."""
    settings = load_settings(env, dotenv_path=Path(env["ESCROW_DATA_DIR"]) / "no.env")
    VaultKeyring.initialise(settings.keys_dir, MASTER)
    services = build_services(settings)
    try:
        await migrate.upgrade(services.db)
        digest = await services.hasher.hash(PASSPHRASE)  # production parameters
        out_readers: list[Reader] = []
        out_signers: list[Signer] = []
        for n in range(readers + signers):
            address = f"client{n}@example.org"
            accepted = await services.intake.accept(
                Submission(THERAPIST, [address], message(address, n), None, "127.0.0.1")
            )
            async with services.db.write() as session:
                recipient = (
                    await session.execute(
                        Recipient.__table__.select().where(Recipient.email == address)
                    )
                ).one()
                await session.execute(
                    Recipient.__table__.update()
                    .where(Recipient.id == recipient.id)
                    .values(passphrase_hash=digest, consent_at=utcnow(), passphrase_set_at=utcnow())
                )
                delivery = (
                    await session.execute(
                        Delivery.__table__.select().where(
                            Delivery.message_id == accepted.message_id
                        )
                    )
                ).one()
            if n < readers:
                started = await services.portal.sessions.start(
                    "recipient",
                    recipient.id,
                    stage="full",
                    actor=Actor("recipient", recipient.id, "127.0.0.1", "bench"),
                    delivery_id=delivery.id,
                )
                out_readers.append(Reader(started.token, f"/messages/{accepted.message_id}"))
            else:
                out_signers.append(Signer(f"/m/{services.links.token_for(delivery.id)}"))
        return out_readers, out_signers, services.portal.sessions.idle.__class__.__name__
    finally:
        await services.aclose()


def spawn(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@contextlib.asynccontextmanager
async def server(env: dict[str, str], port: int) -> AsyncIterator[str]:
    process = spawn([str(ESCROW), "serve", "--no-smtp", "--no-worker"], {**os.environ, **env})
    base = f"http://127.0.0.1:{port}"
    profiler = None
    if os.environ.get("BENCH_PYSPY"):  # a py-spy profile of the server while it is measured
        profiler = spawn(
            [
                "py-spy",
                "record",
                "-r",
                "200",
                "-d",
                "25",
                "-f",
                "raw",
                "-o",
                os.environ["BENCH_PYSPY"],
                "-p",
                str(process.pid),
            ]
        )
    try:
        async with httpx.AsyncClient(base_url=base) as probe:
            for _ in range(300):
                with contextlib.suppress(httpx.TransportError):
                    if (await probe.get("/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                raise SystemExit(
                    "the server did not start: "
                    + (process.stderr.read(2000).decode() if process.stderr else "")
                )
        os.environ["BENCH_SERVER_PID"] = str(process.pid)
        yield base
    finally:
        if profiler is not None:
            profiler.wait(60)
        process.terminate()
        process.wait(20)


class PageClient:
    """A minimal HTTP/1.1 keep-alive client for GET pages with a cookie.

    httpx spends about 3 ms of CPU a request; with 50 readers in one process
    that queueing showed up in the measured latency. This reads exactly what
    the server sends (status line, headers, ``Content-Length`` body) and
    nothing else, so the figures are the server's.
    """

    def __init__(self, base: str, cookie: str) -> None:
        host, port = base.removeprefix("http://").split(":")
        self._address = (host, int(port))
        self._head = f"Host: {host}:{port}\r\nCookie: escrow_session={cookie}\r\n\r\n"
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get(self, path: str) -> int:
        if self._streams is None:
            self._streams = await asyncio.open_connection(*self._address)
        reader, writer = self._streams
        writer.write(f"GET {path} HTTP/1.1\r\n{self._head}".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if length is None:
            raise SystemExit("the benchmark client needs a Content-Length")
        await reader.readexactly(int(length.group(1)))
        return status

    async def aclose(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            await self._streams[1].wait_closed()


async def read_loop(
    base: str, reader: Reader, requests: int, think: float, latencies: list[float]
) -> None:
    client = PageClient(base, reader.cookie)
    try:
        for _ in range(requests):
            if think:  # a person reads for a while before the next page
                await asyncio.sleep(random.uniform(0, 2 * think))
            started = time.perf_counter()
            status = await client.get(reader.path)
            latencies.append((time.perf_counter() - started) * 1000)
            if status != 200:
                raise SystemExit(f"reader got {status}")
    finally:
        await client.aclose()


async def sign_in_loop(base: str, signer: Signer, stop: asyncio.Event, done: list[float]) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        while not stop.is_set():
            client.cookies.clear()
            page = await client.get(signer.link, follow_redirects=True)
            token = _CSRF.search(page.text)
            if token is None:
                raise SystemExit(f"no sign-in form ({page.status_code})")
            started = time.perf_counter()
            response = await client.post(
                "/access/sign-in", data={"csrf": token.group(1), "passphrase": PASSPHRASE}
            )
            if response.status_code != 303:
                raise SystemExit(f"sign-in got {response.status_code}")
            done.append((time.perf_counter() - started) * 1000)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    base: str, readers: list[Reader], requests: int, think: float
) -> tuple[list[float], float]:
    latencies: list[float] = []
    started = time.perf_counter()
    pid = int(os.environ.get("BENCH_SERVER_PID", "0"))
    server_cpu, own_cpu = (cpu_seconds(pid) if pid else 0.0), time.process_time()
    await asyncio.gather(*(read_loop(base, r, requests, think, latencies) for r in readers))
    if pid and os.environ.get("BENCH_VERBOSE"):
        print(
            f"  server CPU {cpu_seconds(pid) - server_cpu:.1f} s, load generator CPU "
            f"{time.process_time() - own_cpu:.1f} s, wall {time.perf_counter() - started:.1f} s, "
            f"{len(latencies)} pages"
        )
    return latencies, time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readers", type=int, default=50)
    parser.add_argument("--requests", type=int, default=30, help="message pages per reader")
    parser.add_argument("--sign-ins", type=int, default=10)
    parser.add_argument(
        "--think",
        type=float,
        default=1.0,
        help="mean seconds a reader spends on a page before the next (uniform 0..2x)",
    )
    parser.add_argument("--database-url", default=os.environ.get("ESCROW_DATABASE_URL"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="escrow-bench-") as tmp:
        data = Path(tmp) / "var"
        port = free_port()
        env = {
            "ESCROW_DATA_DIR": str(data),
            "ESCROW_DATABASE_URL": args.database_url or f"sqlite+aiosqlite:///{data / 'escrow.db'}",
            "ESCROW_MASTER_PASSPHRASE": MASTER,
            "ESCROW_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "ESCROW_WEB_PORT": str(port),
            "ESCROW_NOTIFY_FROM": "secure@practice.example",
            "ESCROW_LOG_LEVEL": "WARNING",
        }
        data.mkdir(parents=True)
        readers, signers, _ = await prepare(env, args.readers, args.sign_ins)
        async with server(env, port) as base:
            await measure(base, readers, 3, 0.0)  # warm-up: connections, subject sealing
            alone, alone_s = await measure(base, readers, args.requests, args.think)
            stop = asyncio.Event()
            sign_ins: list[float] = []
            signing = [asyncio.create_task(sign_in_loop(base, s, stop, sign_ins)) for s in signers]
            await asyncio.sleep(1.0)  # let the sign-ins get going
            loaded, loaded_s = await measure(base, readers, args.requests, args.think)
            stop.set()
            await asyncio.gather(*signing)
            capacity, capacity_s = await measure(base, readers, 10, 0.0)

    engine = "PostgreSQL" if env["ESCROW_DATABASE_URL"].startswith("postgresql") else "SQLite"
    print(
        f"\nReading benchmark: {args.readers} signed-in readers, each loading a message page "
        f"(GET /messages/{{id}}) then reading for 0-{2 * args.think:g} s; {engine}, "
        f"{os.cpu_count()} CPUs, server and load generator on this machine\n"
    )
    print("| scenario | pages | p50 ms | p99 ms | max ms | pages/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, values, seconds in (
        (f"{args.readers} readers", alone, alone_s),
        (f"{args.readers} readers + {args.sign_ins} sign-ins in flight", loaded, loaded_s),
        (f"capacity: {args.readers} readers, no reading time", capacity, capacity_s),
    ):
        print(
            f"| {name} | {len(values)} | {statistics.median(values):.1f} | "
            f"{quantile(values, 0.99):.1f} | {max(values):.1f} | {len(values) / seconds:.0f} |"
        )
    if sign_ins:
        print(
            f"\nSign-ins completed during the loaded run: {len(sign_ins)} "
            f"(p50 {statistics.median(sign_ins):.0f} ms each, Argon2id t=3 m=64 MiB p=4)"
        )


if __name__ == "__main__":
    uvloop.run(main())
