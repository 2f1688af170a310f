"""The container's start, without a container: deploy/entrypoint.sh run as the image runs
it (the image's ESCROW_* environment, secrets as files, PostgreSQL), until /healthz and
/readyz answer; then SIGTERM must end it cleanly, and the image's HEALTHCHECK must pass.

Differences from the image, on purpose: listeners bind to 127.0.0.1 on free ports (not
0.0.0.0 on 2525/4650/8080), and the directories are temporary. The SMTP certificate is
the development one, which is self-signed; production refuses that without the explicit
opt-in, so these tests set ESCROW_ALLOW_SELF_SIGNED=true (a real deployment mounts a CA
certificate instead).
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from escrow import migrate
from escrow.devcert import ensure_dev_certificate
from tests.deploy import dockerfile
from tests.deploy.process import ROOT, Server, base_environ, free_port, start

pytestmark = pytest.mark.postgres

ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"
STOP_WITHIN_SECONDS = 5.0


@dataclass
class Instance:
    pg_url: str
    env: dict[str, str]
    workdir: Path
    logs: Path
    web: str
    smtp_port: int
    smtps_port: int

    def start(self, name: str) -> Server:
        return start(image_command(), self.env, self.workdir, self.logs / name)


def image_command() -> list[str]:
    """The image's ENTRYPOINT and CMD, with the entrypoint script at its place in the repo.

    Executed directly, as Docker does: its ``#!/bin/sh`` line picks the shell (dash on
    Debian, as in the slim image), so a bashism in it would fail here too.
    """
    final = dockerfile.final_stage()
    (entrypoint,) = [json.loads(rest) for keyword, rest in final if keyword == "ENTRYPOINT"]
    (cmd,) = [json.loads(rest) for keyword, rest in final if keyword == "CMD"]
    (copy,) = [rest for keyword, rest in final if keyword == "COPY" and "entrypoint" in rest]
    source, target = copy.split()[-2:]
    assert Path(target).name == entrypoint[0], "ENTRYPOINT is not the copied script"
    return [str(ROOT / source), *entrypoint[1:], *cmd]


@pytest.fixture
def instance(tmp_path: Path, pg_url: str) -> Instance:
    secrets = tmp_path / "run-secrets"
    secrets.mkdir()
    (secrets / "master_passphrase").write_text("entrypoint test master passphrase\n")
    (secrets / "db_password").write_text("not checked by the test server's trust auth\n")
    cert, key = ensure_dev_certificate(tmp_path / "tls", "localhost")
    web_port, smtp_port, smtps_port = free_port(), free_port(), free_port()
    image_env = dockerfile.env()
    settings = {name: value for name, value in image_env.items() if name.startswith("ESCROW_")}
    settings.update(
        ESCROW_DATA_DIR=str(tmp_path / "var-lib-escrow"),
        ESCROW_KEYS_DIR=str(tmp_path / "var-lib-escrow-keys"),
        ESCROW_SMTP_HOST="127.0.0.1",
        ESCROW_SMTP_PORT=str(smtp_port),
        ESCROW_SMTPS_PORT=str(smtps_port),
        ESCROW_WEB_HOST="127.0.0.1",
        ESCROW_WEB_PORT=str(web_port),
        # What compose.yaml and .env.example give the container.
        ESCROW_DATABASE_URL=pg_url,
        ESCROW_DATABASE_PASSWORD_FILE=str(secrets / "db_password"),
        ESCROW_MASTER_PASSPHRASE_FILE=str(secrets / "master_passphrase"),
        ESCROW_PUBLIC_URL="https://secure.riverside.example",
        ESCROW_PRACTICE_NAME="Riverside Counselling",
        ESCROW_NOTIFY_FROM="secure@riverside.example",
        ESCROW_TLS_CERT=str(cert),
        ESCROW_TLS_KEY=str(key),
        ESCROW_ALLOW_SELF_SIGNED="true",
    )
    workdir = tmp_path / "srv-escrow"  # like the image's empty WORKDIR: no ./.env
    workdir.mkdir()
    return Instance(
        pg_url=pg_url,
        env=base_environ(tmp_path, **settings),
        workdir=workdir,
        logs=tmp_path / "logs",
        web=f"http://127.0.0.1:{web_port}",
        smtp_port=smtp_port,
        smtps_port=smtps_port,
    )


@pytest.fixture
def running(instance: Instance) -> Iterator[Server]:
    server = instance.start("first")
    try:
        server.wait_http(f"{instance.web}/healthz")
        server.wait_http(f"{instance.web}/readyz")
        yield server
    finally:
        server.kill()


def smtp_banner(port: int, *, implicit_tls: bool) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        if not implicit_tls:
            return raw.recv(512)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with context.wrap_socket(raw) as tls:
            return tls.recv(512)


async def _pg_schema_revision(pg_url: str) -> str:
    conn = await asyncpg.connect(pg_url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        return str(await conn.fetchval("SELECT version_num FROM alembic_version"))
    finally:
        await conn.close()


def test_entrypoint_serves_and_stops_cleanly_on_sigterm(
    instance: Instance, running: Server
) -> None:
    # `escrow init` migrated the PostgreSQL database (and made no SQLite one on the side).
    assert asyncio.run(_pg_schema_revision(instance.pg_url)) == migrate.head_revision()
    assert not list(Path(instance.env["ESCROW_DATA_DIR"]).glob("*.db"))
    assert "vault key created" in running.stdout.read_text()
    assert smtp_banner(instance.smtp_port, implicit_tls=False).startswith(b"220 ")
    assert smtp_banner(instance.smtps_port, implicit_tls=True).startswith(b"220 ")

    code, seconds = running.terminate()
    # 0, not bash's 143: `exec` made the server itself receive the signal.
    assert code == 0, running.output()
    assert seconds < STOP_WITHIN_SECONDS
    # The JSON logs of a clean stop, and nothing on stderr that is not a log line.
    assert '"message": "stopped"' in running.stderr.read_text()

    # A restart on the same volumes: init finds the key and the schema and changes nothing.
    again = instance.start("second")
    try:
        again.wait_http(f"{instance.web}/readyz")
        assert "vault key present" in again.stdout.read_text()
        code, _ = again.terminate()
        assert code == 0, again.output()
    finally:
        again.kill()


def test_the_image_healthcheck_passes_against_the_server(
    instance: Instance, running: Server, tmp_path: Path
) -> None:
    command = dockerfile.healthcheck_command()
    assert command[0] == "python"  # the venv's python is first on the image's PATH
    env = {**instance.env}
    ok = subprocess.run(command, env=env, capture_output=True, timeout=30, check=False)
    assert ok.returncode == 0, ok.stderr

    # And it does fail when nothing answers.
    env["ESCROW_WEB_PORT"] = str(free_port())
    down = subprocess.run(command, env=env, capture_output=True, timeout=30, check=False)
    assert down.returncode != 0
