"""deploy/compose.yaml and deploy/.env.example, read as Docker Compose reads them.

There is no Docker engine (nor the compose plugin) on the test machines, so the file
is parsed with PyYAML and checked against what the rest of the project expects: the
image's ports and directories (deploy/Dockerfile), the settings the server reads
(escrow/settings.py), the secrets files deploy/secrets/README.md tells IT to create.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from escrow.devcert import ensure_dev_certificate
from escrow.settings import load_settings, read_dotenv
from tests.deploy import dockerfile
from tests.deploy.process import ROOT

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
SETTINGS_SOURCE = ROOT / "escrow" / "settings.py"

SECRETS = {"master_passphrase", "db_password", "smarthost_password"}
SECRET_SETTINGS = {
    "ESCROW_MASTER_PASSPHRASE_FILE": "master_passphrase",
    "ESCROW_DATABASE_PASSWORD_FILE": "db_password",
    "ESCROW_SMARTHOST_PASSWORD_FILE": "smarthost_password",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def service(compose: Mapping[str, Any], name: str) -> dict[str, Any]:
    found = compose["services"][name]
    assert isinstance(found, dict)
    return found


def environment(svc: Mapping[str, Any]) -> dict[str, str]:
    """A service's ``environment``, in either of Compose's two spellings."""
    env = svc.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def mounts(svc: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """target -> (source, options) for every short-syntax volume of a service."""
    found = {}
    for entry in svc.get("volumes", []):
        source, target, *options = entry.split(":")
        found[target] = (source, ",".join(options))
    return found


def published(svc: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """host port (with /udp if so) -> (host address or "", container port)."""
    found = {}
    for entry in svc.get("ports", []):
        spec, _, protocol = str(entry).partition("/")
        parts = spec.split(":")
        address = parts[0] if len(parts) == 3 else ""
        host, container = parts[-2], parts[-1]
        found[host + (f"/{protocol}" if protocol else "")] = (address, container)
    return found


def env_example_names() -> set[str]:
    """Every setting named in .env.example, set or commented out (``# NAME=value``)."""
    pattern = re.compile(r"^#?\s*(ESCROW_[A-Z0-9_]+)=", re.MULTILINE)
    return set(pattern.findall(ENV_EXAMPLE.read_text(encoding="utf-8")))


class _Recording(dict[str, str]):
    """An environment that remembers every name the settings loader asked for."""

    def __init__(self, values: Mapping[str, str]) -> None:
        super().__init__(values)
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)


def settings_the_server_reads(tmp_path: Path) -> set[str]:
    """The ESCROW_* names: those :func:`load_settings` asks for, and every one its source names."""
    environ = _Recording({})
    load_settings(environ, dotenv_path=tmp_path / "none.env")
    named = set(re.findall(r"\b(ESCROW_[A-Z0-9_]*[A-Z0-9])\b", SETTINGS_SOURCE.read_text()))
    found = {name for name in environ.asked | named if name.startswith("ESCROW_")}
    # Secrets are read as NAME and NAME_FILE: the loader asks for both.
    assert "ESCROW_MASTER_PASSPHRASE_FILE" in found
    return found


# ---------------------------------------------------------------- services


def test_the_services_are_escrow_postgres_and_an_optional_caddy(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"escrow", "postgres", "caddy"}
    assert service(compose, "caddy").get("profiles") == ["https"]
    for name in ("escrow", "postgres"):
        assert "profiles" not in service(compose, name), f"{name} must start by default"
        assert service(compose, name)["restart"] in {"unless-stopped", "always"}


def test_escrow_is_built_from_the_dockerfile_and_waits_for_a_healthy_postgres(
    compose: dict[str, Any],
) -> None:
    escrow = service(compose, "escrow")
    build = escrow["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == dockerfile.DOCKERFILE
    assert escrow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert escrow["env_file"] == ".env"
    # Its healthcheck is the image's HEALTHCHECK on /healthz: not switched off here.
    assert "healthcheck" not in escrow
    assert any("/healthz" in part for part in dockerfile.healthcheck_command())


def test_postgres_has_a_healthcheck_a_named_volume_and_its_password_as_a_secret(
    compose: dict[str, Any],
) -> None:
    postgres = service(compose, "postgres")
    assert str(postgres["image"]).startswith("postgres:")
    check = postgres["healthcheck"]
    assert check["test"][0] in {"CMD", "CMD-SHELL"}
    assert "pg_isready" in " ".join(check["test"][1:])
    for field in ("interval", "timeout", "retries"):
        assert field in check
    source, _ = mounts(postgres)["/var/lib/postgresql/data"]
    assert source in compose["volumes"], "PostgreSQL's data must be on a named volume"
    env = environment(postgres)
    assert env["POSTGRES_PASSWORD_FILE"] == "/run/secrets/db_password"
    assert "POSTGRES_PASSWORD" not in env
    assert postgres["secrets"] == ["db_password"]
    assert "ports" not in postgres, "the database must not be published on the host"


def test_the_database_url_names_the_postgres_service_user_and_database(
    compose: dict[str, Any],
) -> None:
    env = environment(service(compose, "escrow"))
    pg = environment(service(compose, "postgres"))
    url = env["ESCROW_DATABASE_URL"]
    assert url == f"postgresql+asyncpg://{pg['POSTGRES_USER']}@postgres:5432/{pg['POSTGRES_DB']}"
    assert ":" not in url.split("://", 1)[1].split("@", 1)[0], "no password in the URL"


def test_secrets_are_files_handed_to_the_server_through_the_file_settings(
    compose: dict[str, Any],
) -> None:
    assert set(compose["secrets"]) == SECRETS
    for name, spec in compose["secrets"].items():
        assert spec == {"file": f"./secrets/{name}"}
    escrow = service(compose, "escrow")
    assert set(escrow["secrets"]) == SECRETS
    env = environment(escrow)
    example = read_dotenv(ENV_EXAMPLE)
    for setting, secret in SECRET_SETTINGS.items():
        value = env.get(setting, example.get(setting))
        assert value == f"/run/secrets/{secret}", setting
    # Never the secret values themselves.
    for secret_setting in ("ESCROW_MASTER_PASSPHRASE", "ESCROW_DATABASE_PASSWORD"):
        assert secret_setting not in env
        assert secret_setting not in example
    # The secrets README tells IT to create each file.
    readme = (DEPLOY / "secrets" / "README.md").read_text(encoding="utf-8")
    for secret in SECRETS:
        assert f"deploy/secrets/{secret}" in readme


def test_keys_and_data_are_named_volumes_at_the_images_directories(
    compose: dict[str, Any],
) -> None:
    escrow = service(compose, "escrow")
    image = dockerfile.env()
    volume_mounts = mounts(escrow)
    keys_source, _ = volume_mounts[image["ESCROW_KEYS_DIR"]]
    data_source, _ = volume_mounts[image["ESCROW_DATA_DIR"]]
    assert keys_source != data_source, "keys are backed up apart from everything else"
    for source in (keys_source, data_source):
        assert source in compose["volumes"]
    # Every named volume any service uses is declared, and none is declared unused.
    used = {
        source
        for svc in compose["services"].values()
        for source, _ in mounts(svc).values()
        if not source.startswith((".", "/"))
    }
    assert used == set(compose["volumes"])


def test_the_certificate_directory_is_mounted_read_only_where_env_example_points(
    compose: dict[str, Any],
) -> None:
    source, options = mounts(service(compose, "escrow"))["/run/tls"]
    assert source == "./tls"
    assert options == "ro"
    example = read_dotenv(ENV_EXAMPLE)
    readme = (DEPLOY / "tls" / "README.md").read_text(encoding="utf-8")
    for setting in ("ESCROW_TLS_CERT", "ESCROW_TLS_KEY"):
        path = Path(example[setting])
        assert path.parent == Path("/run/tls"), setting
        assert f"deploy/tls/{path.name}" in readme


def test_smtp_587_and_465_are_published_and_the_portal_on_the_host_only(
    compose: dict[str, Any],
) -> None:
    image = dockerfile.env()
    ports = published(service(compose, "escrow"))
    assert ports["587"] == ("", image["ESCROW_SMTP_PORT"])
    assert ports["465"] == ("", image["ESCROW_SMTPS_PORT"])
    web = [host for host, (_, inside) in ports.items() if inside == image["ESCROW_WEB_PORT"]]
    assert len(web) == 1
    # The portal (and /metrics) reach the internet only through the reverse proxy.
    assert ports[web[0]][0] == "127.0.0.1"
    # Inside the container every port is unprivileged: the server does not run as root.
    for _, inside in ports.values():
        assert int(inside) > 1024


def test_the_optional_caddy_serves_https_and_is_the_only_trusted_proxy(
    compose: dict[str, Any],
) -> None:
    caddy = service(compose, "caddy")
    assert set(published(caddy)) >= {"80", "443"}
    assert mounts(caddy)["/etc/caddy/Caddyfile"] == ("./Caddyfile", "ro")
    assert environment(caddy)["ESCROW_PUBLIC_URL"].startswith("${ESCROW_PUBLIC_URL")
    for source, _ in mounts(caddy).values():
        assert source == "./Caddyfile" or source in compose["volumes"]

    # ESCROW_TRUSTED_PROXIES is Caddy's fixed address, inside the network's subnet and
    # outside the range handed to containers without a fixed address.
    trusted = environment(service(compose, "escrow"))["ESCROW_TRUSTED_PROXIES"]
    caddy_address = ipaddress.ip_address(caddy["networks"]["default"]["ipv4_address"])
    assert trusted == str(caddy_address)
    (pool,) = compose["networks"]["default"]["ipam"]["config"]
    subnet = ipaddress.ip_network(pool["subnet"])
    dynamic = ipaddress.ip_network(pool["ip_range"])
    fixed = [
        ipaddress.ip_address(svc["networks"]["default"]["ipv4_address"])
        for svc in compose["services"].values()
    ]
    assert len(set(fixed)) == len(fixed)
    for address in fixed:
        assert address in subnet
        assert address not in dynamic


def interpolated(compose_text: str) -> Iterator[str]:
    for match in re.finditer(r"\$\{([A-Z0-9_]+)", compose_text):
        yield match.group(1)


def test_every_variable_compose_interpolates_is_in_env_example() -> None:
    names = set(interpolated(COMPOSE.read_text(encoding="utf-8")))
    assert names, "compose.yaml reads ESCROW_PUBLIC_URL from deploy/.env for Caddy"
    assert names <= set(read_dotenv(ENV_EXAMPLE))


# ---------------------------------------------------------------- .env.example


def test_every_setting_of_the_server_is_in_env_example(tmp_path: Path) -> None:
    missing = settings_the_server_reads(tmp_path) - env_example_names()
    assert not missing, f"add these to deploy/.env.example (commented): {sorted(missing)}"


def test_env_example_names_no_setting_the_server_does_not_read(tmp_path: Path) -> None:
    unknown = env_example_names() - settings_the_server_reads(tmp_path)
    assert not unknown, f"deploy/.env.example names settings nobody reads: {sorted(unknown)}"


def test_every_setting_in_env_example_has_a_comment() -> None:
    """Each setting sits under a comment that explains it (or its group of settings)."""
    setting = re.compile(r"^#?\s*ESCROW_[A-Z0-9_]+=")
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if not setting.match(line):
            continue
        above = number - 1
        while above >= 0 and setting.match(lines[above]):
            above -= 1
        assert above >= 0 and lines[above].startswith("# "), (
            f".env.example line {number + 1} ({line.split('=')[0]}) has no comment above it"
        )


def test_env_example_with_compose_and_the_image_makes_a_valid_production_config(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """What the container would load: image ENV, then compose's environment, then .env.

    Container paths (/run/secrets, /run/tls, /var/lib) are mapped to temporary files.
    """
    run_secrets = tmp_path / "run-secrets"
    run_secrets.mkdir()
    for name in SECRETS:
        (run_secrets / name).write_text(f"example {name}\n")
    cert, key = ensure_dev_certificate(tmp_path / "run-tls", "secure.example.org")

    def local(value: str) -> str:
        value = value.replace("/run/secrets/", f"{run_secrets}/")
        value = value.replace("/run/tls/fullchain.pem", str(cert))
        value = value.replace("/run/tls/privkey.pem", str(key))
        return value.replace("/var/lib/", f"{tmp_path}/var-lib/")

    merged = {**dockerfile.env(), **read_dotenv(ENV_EXAMPLE)}
    merged.update(environment(service(compose, "escrow")))
    environ = {name: local(value) for name, value in merged.items() if name.startswith("ESCROW_")}
    settings = load_settings(environ, dotenv_path=tmp_path / "none.env")
    assert settings.is_production
    assert settings.public_url.startswith("https://")
    assert settings.database_url.startswith("postgresql+asyncpg://escrow:")  # password added
    assert settings.master_passphrase is not None
    assert settings.smarthost is not None
    assert settings.smarthost_password is not None
    assert settings.log_format == "json"
    assert settings.trusted_proxies == (
        environment(service(compose, "escrow"))["ESCROW_TRUSTED_PROXIES"],
    )
    # Caddy serves ESCROW_PUBLIC_URL as its site: scheme and host, no path.
    assert re.fullmatch(r"https://[a-z0-9.-]+", settings.public_url)
