"""A throwaway GnuPG home for interoperability tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def in_ci() -> bool:
    """True when the suite runs in CI, where every real dependency must be present."""
    return os.environ.get("CI", "").lower() == "true"


def require_tool(name: str) -> str:
    """The path of executable `name`; skip without it locally, FAIL without it in CI."""
    path = shutil.which(name)
    if path is not None:
        return path
    if in_ci():
        pytest.fail(f"{name} is required in CI but is not installed")
    pytest.skip(f"{name} is not installed")


class GnuPG:
    """GnuPG run in batch mode against its own fresh home directory."""

    def __init__(self, home: Path) -> None:
        self.executable = require_tool("gpg")
        self.home = home
        home.mkdir(mode=0o700)
        self._env = {"GNUPGHOME": str(home), "PATH": os.environ.get("PATH", ""), "LC_ALL": "C"}

    def run(self, *args: str, passphrase: str | None = None) -> str:
        """Run gpg with `args` (the passphrase, if any, on stdin); return stdout, fail on error."""
        argv = [self.executable, "--batch", "--no-tty", "--quiet"]
        if passphrase is not None:
            argv += ["--pinentry-mode", "loopback", "--passphrase-fd", "0"]
        done = subprocess.run(
            [*argv, *args],
            input=(passphrase or "") + "\n",
            env=self._env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(f"gpg {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
        return done.stdout

    def fingerprints(self, *, secret: bool = False) -> list[str]:
        """Fingerprints of the primary keys (and subkeys) in this home."""
        listing = self.run("--with-colons", "--list-secret-keys" if secret else "--list-keys")
        return [line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:")]

    def stop(self) -> None:
        """Stop the agent this home started, if any."""
        gpgconf = shutil.which("gpgconf")
        if gpgconf is not None:
            subprocess.run(
                [gpgconf, "--kill", "all"],
                env=self._env,
                capture_output=True,
                timeout=30,
                check=False,
            )
