"""What the browser tests share: Chromium, axe-core, screenshots, and a live site.

The site is real: our SMTP listener and outbox worker (``running_escrow``)
delivering to an aiosmtpd sink, and the web app under uvicorn on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from escrow.services import Services
from tests.conftest import require
from tests.smtp.conftest import Sink, eventually
from web.app import create_app

ROOT = Path(__file__).resolve().parents[2]
AXE = ROOT / "node_modules" / "axe-core" / "axe.min.js"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium runs as root here, on a closed network: no sandbox, nothing phoning home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--headless=new",
]


class _Uvicorn(uvicorn.Server):
    """uvicorn without signal handling of its own: the test owns the process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def require_browser() -> None:
    require(shutil.which("chromium") is not None, "chromium is not installed")
    require(AXE.is_file(), "axe-core is not installed (npm install)")


@pytest.fixture
def sink() -> Iterator[Sink]:
    running = Sink()
    running.start()
    try:
        yield running
    finally:
        running.stop()


@contextlib.asynccontextmanager
async def web_server(services: Services, port: int) -> AsyncIterator[None]:
    """The web app under uvicorn on 127.0.0.1:``port`` until the block ends."""
    config = uvicorn.Config(
        create_app(services),
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
    )
    server = _Uvicorn(config)
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started, timeout=20, what="uvicorn to start")
    try:
        yield
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)


async def axe_check(page: Any, base: str, name: str) -> None:
    """No serious or critical axe-core violations on this page (CSP left on)."""
    await page.add_script_tag(url=f"{base}/__test__/axe.min.js")
    result = await page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
        ".map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.map(n => n.target.join(' '))}))"
    )
    bad = [v for v in result if v["impact"] in ("serious", "critical")]
    assert bad == [], f"{name}: {bad}"


async def snapshot(page: Any, name: str) -> None:
    """Screenshots at phone and desktop sizes; nothing may scroll sideways at 320 px."""
    ARTIFACTS.mkdir(exist_ok=True)
    for width, height in ((375, 740), (1280, 800)):
        await page.set_viewport_size({"width": width, "height": height})
        await page.screenshot(path=str(ARTIFACTS / f"{name}-{width}x{height}.png"), full_page=True)
    await page.set_viewport_size({"width": 320, "height": 640})
    assert await page.evaluate("document.documentElement.scrollWidth") <= 320, name
    await page.set_viewport_size({"width": 1280, "height": 800})
