#!/usr/bin/env python3
"""Intake benchmark: escrow against Postfix on the same machine and load.

Postfix's own load generator (``smtp-source``) sends N messages of 10 KB from
C concurrent sessions, first to the escrow server (as a trusted network, no
AUTH), then to a private Postfix instance relaying to the same ``smtp-sink``.
Both are timed end to end: from the first connection until the sink has
received every message (for escrow: every notification). Escrow runs twice:
as one process (the default), and with the outbox worker as a process of its
own (``serve --no-worker`` beside ``serve --no-smtp``). Then ten 20 MB
messages are sent to escrow at once over STARTTLS + AUTH and the server's
peak RSS (VmHWM) is read from /proc.

Prints a markdown table. Needs Debian's ``postfix`` package (smtp-source,
smtp-sink, and postfix itself for the comparison row).

    .venv/bin/python bench/intake.py [--messages 2000] [--sessions 10]
        [--database-url postgresql+asyncpg://...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ESCROW = ROOT / ".venv" / "bin" / "escrow"
STAFF, PASSWORD = "bench@practice.example", "bench password 1234"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


class Sink:
    """``smtp-sink`` with its running counter parsed from standard output."""

    def __init__(self) -> None:
        self.port = free_port()
        self.count = 0
        self._proc = subprocess.Popen(
            ["smtp-sink", "-u", "postfix", "-c", f"127.0.0.1:{self.port}", "256"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        threading.Thread(target=self._read, daemon=True).start()
        wait_port(self.port)

    def _read(self) -> None:
        assert self._proc.stdout is not None
        buffer = b""
        while chunk := self._proc.stdout.read1(4096):  # type: ignore[attr-defined]
            buffer = (buffer + chunk)[-200:]
            found = re.findall(rb"mesg=(\d+)", buffer)
            if found:
                self.count = int(found[-1])

    def wait_for(self, total: int, seconds: float) -> float:
        deadline = time.monotonic() + seconds
        while self.count < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"sink saw {self.count} of {total}")
            time.sleep(0.01)
        return time.monotonic()

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait()


def smtp_source(port: int, messages: int, sessions: int) -> None:
    subprocess.run(
        [
            "smtp-source", "-s", str(sessions), "-m", str(messages), "-l", "10240",
            "-f", STAFF, "-t", "client@example.net", f"127.0.0.1:{port}",
        ],
        check=True,
    )  # fmt: skip


@contextlib.contextmanager
def escrow_server(
    sink: Sink, database_url: str | None, *, worker_process: bool = False
) -> Iterator[tuple[int, subprocess.Popen[bytes], dict[str, str]]]:
    """``escrow serve --no-web``; with ``worker_process``, the outbox worker runs as a second
    ``escrow serve --no-web --no-smtp`` (the split DESIGN.md describes)."""
    with tempfile.TemporaryDirectory(prefix="escrow-bench-") as tmp:
        port = free_port()
        env = {
            "PATH": os.environ["PATH"],
            "HOME": tmp,
            "ESCROW_DATA_DIR": f"{tmp}/var",
            "ESCROW_MASTER_PASSPHRASE": "bench master passphrase",
            "ESCROW_SMTP_PORT": str(port),
            "ESCROW_WEB_PORT": str(free_port()),
            "ESCROW_TRUSTED_NETWORKS": "127.0.0.0/8",
            "ESCROW_TRUSTED_NETWORKS_REQUIRE_TLS": "false",
            "ESCROW_SMARTHOST": f"127.0.0.1:{sink.port}",
            "ESCROW_SMARTHOST_TLS": "none",
            "ESCROW_LOG_LEVEL": "WARNING",
            "ESCROW_ALLOW_SELF_SIGNED": "true",
        }
        if database_url:
            env["ESCROW_DATABASE_URL"] = database_url
        subprocess.run([ESCROW, "init"], env=env, cwd=tmp, check=True, capture_output=True)
        subprocess.run(
            [ESCROW, "staff", "add", STAFF, "--password-stdin"],
            env=env, cwd=tmp, check=True, capture_output=True, input=PASSWORD.encode() + b"\n",
        )  # fmt: skip
        serve: list[str | Path] = [ESCROW, "serve", "--no-web"]
        proc = subprocess.Popen(
            serve + (["--no-worker"] if worker_process else []), env=env, cwd=tmp
        )
        worker = (
            subprocess.Popen([*serve, "--no-smtp"], env=env, cwd=tmp) if worker_process else None
        )
        try:
            wait_port(port)
            yield port, proc, env
        finally:
            for running in (proc, worker):
                if running is not None:
                    running.terminate()
                    running.wait(timeout=30)


POSTFIX_MAIN = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = bench.localdomain
mydestination =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{sink}
smtpd_relay_restrictions = permit_mynetworks, reject
smtp_tls_security_level = none
alias_maps =
local_recipient_maps =
maillog_file = /dev/stdout
smtp_destination_concurrency_limit = 20
default_destination_concurrency_limit = 20
"""

POSTFIX_MASTER = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000    0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@contextlib.contextmanager
def postfix_server(sink: Sink) -> Iterator[int]:
    with tempfile.TemporaryDirectory(prefix="postfix-bench-") as tmp:
        Path(tmp).chmod(0o755)
        port = free_port()
        Path(tmp, "main.cf").write_text(POSTFIX_MAIN.format(dir=tmp, sink=sink.port))
        Path(tmp, "master.cf").write_text(POSTFIX_MASTER.format(port=port))
        for sub in ("queue", "data"):
            Path(tmp, sub).mkdir()
        shutil.chown(Path(tmp, "data"), "postfix")
        subprocess.run(["postfix", "-c", tmp, "set-permissions"], check=True, capture_output=True)
        subprocess.run(["postfix", "-c", tmp, "start"], check=True, capture_output=True)
        try:
            wait_port(port)
            yield port
        finally:
            subprocess.run(["postfix", "-c", tmp, "stop"], capture_output=True)


def run_escrow(
    messages: int, sessions: int, database_url: str | None, *, worker_process: bool = False
) -> tuple[float, float]:
    sink = Sink()
    try:
        with escrow_server(sink, database_url, worker_process=worker_process) as (port, _, _):
            start = time.monotonic()
            smtp_source(port, messages, sessions)
            accepted = time.monotonic()
            done = sink.wait_for(messages, 600)
        return messages / (accepted - start), messages / (done - start)
    finally:
        sink.stop()


def run_postfix(messages: int, sessions: int) -> tuple[float, float]:
    sink = Sink()
    try:
        with postfix_server(sink) as port:
            start = time.monotonic()
            smtp_source(port, messages, sessions)
            accepted = time.monotonic()
            done = sink.wait_for(messages, 600)
        return messages / (accepted - start), messages / (done - start)
    finally:
        sink.stop()


def peak_rss(database_url: str | None, count: int = 10, megabytes: int = 20) -> tuple[float, int]:
    """Send ``count`` messages of ``megabytes`` at once; the server's VmHWM in MB, and 250s."""
    sink = Sink()
    body = (b"A" * 76 + b"\r\n") * (megabytes * 1024 * 1024 // 78)
    message = f"From: {STAFF}\r\nTo: big@example.net\r\nSubject: large\r\n\r\n".encode() + body
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    ok = 0
    lock = threading.Lock()

    def send() -> None:
        nonlocal ok
        with smtplib.SMTP("127.0.0.1", port, timeout=300) as client:
            client.starttls(context=context)
            client.login(STAFF, PASSWORD)
            client.sendmail(STAFF, ["big@example.net"], message)
        with lock:
            ok += 1

    try:
        with escrow_server(sink, database_url) as (port, proc, _env):
            threads = [threading.Thread(target=send) for _ in range(count)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            status = Path(f"/proc/{proc.pid}/status").read_text()
            hwm = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
        return hwm / 1024, ok
    finally:
        sink.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--database-url")
    parser.add_argument("--skip-rss", action="store_true")
    args = parser.parse_args()
    for tool in ("smtp-source", "smtp-sink"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install postfix", file=sys.stderr)
            return 2
    engine = "PostgreSQL" if args.database_url else "SQLite"
    rows = []
    e_acc, e_done = run_escrow(args.messages, args.sessions, args.database_url)
    rows.append((f"escrow ({engine})", e_acc, e_done))
    if args.database_url:
        print("the worker-process row needs an empty database of its own: skipped", file=sys.stderr)
    else:
        s_acc, s_done = run_escrow(args.messages, args.sessions, None, worker_process=True)
        rows.append((f"escrow ({engine}), outbox worker in its own process", s_acc, s_done))
    if shutil.which("postfix"):
        p_acc, p_done = run_postfix(args.messages, args.sessions)
        rows.append(("postfix 3 relay", p_acc, p_done))
    print(f"\n{args.messages} messages of 10 KB, {args.sessions} concurrent smtp-source sessions\n")
    print("| server | accepted msg/s | delivered to sink msg/s |")
    print("|---|---:|---:|")
    for name, acc, done in rows:
        print(f"| {name} | {acc:.0f} | {done:.0f} |")
    postfix = next((row for row in rows if row[0].startswith("postfix")), None)
    if postfix is not None:
        for name, acc, done in rows:
            if name.startswith("escrow"):
                print(
                    f"| ratio {name} / postfix | {acc / postfix[1]:.2f} | {done / postfix[2]:.2f} |"
                )
    if not args.skip_rss:
        rss, ok = peak_rss(args.database_url)
        print(f"\nPeak RSS with ten concurrent 20 MB messages: {rss:.0f} MB ({ok}/10 accepted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
