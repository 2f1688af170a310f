"""deploy/README.md (and the READMEs of deploy/secrets and deploy/tls) stay true.

IT people type these commands as written, so every ``escrow`` command in them must
parse with the real command line, every ``docker compose`` command must name a service
of compose.yaml, every file and setting must exist, and the backup commands must be the
ones tests/escrow/test_backup.py proves on a real database.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
import yaml

from escrow.cli import parser
from tests.deploy import dockerfile
from tests.deploy.process import ROOT
from tests.deploy.test_compose import env_example_names, settings_the_server_reads

DEPLOY = ROOT / "deploy"
GUIDE = DEPLOY / "README.md"
DOCS = [GUIDE, DEPLOY / "secrets" / "README.md", DEPLOY / "tls" / "README.md"]
COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
# Where a shell command ends and a redirection, pipe or comment begins.
SHELL_END = re.compile(r"\s(?:[<>|]|2>|#)\s?")


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def command_lines(path: Path) -> list[str]:
    """Every ``docker compose ...`` command in the file: in code blocks and inline code."""
    found = []
    for match in re.finditer(r"docker compose [^`\n]*", text(path)):
        line = match.group(0)
        found.append(SHELL_END.split(line, maxsplit=1)[0].strip())
    return found


# Options of `docker compose` subcommands that take a value.
VALUE_OPTIONS = {"--profile", "--since", "--entrypoint", "-u", "--user", "-e", "--env", "-w"}


def compose_parts(line: str) -> tuple[str, list[str]]:
    """``docker compose [--profile x] SUB [options] [SERVICE ...]`` -> (SUB, positionals)."""
    words = shlex.split(line)[2:]
    while words and words[0].startswith("-"):
        words = words[2:] if words[0] in VALUE_OPTIONS else words[1:]
    sub, rest = words[0], words[1:]
    positionals = []
    while rest:
        word = rest.pop(0)
        if word.startswith("-"):
            if word in VALUE_OPTIONS:
                rest.pop(0)
            continue
        positionals.append(word)
        if sub in {"exec", "run"}:
            positionals.extend(rest)  # the service's command and its arguments
            break
    return sub, positionals


def all_compose_commands() -> list[tuple[Path, str]]:
    return [(path, line) for path in DOCS for line in command_lines(path)]


def test_the_guide_has_compose_commands_to_check() -> None:
    assert len(command_lines(GUIDE)) > 20


@pytest.mark.parametrize(
    ("path", "line"), all_compose_commands(), ids=lambda v: v if isinstance(v, str) else v.name
)
def test_every_compose_command_names_a_real_service(path: Path, line: str) -> None:
    sub, positionals = compose_parts(line)
    assert sub in {"up", "ps", "logs", "exec", "run", "restart", "stop", "down", "build", "version"}
    if sub in {"exec", "run"}:
        assert positionals, line
    services = positionals[:1] if sub in {"exec", "run"} else positionals
    for name in services:
        assert name in COMPOSE["services"], f"{path.name}: {line}: no service {name!r}"


def escrow_commands() -> list[list[str]]:
    """The arguments of every `escrow` command run in the escrow container."""
    found = []
    for _, line in all_compose_commands():
        sub, positionals = compose_parts(line)
        if sub == "exec" and positionals[:2] == ["escrow", "escrow"]:
            found.append(positionals[2:])
    return found


def test_the_guide_runs_escrow_commands() -> None:
    run = {" ".join(args[:2]) for args in escrow_commands()}
    for expected in ("staff add", "keys rotate", "keys list", "audit verify", "db upgrade"):
        assert any(r.startswith(expected) for r in run), expected


@pytest.mark.parametrize("args", escrow_commands(), ids=" ".join)
def test_every_escrow_command_parses(args: list[str]) -> None:
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parsed = parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"`escrow {' '.join(args)}` does not parse: {errors.getvalue()}")
    assert parsed.services is not None or parsed.settings_only is not None


def test_backup_and_restore_commands_are_the_ones_the_backup_test_proves() -> None:
    guide = text(GUIDE)
    backup_test = text(ROOT / "tests" / "escrow" / "test_backup.py")
    keys_dir = dockerfile.env()["ESCROW_KEYS_DIR"]
    assert re.search(r"exec -T postgres pg_dump -U escrow -Fc escrow >", guide)
    assert '["pg_dump", "-Fc"' in backup_test
    restore = "pg_restore --clean --if-exists --no-owner"
    assert f"exec -T postgres {restore} -U escrow -d escrow <" in guide
    assert '"pg_restore", "--clean", "--if-exists", "--no-owner"' in backup_test
    assert f"exec -T escrow tar -C {keys_dir} -czf - . >" in guide
    assert f"--entrypoint tar escrow -C {keys_dir} -xzf - <" in guide
    assert '"tar", "-C"' in backup_test
    # The trial instance (SQLite): SQLite's online copy, as the test makes it.
    assert (
        """sqlite3.connect('var/escrow.db').execute(\\"VACUUM INTO 'backup/escrow.db'\\")"""
        in guide
    )
    assert """.execute(\\"VACUUM INTO '{copy}'\\")""" in backup_test
    assert "tar -C var/keys -czf backup/escrow-keys.tar.gz ." in guide
    # The user and database the commands name are compose.yaml's.
    pg = COMPOSE["services"]["postgres"]["environment"]
    assert pg["POSTGRES_USER"] == "escrow"
    assert pg["POSTGRES_DB"] == "escrow"


def test_every_setting_named_is_a_real_one(tmp_path: Path) -> None:
    real = settings_the_server_reads(tmp_path)
    for path in DOCS:
        for name in set(re.findall(r"\b(ESCROW_[A-Z0-9_]*[A-Z0-9])\b", text(path))):
            assert name in real, f"{path.name} names {name}, which the server does not read"
            assert name in env_example_names() or name in {"ESCROW_MASTER_PASSPHRASE"}


def test_every_secret_and_certificate_file_named_is_the_one_compose_uses() -> None:
    secret_files = {Path(s["file"]).name for s in COMPOSE["secrets"].values()}
    for path in DOCS:
        for name in re.findall(r"\bsecrets/([a-z_.]+[a-z])", text(path)):
            assert name in secret_files | {"README.md"}, f"{path.name}: secrets/{name}"
        for name in re.findall(r"\btls/([a-z_.]+[a-z])", text(path)):
            assert name in {"fullchain.pem", "privkey.pem", "README.md"}, f"{path.name}: tls/{name}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(path: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text(path), re.MULTILINE)}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_lead_somewhere(path: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", text(path)):
        if target.startswith(("http://", "https://")):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.name}: link to {target}"
        if anchor:
            assert anchor in headings(linked), f"{path.name}: no section #{anchor} in {linked.name}"


def test_sections_of_the_top_level_readme_it_refers_to_exist() -> None:
    top = headings(ROOT / "README.md")
    for quoted in re.findall(
        r'top-level README \("([^"]+)"\)|repository \("([^"]+)"\)', text(GUIDE)
    ):
        name = next(q for q in quoted if q)
        assert slug(name) in top, f"README.md has no section {name!r}"


def test_the_guide_covers_what_an_operator_needs() -> None:
    guide = text(GUIDE)
    sections = headings(GUIDE)
    for section in (
        "install",
        "configure",
        "dns-and-certificates",
        "point-the-mail-clients-at-it",
        "monitoring",
        "backup",
        "restore",
        "upgrade",
        "key-rotation",
        "what-the-practice-still-needs-outside-the-software",
    ):
        assert section in sections
    for term in (
        "docker compose up -d",
        "SPF",
        "DKIM",
        "DMARC",
        "Outlook",
        "Apple Mail",
        "Thunderbird",
        "relayhost = [",
        "587",
        "STARTTLS",
        "/healthz",
        "/readyz",
        "/metrics",
        "JSON",
        "Business Associate Agreement",
        "consent",
        "master passphrase",
        "openssl rand -base64 32 > secrets/master_passphrase",
    ):
        assert term in guide, term
    secrets_readme = text(DEPLOY / "secrets" / "README.md")
    assert "chmod 600" in secrets_readme
    assert "openssl rand -base64 32 > secrets/master_passphrase" in secrets_readme
