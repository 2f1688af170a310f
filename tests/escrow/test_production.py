"""Production start-up, run as an operator runs it (a real ``escrow`` process).

Production means PostgreSQL or an https ``ESCROW_PUBLIC_URL``. There the server refuses,
with exit code 2 and one line that says what to set: a missing master passphrase, and
SMTP on a self-signed certificate (the development one or a configured one) unless
``ESCROW_ALLOW_SELF_SIGNED=true``. Also here: ``ESCROW_DATABASE_PASSWORD``,
``ESCROW_TRUSTED_PROXIES``, and JSON logs that carry no message content and no secrets.
"""

from __future__ import annotations

import datetime as dt
import json
import smtplib
import ssl
import subprocess
import time
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy.engine import make_url

from escrow.db import Database
from escrow.devcert import ensure_dev_certificate
from escrow.errors import SettingsError
from escrow.production import check_smtp_certificate, is_self_signed
from escrow.settings import load_settings
from tests.conftest import make_environ, require
from tests.deploy.process import VENV_BIN, Server, base_environ, free_port, run_escrow, start

MASTER = "production test master passphrase"
PUBLIC_HTTPS = "https://secure.riverside.example"


@pytest.fixture(autouse=True)
def _escrow_installed() -> None:
    require((VENV_BIN / "escrow").is_file(), f"the escrow console script is not in {VENV_BIN}")


@pytest.fixture(params=["https", pytest.param("postgresql", marks=pytest.mark.postgres)])
def production(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """Settings that make an instance production: an https public URL, or PostgreSQL."""
    settings = {
        "ESCROW_DATA_DIR": str(tmp_path / "var"),
        "ESCROW_PRACTICE_NAME": "Riverside Counselling",
        "ESCROW_NOTIFY_FROM": "secure@riverside.example",
        "ESCROW_WEB_PORT": str(free_port()),
        "ESCROW_SMTP_PORT": str(free_port()),
    }
    if request.param == "https":
        settings["ESCROW_PUBLIC_URL"] = PUBLIC_HTTPS
    else:
        settings["ESCROW_DATABASE_URL"] = str(request.getfixturevalue("pg_url"))
    return base_environ(tmp_path, **settings)


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """Exit code 2 and exactly one line on stderr, no traceback."""
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("escrow: configuration error: ")
    return lines[0]


# ---------------------------------------------------------------- master passphrase


@pytest.mark.parametrize("command", ["init", "serve"])
def test_production_refuses_to_start_without_a_master_passphrase(
    production: dict[str, str], tmp_path: Path, command: str
) -> None:
    line = one_line_error(run_escrow([command], production, tmp_path))
    assert "ESCROW_MASTER_PASSPHRASE" in line
    assert "ESCROW_MASTER_PASSPHRASE_FILE" in line
    assert not (tmp_path / "var" / "master.secret").exists()


# ---------------------------------------------------------------- SMTP certificate


def test_production_smtp_refuses_the_development_certificate(
    production: dict[str, str], tmp_path: Path
) -> None:
    env = {**production, "ESCROW_MASTER_PASSPHRASE": MASTER}
    init = run_escrow(["init"], env, tmp_path)
    assert init.returncode == 0, init.stderr
    assert "ESCROW_TLS_CERT" in init.stdout
    # init made no development certificate for serve to fall back on.
    assert not (tmp_path / "var" / "tls").exists()

    line = one_line_error(run_escrow(["serve"], env, tmp_path))
    assert "ESCROW_TLS_CERT" in line
    assert "ESCROW_TLS_KEY" in line
    assert "ESCROW_ALLOW_SELF_SIGNED=true" in line


def test_production_smtp_refuses_a_configured_self_signed_certificate(
    production: dict[str, str], tmp_path: Path
) -> None:
    cert, key = ensure_dev_certificate(tmp_path / "certs", "secure.riverside.example")
    env = {
        **production,
        "ESCROW_MASTER_PASSPHRASE": MASTER,
        "ESCROW_TLS_CERT": str(cert),
        "ESCROW_TLS_KEY": str(key),
    }
    assert run_escrow(["init"], env, tmp_path).returncode == 0
    line = one_line_error(run_escrow(["serve"], env, tmp_path))
    assert "self-signed" in line
    assert "ESCROW_TLS_CERT" in line
    assert "ESCROW_ALLOW_SELF_SIGNED=true" in line


def wait_stopped(server: Server) -> str:
    code, seconds = server.terminate()
    assert code == 0, server.output()
    assert seconds < 5
    return server.stderr.read_text()


def test_the_explicit_opt_in_allows_the_self_signed_certificate(
    production: dict[str, str], tmp_path: Path
) -> None:
    env = {**production, "ESCROW_MASTER_PASSPHRASE": MASTER, "ESCROW_ALLOW_SELF_SIGNED": "true"}
    init = run_escrow(["init"], env, tmp_path)
    assert init.returncode == 0, init.stderr
    server = start([str(VENV_BIN / "escrow"), "serve"], env, tmp_path, tmp_path / "logs")
    try:
        server.wait_http(f"http://127.0.0.1:{env['ESCROW_WEB_PORT']}/readyz")
        with smtplib.SMTP("127.0.0.1", int(env["ESCROW_SMTP_PORT"]), timeout=10) as client:
            assert client.ehlo()[0] == 250
        assert "self-signed certificate" in wait_stopped(server)
    finally:
        server.kill()


def test_a_web_only_replica_needs_no_smtp_certificate(
    production: dict[str, str], tmp_path: Path
) -> None:
    env = {**production, "ESCROW_MASTER_PASSPHRASE": MASTER}
    assert run_escrow(["init"], env, tmp_path).returncode == 0
    server = start(
        [str(VENV_BIN / "escrow"), "serve", "--no-smtp"], env, tmp_path, tmp_path / "logs"
    )
    try:
        server.wait_http(f"http://127.0.0.1:{env['ESCROW_WEB_PORT']}/readyz")
        wait_stopped(server)
    finally:
        server.kill()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def write_ca_issued_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate it issued: (ca cert, server chain, server key)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("Riverside Test CA"))
        .issuer_name(_name("Riverside Test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("secure.riverside.example"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("secure.riverside.example")]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "fullchain.pem").write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    (directory / "privkey.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return directory / "ca.pem", directory / "fullchain.pem", directory / "privkey.pem"


def test_a_ca_issued_certificate_is_accepted_and_a_self_signed_one_is_recognised(
    tmp_path: Path,
) -> None:
    ca, chain, key = write_ca_issued_certificate(tmp_path / "tls")
    dev_cert, _dev_key = ensure_dev_certificate(tmp_path / "dev")
    assert is_self_signed(ca)
    assert is_self_signed(dev_cert)
    assert not is_self_signed(chain)
    assert not is_self_signed(tmp_path / "missing.pem")

    environ = make_environ(
        tmp_path / "var",
        "sqlite+aiosqlite:///x.db",
        ESCROW_PUBLIC_URL=PUBLIC_HTTPS,
        ESCROW_TLS_CERT=str(chain),
        ESCROW_TLS_KEY=str(key),
    )
    settings = load_settings(environ, dotenv_path=tmp_path / "no.env")
    assert settings.is_production
    check_smtp_certificate(settings)  # does not raise

    environ["ESCROW_TLS_CERT"] = str(dev_cert)
    with pytest.raises(SettingsError, match="self-signed"):
        check_smtp_certificate(load_settings(environ, dotenv_path=tmp_path / "no.env"))
    # Development keeps its convenience.
    environ["ESCROW_PUBLIC_URL"] = "http://127.0.0.1:8080"
    check_smtp_certificate(load_settings(environ, dotenv_path=tmp_path / "no.env"))


# ---------------------------------------------------------------- database password


def test_database_password_is_inserted_into_a_postgresql_url(tmp_path: Path) -> None:
    secret = tmp_path / "db_password"
    secret.write_text("p@ss:w/rd %1\n")
    environ = make_environ(
        tmp_path / "var",
        "postgresql://escrow@postgres:5432/escrow",
        ESCROW_DATABASE_PASSWORD_FILE=str(secret),
    )
    settings = load_settings(environ, dotenv_path=tmp_path / "no.env")
    url = make_url(settings.database_url)
    assert (url.drivername, url.username, url.host, url.database) == (
        "postgresql+asyncpg",
        "escrow",
        "postgres",
        "escrow",
    )
    assert url.password == "p@ss:w/rd %1"
    assert "p@ss" not in repr(settings)
    assert "p%40ss" not in repr(settings)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://escrow:inline@postgres/escrow", "already holds a password"),
        ("sqlite+aiosqlite:///escrow.db", "only to a postgresql"),
    ],
)
def test_database_password_is_refused_where_it_cannot_apply(
    tmp_path: Path, url: str, message: str
) -> None:
    environ = make_environ(tmp_path / "var", url, ESCROW_DATABASE_PASSWORD="secret")
    with pytest.raises(SettingsError, match=message) as raised:
        load_settings(environ, dotenv_path=tmp_path / "no.env")
    assert "inline" not in str(raised.value)


@pytest.mark.postgres
async def test_a_url_with_the_inserted_password_connects(tmp_path: Path, pg_url: str) -> None:
    environ = make_environ(tmp_path / "var", pg_url, ESCROW_DATABASE_PASSWORD="any; trust auth")
    settings = load_settings(environ, dotenv_path=tmp_path / "no.env")
    assert make_url(settings.database_url).password == "any; trust auth"
    db = Database(settings.database_url)
    try:
        await db.ping()
    finally:
        await db.dispose()


# ---------------------------------------------------------------- trusted proxies


def test_trusted_proxies_take_addresses_and_networks(tmp_path: Path) -> None:
    environ = make_environ(
        tmp_path / "var",
        "sqlite+aiosqlite:///x.db",
        ESCROW_TRUSTED_PROXIES="172.28.73.10, 10.0.0.0/24,::1",
    )
    settings = load_settings(environ, dotenv_path=tmp_path / "no.env")
    assert settings.trusted_proxies == ("172.28.73.10", "10.0.0.0/24", "::1")
    assert (
        load_settings(
            make_environ(tmp_path / "var", "sqlite+aiosqlite:///x.db"),
            dotenv_path=tmp_path / "no.env",
        ).trusted_proxies
        == ()
    )
    environ["ESCROW_TRUSTED_PROXIES"] = "caddy"
    with pytest.raises(SettingsError, match="ESCROW_TRUSTED_PROXIES"):
        load_settings(environ, dotenv_path=tmp_path / "no.env")


# ---------------------------------------------------------------- JSON logs

SECRET_MARKERS = {
    "master passphrase": "MARKER-master-7b1e",
    "staff password": "MARKER-staffpw-4c2d correct horse",
    "wrong password": "MARKER-wrongpw-9a0f",
    "subject": "MARKER-subject-Panic attacks",
    "body": "MARKER-body-medication dose",
    "attachment name": "MARKER-attachment-intake-form.pdf",
    "attachment content": "MARKER-attachment-content-diagnosis",
    "token in a URL": "MARKER-linktoken-Zm9vYmFy",
    "recipient address": "marker.client@clients.example",
    "staff address": "marker.therapist@riverside.example",
}


def test_json_logs_are_one_object_a_line_without_content_or_secrets(tmp_path: Path) -> None:
    web_port, smtp_port = free_port(), free_port()
    env = base_environ(
        tmp_path,
        ESCROW_DATA_DIR=str(tmp_path / "var"),
        ESCROW_MASTER_PASSPHRASE=SECRET_MARKERS["master passphrase"],
        ESCROW_PRACTICE_NAME="Riverside Counselling",
        ESCROW_NOTIFY_FROM="secure@riverside.example",
        ESCROW_WEB_PORT=str(web_port),
        ESCROW_SMTP_PORT=str(smtp_port),
        ESCROW_LOG_FORMAT="json",
        ESCROW_LOG_LEVEL="DEBUG",
    )
    staff = SECRET_MARKERS["staff address"]
    logged: list[str] = []
    for args, stdin in (
        (["init"], ""),
        (["staff", "add", staff, "--password-stdin"], SECRET_MARKERS["staff password"] + "\n"),
    ):
        done = run_escrow(args, env, tmp_path, stdin=stdin)
        assert done.returncode == 0, done.stderr
        logged.append(done.stderr)

    server = start([str(VENV_BIN / "escrow"), "serve"], env, tmp_path, tmp_path / "logs")
    try:
        server.wait_http(f"http://127.0.0.1:{web_port}/readyz")
        mail = EmailMessage()
        mail["From"] = staff
        mail["To"] = SECRET_MARKERS["recipient address"]
        mail["Subject"] = SECRET_MARKERS["subject"]
        mail.set_content(SECRET_MARKERS["body"])
        mail.add_attachment(
            SECRET_MARKERS["attachment content"].encode(),
            maintype="application",
            subtype="pdf",
            filename=SECRET_MARKERS["attachment name"],
        )
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
            client.starttls(context=context)
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login(staff, SECRET_MARKERS["wrong password"])
            client.login(staff, SECRET_MARKERS["staff password"])
            client.send_message(mail)
        # The worker delivers the notification to the capture directory.
        deadline = time.monotonic() + 30
        while not list((tmp_path / "var" / "mail").glob("*.eml")):
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.05)
        token = SECRET_MARKERS["token in a URL"]
        for path in (f"/m/{token}", f"/{token}"):
            # A 404 or a neutral page: only what gets logged matters here.
            httpx.get(f"http://127.0.0.1:{web_port}{path}", timeout=5)
        logged.append(wait_stopped(server))
    finally:
        server.kill()

    lines = [line for text in logged for line in text.splitlines() if line.strip()]
    assert lines, "nothing was logged"
    for line in lines:
        entry = json.loads(line)
        assert isinstance(entry, dict)
        assert {"time", "level", "logger", "message"} <= entry.keys(), line
    everything = "\n".join(lines)
    for what, marker in SECRET_MARKERS.items():
        assert marker not in everything, f"the {what} appears in the logs"
    messages = [json.loads(line)["message"] for line in lines]
    assert any(m.startswith("accepted message ") for m in messages), messages
    assert any("SMTP AUTH failed for m***@riverside.example" in m for m in messages), messages
