"""Reading deploy/Dockerfile the way the tests need it: instructions with their
continuation lines joined, the ENV it sets, its HEALTHCHECK command."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from tests.deploy.process import ROOT

DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, ``\\`` continuations joined."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        found.append((keyword.upper(), rest.strip()))
    return found


def final_stage() -> list[tuple[str, str]]:
    """The instructions of the last stage (the image that runs)."""
    steps = instructions()
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def env() -> dict[str, str]:
    """Every ``ENV name=value`` of the final stage."""
    values: dict[str, str] = {}
    for keyword, rest in final_stage():
        if keyword == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                values[name] = value
    return values


def healthcheck_command() -> list[str]:
    """The exec-form command of the HEALTHCHECK instruction."""
    for keyword, rest in final_stage():
        if keyword == "HEALTHCHECK":
            _options, _, command = rest.partition("CMD ")
            parsed = json.loads(command)
            assert isinstance(parsed, list)
            return [str(part) for part in parsed]
    raise AssertionError("deploy/Dockerfile has no HEALTHCHECK")
