"""Settings: the defaults of the operator contract, where values come from, and bad input."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest

from escrow.errors import SettingsError
from escrow.settings import Secret, Settings, load_settings, read_dotenv

NO_DOTENV = "no.env"


def load(tmp_path: Path, environ: dict[str, str] | None = None) -> Settings:
    """Settings from ``environ`` only (no ``.env``), relative to ``tmp_path``."""
    return load_settings(environ or {}, dotenv_path=tmp_path / NO_DOTENV)


def test_defaults_match_the_operator_contract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    s = load(tmp_path)
    var = (tmp_path / "var").resolve()

    assert s.data_dir == var
    assert s.database_url == f"sqlite+aiosqlite:///{var / 'escrow.db'}"
    assert s.keys_dir == var / "keys"
    assert s.master_passphrase is None
    assert s.master_secret_file == var / "master.secret"
    assert s.mail_capture_dir == var / "mail"
    assert s.public_url == "http://127.0.0.1:8080"
    assert s.practice_name == "Your practice"
    assert s.notify_from == "no-reply@localhost"
    assert s.internal_domains == frozenset()
    assert s.trusted_networks == ()
    assert (s.smtp_host, s.smtp_port) == ("127.0.0.1", 2525)
    assert s.smtps_port is None
    assert (s.tls_cert, s.tls_key) == (None, None)
    assert (s.web_host, s.web_port) == ("127.0.0.1", 8080)
    assert s.smarthost is None
    assert s.smarthost_tls == "starttls"
    assert s.smarthost_user is None
    assert s.smarthost_password is None
    assert s.max_message_mb == 25
    assert s.max_message_bytes == 25 * 1024 * 1024
    assert s.outbox_retry_seconds == 60
    assert s.outbox_give_up_days == 5
    assert s.message_ttl_days == 90
    assert (s.session_idle_minutes, s.session_max_hours) == (15, 8)
    assert s.reply_mode == "deliver"
    assert s.vault_retention_days == 2555
    assert s.consent_text_file is None
    assert s.quick_exit_url.startswith(("https://", "http://"))
    assert s.staff_require_totp is True
    assert s.read_receipts is False
    assert s.log_level == "INFO"
    assert s.log_format == "text"
    # SQLite and an http URL: development mode, no Secure cookies.
    assert s.is_production is False
    assert s.secure_cookies is False


def test_settings_are_frozen(tmp_path: Path) -> None:
    s = load(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.web_port = 1  # type: ignore[misc]


def test_data_dir_moves_the_database_and_keys_with_it(tmp_path: Path) -> None:
    s = load(tmp_path, {"ESCROW_DATA_DIR": str(tmp_path / "elsewhere")})
    data = (tmp_path / "elsewhere").resolve()
    assert s.data_dir == data
    assert s.database_url == f"sqlite+aiosqlite:///{data / 'escrow.db'}"
    assert s.keys_dir == data / "keys"


def test_relative_data_dir_is_taken_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    s = load(tmp_path, {"ESCROW_DATA_DIR": "state", "ESCROW_KEYS_DIR": "secrets/keys"})
    assert s.data_dir == (tmp_path / "state").resolve()
    assert s.keys_dir == (tmp_path / "secrets" / "keys").resolve()


def test_environment_beats_dotenv_and_dotenv_fills_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(
        "# a comment line\n"
        "\n"
        "ESCROW_PRACTICE_NAME=From the dotenv file\n"
        "export ESCROW_WEB_PORT=9090\n"
        "ESCROW_NOTIFY_FROM='secure@riverside.example'\n"
        'ESCROW_INTERNAL_DOMAINS="Riverside.Example, @staff.riverside.example"\n',
        encoding="utf-8",
    )
    # No dotenv_path: ./.env of the working directory is read.
    s = load_settings({"ESCROW_PRACTICE_NAME": "From the environment"})
    assert s.practice_name == "From the environment"
    assert s.web_port == 9090
    assert s.notify_from == "secure@riverside.example"
    assert s.internal_domains == frozenset({"riverside.example", "staff.riverside.example"})


def test_dotenv_with_a_line_that_is_not_an_assignment_is_refused(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("ESCROW_WEB_PORT=9090\njust some words\n", encoding="utf-8")
    with pytest.raises(SettingsError, match="line 2"):
        read_dotenv(path)


def test_dotenv_comments_after_values_are_dropped_as_docker_compose_does(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text(
        "ESCROW_WEB_PORT=9090   # the portal\n"
        'ESCROW_PRACTICE_NAME="Riverside #2 Counselling"  # quoted: the # stays\n'
        "ESCROW_NOTIFY_FROM='secure@riverside.example'\n"
        "ESCROW_SMARTHOST_USER=user#1\n",
        encoding="utf-8",
    )
    assert read_dotenv(path) == {
        "ESCROW_WEB_PORT": "9090",
        "ESCROW_PRACTICE_NAME": "Riverside #2 Counselling",
        "ESCROW_NOTIFY_FROM": "secure@riverside.example",
        "ESCROW_SMARTHOST_USER": "user#1",
    }


def test_dotenv_with_unbalanced_quotes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text('ESCROW_PRACTICE_NAME="Riverside\n', encoding="utf-8")
    with pytest.raises(SettingsError, match="line 1: unbalanced quotes"):
        read_dotenv(path)


def test_secret_from_a_file(tmp_path: Path) -> None:
    master = tmp_path / "master"
    master.write_text("correct horse battery staple\n", encoding="utf-8")
    relay = tmp_path / "relay"
    relay.write_text("relay-password", encoding="utf-8")
    s = load(
        tmp_path,
        {
            "ESCROW_MASTER_PASSPHRASE_FILE": str(master),
            "ESCROW_SMARTHOST_PASSWORD_FILE": str(relay),
        },
    )
    assert s.master_passphrase is not None
    # The trailing newline an editor adds is not part of the secret.
    assert s.master_passphrase.reveal() == "correct horse battery staple"
    assert s.smarthost_password is not None
    assert s.smarthost_password.reveal() == "relay-password"


def test_secret_file_named_in_dotenv(tmp_path: Path) -> None:
    secret_file = tmp_path / "master"
    secret_file.write_text("from a file named in .env", encoding="utf-8")
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"ESCROW_MASTER_PASSPHRASE_FILE={secret_file}\n", encoding="utf-8")
    s = load_settings({}, dotenv_path=dotenv)
    assert s.master_passphrase is not None
    assert s.master_passphrase.reveal() == "from a file named in .env"


def test_secret_and_secret_file_both_set_is_an_error(tmp_path: Path) -> None:
    secret_file = tmp_path / "master"
    secret_file.write_text("from the file", encoding="utf-8")
    with pytest.raises(SettingsError) as caught:
        load(
            tmp_path,
            {
                "ESCROW_MASTER_PASSPHRASE": "direct-value-7c1f",
                "ESCROW_MASTER_PASSPHRASE_FILE": str(secret_file),
            },
        )
    message = str(caught.value)
    assert "ESCROW_MASTER_PASSPHRASE" in message
    assert "ESCROW_MASTER_PASSPHRASE_FILE" in message
    assert "direct-value-7c1f" not in message
    assert "from the file" not in message


@pytest.mark.parametrize("content", [None, ""], ids=["missing", "empty"])
def test_unusable_secret_file_names_the_variable(tmp_path: Path, content: str | None) -> None:
    secret_file = tmp_path / "master"
    if content is not None:
        secret_file.write_text(content, encoding="utf-8")
    with pytest.raises(SettingsError, match="ESCROW_MASTER_PASSPHRASE_FILE"):
        load(tmp_path, {"ESCROW_MASTER_PASSPHRASE_FILE": str(secret_file)})


def test_secrets_never_show_in_repr_or_str(tmp_path: Path) -> None:
    master = "master-9f8e7d6c5b4a"
    relay = "relay-0a1b2c3d4e5f"
    s = load(
        tmp_path,
        {
            "ESCROW_MASTER_PASSPHRASE": master,
            "ESCROW_SMARTHOST": "smtp.example.org:587",
            "ESCROW_SMARTHOST_USER": "relay-user",
            "ESCROW_SMARTHOST_PASSWORD": relay,
        },
    )
    assert s.master_passphrase is not None and s.smarthost_password is not None
    assert s.master_passphrase.reveal() == master
    assert s.smarthost_password.reveal() == relay
    for shown in (
        repr(s),
        str(s),
        repr(s.master_passphrase),
        str(s.master_passphrase),
        f"{s.smarthost_password}",
        repr(dataclasses.asdict(s)),
        repr([s.master_passphrase]),
    ):
        assert master not in shown
        assert relay not in shown
    # The non-secret neighbour is shown, so the check above is not vacuous.
    assert "relay-user" in repr(s)


def test_secret_compares_by_value_without_revealing_it() -> None:
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")
    assert Secret("a") != "a"
    assert not Secret("")
    assert Secret("x")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ESCROW_SMTP_PORT", "0"),
        ("ESCROW_SMTP_PORT", "65536"),
        ("ESCROW_SMTP_PORT", "smtp"),
        ("ESCROW_WEB_PORT", "-1"),
        ("ESCROW_WEB_PORT", "80.5"),
        ("ESCROW_SMTPS_PORT", "100000"),
        ("ESCROW_STAFF_REQUIRE_TOTP", "maybe"),
        ("ESCROW_READ_RECEIPTS", "2"),
        ("ESCROW_DATABASE_URL", "nonsense://"),
        ("ESCROW_DATABASE_URL", "mysql://user@host/db"),
        ("ESCROW_DATABASE_URL", "escrow.db"),
        ("ESCROW_VAULT_RETENTION_DAYS", "30"),
        ("ESCROW_SMARTHOST", "smtp.example.org"),
        ("ESCROW_SMARTHOST", "smtp.example.org:"),
        ("ESCROW_SMARTHOST", "smtp.example.org:smtp"),
        ("ESCROW_SMARTHOST", "smtp.example.org:70000"),
        ("ESCROW_TRUSTED_NETWORKS", "10.0.0.0/33"),
        ("ESCROW_TRUSTED_NETWORKS", "192.0.2.0/24, the office"),
        ("ESCROW_SMARTHOST_TLS", "ssl"),
        ("ESCROW_REPLY_MODE", "forward"),
        ("ESCROW_LOG_FORMAT", "xml"),
        ("ESCROW_LOG_LEVEL", "chatty"),
        ("ESCROW_PUBLIC_URL", "ftp://files.example.org"),
        ("ESCROW_PUBLIC_URL", "secure.example.org"),
        ("ESCROW_QUICK_EXIT_URL", "javascript:alert(1)"),
        ("ESCROW_NOTIFY_FROM", "no-reply"),
        ("ESCROW_MAX_MESSAGE_MB", "0"),
        ("ESCROW_MESSAGE_TTL_DAYS", "ninety"),
        ("ESCROW_OUTBOX_GIVE_UP_DAYS", "soon"),
        ("ESCROW_SESSION_IDLE_MINUTES", "0"),
        ("ESCROW_CONSENT_TEXT_FILE", "/nonexistent/consent.txt"),
    ],
)
def test_bad_value_names_the_variable(tmp_path: Path, name: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load(tmp_path, {name: value})
    assert name in str(caught.value)


def test_retention_equal_to_ttl_is_allowed_and_shorter_is_not(tmp_path: Path) -> None:
    s = load(tmp_path, {"ESCROW_MESSAGE_TTL_DAYS": "30", "ESCROW_VAULT_RETENTION_DAYS": "30"})
    assert (s.message_ttl_days, s.vault_retention_days) == (30, 30)
    with pytest.raises(SettingsError, match="ESCROW_MESSAGE_TTL_DAYS"):
        load(tmp_path, {"ESCROW_MESSAGE_TTL_DAYS": "31", "ESCROW_VAULT_RETENTION_DAYS": "30"})


def test_tls_certificate_needs_its_key(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not checked here", encoding="utf-8")
    with pytest.raises(SettingsError, match="ESCROW_TLS_KEY"):
        load(tmp_path, {"ESCROW_TLS_CERT": str(cert)})
    with pytest.raises(SettingsError, match="ESCROW_TLS_KEY"):
        load(tmp_path, {"ESCROW_TLS_CERT": str(cert), "ESCROW_TLS_KEY": str(tmp_path / "none")})


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:////srv/escrow/escrow.db", "sqlite+aiosqlite:////srv/escrow/escrow.db"),
        ("sqlite+aiosqlite:////srv/e.db", "sqlite+aiosqlite:////srv/e.db"),
        ("postgres://escrow@db/escrow", "postgresql+asyncpg://escrow@db/escrow"),
        ("postgresql://escrow@db/escrow", "postgresql+asyncpg://escrow@db/escrow"),
        ("postgresql+asyncpg://escrow@db/escrow", "postgresql+asyncpg://escrow@db/escrow"),
    ],
)
def test_database_urls_are_normalised_to_async_drivers(
    tmp_path: Path, given: str, expected: str
) -> None:
    assert load(tmp_path, {"ESCROW_DATABASE_URL": given}).database_url == expected


def test_postgresql_or_https_means_production(tmp_path: Path) -> None:
    assert load(tmp_path, {"ESCROW_DATABASE_URL": "postgresql://db/escrow"}).is_production
    https = load(tmp_path, {"ESCROW_PUBLIC_URL": "https://secure.example.org/"})
    assert https.is_production
    assert https.secure_cookies
    assert https.public_url == "https://secure.example.org"


def test_good_values_are_parsed(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        {
            "ESCROW_SMARTHOST": "[2001:db8::25]:2525",
            "ESCROW_SMARTHOST_TLS": "TLS",
            "ESCROW_TRUSTED_NETWORKS": "192.0.2.0/24, 2001:db8::/32,10.1.2.3",
            "ESCROW_SMTPS_PORT": "465",
            "ESCROW_STAFF_REQUIRE_TOTP": "no",
            "ESCROW_READ_RECEIPTS": "On",
            "ESCROW_OUTBOX_GIVE_UP_DAYS": "0.5",
            "ESCROW_LOG_LEVEL": "debug",
            "ESCROW_REPLY_MODE": "notify",
        },
    )
    assert s.smarthost == ("2001:db8::25", 2525)
    assert s.smarthost_tls == "tls"
    assert s.trusted_networks == (
        ipaddress.ip_network("192.0.2.0/24"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("10.1.2.3/32"),
    )
    assert s.smtps_port == 465
    assert s.staff_require_totp is False
    assert s.read_receipts is True
    assert s.outbox_give_up_days == 0.5
    assert s.log_level == "DEBUG"
    assert s.reply_mode == "notify"


def test_blank_environment_value_counts_as_unset(tmp_path: Path) -> None:
    assert load(tmp_path, {"ESCROW_WEB_PORT": "  "}).web_port == 8080
