from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from keys import KeyFileCorrupt, KeysError, store

FPR = "0123456789ABCDEF0123456789ABCDEF01234567"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Run with umask 000, so only an explicit mode can keep files private."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("open_umask")
def test_modes_are_exact_whatever_the_umask(tmp_path: Path) -> None:
    keys_dir = tmp_path / "a" / "keys"
    store.ensure_dir(keys_dir)
    store.write_key(keys_dir, FPR, "armored")
    store.write_active(keys_dir, FPR)

    assert mode(keys_dir) == 0o700
    assert mode(store.key_path(keys_dir, FPR)) == 0o600
    assert mode(keys_dir / "ACTIVE") == 0o600


def test_atomic_write_replaces_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    store.atomic_write(target, b"one")
    store.atomic_write(target, b"two")

    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_ensure_dir_refuses_a_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("not a directory")
    with pytest.raises(KeysError):
        store.ensure_dir(path)


def test_list_fingerprints_ignores_other_files(tmp_path: Path) -> None:
    store.write_key(tmp_path, FPR, "armored")
    (tmp_path / f".{FPR}.asc.1234.tmp").write_text("half written")
    (tmp_path / f"{FPR.lower()}.asc").write_text("wrong case")
    (tmp_path / "notes.asc").write_text("not a key")
    store.write_active(tmp_path, FPR)

    assert store.list_fingerprints(tmp_path) == [FPR]
    assert store.list_fingerprints(tmp_path / "missing") == []


def test_read_active(tmp_path: Path) -> None:
    assert store.read_active(tmp_path) is None
    store.write_active(tmp_path, FPR)
    assert store.read_active(tmp_path) == FPR
    assert (tmp_path / "ACTIVE").read_text() == FPR + "\n"


@pytest.mark.parametrize("content", [b"", b"not a fingerprint\n", FPR.lower().encode(), b"\xff"])
def test_malformed_active_is_corrupt(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "ACTIVE").write_bytes(content)
    with pytest.raises(KeyFileCorrupt):
        store.read_active(tmp_path)
