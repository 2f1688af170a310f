"""Fixtures for the vault keyring.

Making and unlocking a key runs PGPy's S2K (about a quarter of a second), so
one key directory is made per session and copied for tests that change it,
and one unlocked keyring is shared by the tests that only read.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from keys import VaultKeyring
from tests.keys.gnupg import GnuPG

PASSPHRASE = "correct horse battery staple, for tests only"


@pytest.fixture(scope="session")
def template_keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keys_dir = tmp_path_factory.mktemp("template") / "keys"
    assert VaultKeyring.initialise(keys_dir, PASSPHRASE) is not None
    return keys_dir


@pytest.fixture
def keys_dir(template_keys_dir: Path, tmp_path: Path) -> Path:
    """A private copy of an initialised keys directory, free to change."""
    copy = tmp_path / "keys"
    shutil.copytree(template_keys_dir, copy)
    return copy


@pytest.fixture(scope="session")
def shared_ring(template_keys_dir: Path) -> Iterator[VaultKeyring]:
    """An unlocked keyring shared across tests: never rotate or close it."""
    ring = VaultKeyring.open(template_keys_dir, PASSPHRASE)
    yield ring
    ring.close()


@pytest.fixture
def gpg(tmp_path: Path) -> Iterator[GnuPG]:
    home = GnuPG(tmp_path / "gnupg")
    yield home
    home.stop()
