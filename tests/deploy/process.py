"""Helpers for tests that run the real ``escrow`` command (and the container's entrypoint)
as a separate process, with an environment built from scratch like a container's."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
# The tests run on the project's venv interpreter; `escrow` is installed beside it.
VENV_BIN = Path(sys.executable).parent
STARTUP_SECONDS = 60.0
STOP_SECONDS = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_environ(home: Path, **settings: str) -> dict[str, str]:
    """A clean environment: the venv first on PATH, no ESCROW_* from the caller's shell."""
    env = {
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(home),
        "LANG": "C.UTF-8",
    }
    env.update(settings)
    return env


def run_escrow(
    args: Sequence[str], env: Mapping[str, str], cwd: Path, *, stdin: str = "", timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run one ``escrow`` command to completion (cwd matters: it reads ./.env)."""
    return subprocess.run(
        [str(VENV_BIN / "escrow"), *args],
        env=dict(env),
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class Server:
    """A server process whose output goes to files (a pipe nobody reads could fill up)."""

    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def wait_http(self, url: str, deadline_seconds: float = STARTUP_SECONDS) -> None:
        """Poll ``url`` until it answers 200; fail early if the process exits."""
        deadline = time.monotonic() + deadline_seconds
        delay = 0.02
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"server exited with {self.process.returncode}:\n{self.output()}"
                )
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(delay)
            delay = min(delay * 2, 0.25)
        raise AssertionError(f"{url} did not answer within {deadline_seconds}s:\n{self.output()}")

    def terminate(self, timeout: float = STOP_SECONDS) -> tuple[int, float]:
        """SIGTERM, then the exit code and how long the process took to exit."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"no exit within {timeout}s of SIGTERM:\n{self.output()}"
            ) from None
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start(command: Sequence[str], env: Mapping[str, str], cwd: Path, logs: Path) -> Server:
    logs.mkdir(parents=True, exist_ok=True)
    stdout, stderr = logs / "stdout.log", logs / "stderr.log"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            list(command), env=dict(env), cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL
        )
    return Server(process, stdout, stderr)
