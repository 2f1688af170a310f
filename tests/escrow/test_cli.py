"""The ``escrow`` console script, run as an operator runs it: a real subprocess.

Each invocation costs about a second, so the tests share one initialised
instance (copied per test) and group several commands per test.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from escrow import migrate
from escrow.audit import EXPORT_FIELDS, Actor, Audit
from escrow.db import Database
from tests.conftest import require

ESCROW = Path(sys.executable).with_name("escrow")
FINGERPRINT = re.compile(r"\b[0-9A-F]{40}\b")
PASSWORD = "correct horse battery staple"


class Instance:
    """One data directory and the clean environment that points the command at it."""

    def __init__(self, root: Path, **extra: str) -> None:
        self.root = root
        self.var = root / "var"
        home = root / "home"
        home.mkdir(exist_ok=True)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "ESCROW_DATA_DIR": str(self.var),
            **extra,
        }

    @property
    def sqlite_url(self) -> str:
        return f"sqlite+aiosqlite:///{self.var / 'escrow.db'}"

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        # cwd is the instance root, so no ./.env of the developer's checkout leaks in.
        return subprocess.run(
            [str(ESCROW), *args],
            input=stdin,
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def ok(self, *args: str, stdin: str | None = None) -> str:
        done = self.run(*args, stdin=stdin)
        assert done.returncode == 0, f"escrow {' '.join(args)}: {done.returncode}\n{done.stderr}"
        assert "Traceback" not in done.stderr
        return done.stdout


def assert_one_line_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def initialised(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(ESCROW.is_file(), f"the escrow console script is not installed at {ESCROW}")
    root = tmp_path_factory.mktemp("template")
    Instance(root).ok("init")
    return root / "var"


@pytest.fixture
def instance(tmp_path: Path, initialised: Path) -> Instance:
    """A copy of an instance on which ``escrow init`` has run (SQLite, development passphrase)."""
    shutil.copytree(initialised, tmp_path / "var")
    return Instance(tmp_path)


# ---------------------------------------------------------------- configuration errors


def test_bad_database_url_is_a_one_line_configuration_error(tmp_path: Path) -> None:
    done = Instance(tmp_path, ESCROW_DATABASE_URL="nonsense://").run("init")
    line = assert_one_line_error(done, 2)
    assert "ESCROW_DATABASE_URL" in line
    assert not (tmp_path / "var").exists()


# ---------------------------------------------------------------- init


def test_init_creates_everything_and_is_idempotent(tmp_path: Path) -> None:
    inst = Instance(tmp_path)
    first = inst.run("init")
    assert first.returncode == 0, first.stderr
    created = re.search(r"vault key created: ([0-9A-F]{40})", first.stdout)
    assert created, first.stdout
    fingerprint = created.group(1)

    var = inst.var
    assert (var / "escrow.db").is_file()
    assert (var / "keys" / f"{fingerprint}.asc").is_file()
    assert (var / "keys" / "ACTIVE").read_text().strip() == fingerprint
    cert, key = var / "tls" / "dev-cert.pem", var / "tls" / "dev-key.pem"
    assert cert.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert key.stat().st_mode & 0o777 == 0o600
    assert var.stat().st_mode & 0o777 == 0o700
    assert (var / "keys").stat().st_mode & 0o777 == 0o700
    secret_file = var / "master.secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert "DEVELOPMENT ONLY" in first.stderr
    master = secret_file.read_text().strip()
    assert master not in first.stdout + first.stderr
    cert_bytes = cert.read_bytes()

    second = inst.run("init")
    assert second.returncode == 0, second.stderr
    assert f"vault key present: {fingerprint}" in second.stdout
    assert f"database at revision {migrate.head_revision()}" in second.stdout
    assert sorted(p.name for p in (var / "keys").glob("*.asc")) == [f"{fingerprint}.asc"]
    assert secret_file.read_text().strip() == master
    assert cert.read_bytes() == cert_bytes
    assert "DEVELOPMENT ONLY" not in second.stderr


def test_db_upgrade_from_empty_and_again(tmp_path: Path) -> None:
    inst = Instance(tmp_path)
    inst.var.mkdir()
    head = migrate.head_revision()
    assert f"database revision empty -> {head}" in inst.ok("db", "upgrade")
    assert f"database revision {head} -> {head}" in inst.ok("db", "upgrade")


# ---------------------------------------------------------------- staff


def test_staff_add_list_duplicate_and_disable(instance: Instance) -> None:
    out = instance.ok("staff", "add", "a@b.example", "--password-stdin", stdin=PASSWORD + "\n")
    assert "added a@b.example (staff)" in out
    instance.ok(
        "staff",
        "add",
        "Boss@B.example",
        "--name",
        "Dr Boss",
        "--admin",
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )

    duplicate = instance.run("staff", "add", "A@B.EXAMPLE", "--password-stdin", stdin=PASSWORD)
    line = assert_one_line_error(duplicate, 1)
    assert "already exists" in line
    assert PASSWORD not in duplicate.stdout + duplicate.stderr

    assert "disabled a@b.example" in instance.ok("staff", "disable", "a@b.example")

    rows = [line.split() for line in instance.ok("staff", "list").splitlines()[1:]]
    assert rows == [
        ["a@b.example", "staff", "disabled"],
        ["boss@b.example", "Dr", "Boss", "admin", "active"],
    ]


# ---------------------------------------------------------------- keys


def _keys(instance: Instance) -> list[tuple[str, str]]:
    """(fingerprint, state) of each ``escrow keys list`` line."""
    return [
        (line.split()[0], line.split()[-1]) for line in instance.ok("keys", "list").splitlines()
    ]


def test_keys_list_rotate_and_export_public(instance: Instance, tmp_path: Path) -> None:
    [(old, state)] = _keys(instance)
    assert FINGERPRINT.fullmatch(old)
    assert state == "active"

    rotated = instance.ok("keys", "rotate")
    new = FINGERPRINT.findall(rotated)[0]
    assert new != old
    assert sorted(_keys(instance)) == sorted([(new, "active"), (old, "retired")])

    armored = instance.ok("keys", "export-public")
    assert armored.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert armored.rstrip().endswith("-----END PGP PUBLIC KEY BLOCK-----")
    assert "PRIVATE KEY" not in armored

    gpg = shutil.which("gpg")
    if gpg is not None:
        home = tmp_path / "gnupg"
        home.mkdir(mode=0o700)
        shown = subprocess.run(
            [gpg, "--batch", "--with-colons", "--show-keys"],
            input=armored,
            env={"GNUPGHOME": str(home), "PATH": os.environ.get("PATH", "")},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        fprs = [ln.split(":")[9] for ln in shown.splitlines() if ln.startswith("fpr:")]
        assert fprs[0] == new
        assert not any(ln.startswith("sec:") for ln in shown.splitlines())


# ---------------------------------------------------------------- audit


async def _seed(url: str) -> None:
    db = Database(url)
    try:
        audit = Audit(db)
        client = Actor("recipient", id="r-1", remote_addr="198.51.100.7", user_agent="Firefox")
        for action, message in [
            ("message.accepted", "m1"),
            ("link.opened", "m1"),
            ("login.failed", None),
            ("message.accepted", "m2"),
            ("message.viewed", "m1"),
            ("message.viewed", "m2"),
        ]:
            await audit.log(action, client, message_id=message)
    finally:
        await db.dispose()


async def test_audit_verify_export_and_tampering(instance: Instance) -> None:
    await _seed(instance.sqlite_url)

    assert "audit chain intact: 6 events, last 6" in instance.ok("audit", "verify")

    rows = [json.loads(line) for line in instance.ok("audit", "export").splitlines()]
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(list(r) == list(EXPORT_FIELDS) for r in rows)
    assert rows[1]["action"] == "link.opened"

    # The jsonl export above was itself audited (event 7), so CSV shows 7 rows.
    table = list(csv.DictReader(io.StringIO(instance.ok("audit", "export", "--format", "csv"))))
    assert [int(r["seq"]) for r in table] == list(range(1, 8))
    assert table[6]["action"] == "audit.exported"
    assert json.loads(table[6]["detail"])["format"] == "jsonl"
    assert table[2]["message_id"] == ""
    assert [r["hash"] for r in table[:6]] == [r["hash"] for r in rows]

    since = rows[3]["at"]
    filtered = instance.ok("audit", "export", "--since", since, "--message", "m1")
    picked = [json.loads(line) for line in filtered.splitlines()]
    expected = [r["seq"] for r in rows if r["message_id"] == "m1" and r["at"] >= since]
    assert expected, "the seeded events do not exercise both filters"
    assert [r["seq"] for r in picked] == expected

    bad_since = instance.run("audit", "export", "--since", "last tuesday")
    assert "--since" in assert_one_line_error(bad_since, 2)

    events = 9  # 6 seeded, 3 exports audited
    assert f"audit chain intact: {events} events" in instance.ok("audit", "verify")
    with sqlite3.connect(instance.var / "escrow.db") as raw:
        raw.execute("UPDATE audit_event SET actor_id = 'r-2' WHERE seq = 4")
    broken = instance.run("audit", "verify")
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "BROKEN at event 4" in broken.stdout
    assert "Traceback" not in broken.stderr


# ---------------------------------------------------------------- PostgreSQL


def test_postgresql_needs_a_real_master_passphrase(tmp_path: Path, pg_url: str) -> None:
    inst = Instance(tmp_path, ESCROW_DATABASE_URL=pg_url)
    refused = inst.run("init")
    assert "ESCROW_MASTER_PASSPHRASE" in assert_one_line_error(refused, 2)
    assert not (inst.var / "master.secret").exists()
    assert not (inst.var / "keys").exists()

    inst.env["ESCROW_MASTER_PASSPHRASE"] = "a real passphrase from a secrets manager"
    assert FINGERPRINT.search(inst.ok("init"))
    assert not (inst.var / "master.secret").exists()
    assert not (inst.var / "escrow.db").exists()
    inst.ok("staff", "add", "a@b.example", "--password-stdin", stdin=PASSWORD + "\n")
    assert "audit chain intact: 1 events, last 1" in inst.ok("audit", "verify")


# ---------------------------------------------------------------- serve


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def served(instance: Instance) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    port = _free_port()
    instance.env["ESCROW_WEB_PORT"] = str(port)
    log = instance.root / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [str(ESCROW), "serve", "--no-smtp", "--no-worker"],
            env=instance.env,
            cwd=instance.root,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc, f"http://127.0.0.1:{port}", log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _wait_until_answering(proc: subprocess.Popen[bytes], url: str, log: Path) -> httpx.Response:
    """Poll ``url`` until it answers, the server dies, or 60 s pass."""
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            pytest.fail(f"escrow serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            return httpx.get(url, timeout=2)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                pytest.fail(f"escrow serve did not answer within 60 s:\n{log.read_text()}")
        time.sleep(0.05)  # poll interval, not synchronisation: the loop ends on an answer


def test_serve_answers_health_checks_and_stops_on_sigterm(
    served: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    proc, base, log = served
    health = _wait_until_answering(proc, f"{base}/healthz", log)
    assert health.status_code == 200
    assert health.text == "ok\n"
    assert "server" not in health.headers
    assert httpx.get(f"{base}/readyz", timeout=5).status_code == 200

    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0, log.read_text()
    assert time.monotonic() - started < 5
    assert "Traceback" not in log.read_text()
