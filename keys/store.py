"""The keys directory on disk.

Layout: `<keys_dir>/<FINGERPRINT>.asc` holds one armored, passphrase-protected
secret key; `<keys_dir>/ACTIVE` holds the fingerprint new items are sealed to.
Every file is written atomically (temporary file, fsync, rename, fsync of the
directory), so a crash leaves either the old file or the new one, never a
torn one. Files are mode 0600 and the directory 0700.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path

from keys.errors import KeyFileCorrupt, KeysError

ACTIVE_NAME = "ACTIVE"
KEY_SUFFIX = ".asc"
DIR_MODE = 0o700
FILE_MODE = 0o600

_FINGERPRINT = re.compile(r"[0-9A-F]{40}")


def is_fingerprint(value: str) -> bool:
    """True if `value` is a 40-digit upper-case hex fingerprint."""
    return _FINGERPRINT.fullmatch(value) is not None


def ensure_dir(keys_dir: Path) -> None:
    """Create `keys_dir` (mode 0700, parents as needed) if it does not exist.

    Raises KeysError if the path exists but is not a directory.
    """
    if keys_dir.is_dir():
        return
    if keys_dir.exists():
        raise KeysError(f"keys directory {keys_dir} exists but is not a directory")
    keys_dir.mkdir(mode=DIR_MODE, parents=True)
    # mkdir's mode is filtered through the umask; state it exactly.
    keys_dir.chmod(DIR_MODE)
    _fsync_dir(keys_dir.parent)


def key_path(keys_dir: Path, fingerprint: str) -> Path:
    """Where the key with `fingerprint` lives."""
    return keys_dir / f"{fingerprint}{KEY_SUFFIX}"


def list_fingerprints(keys_dir: Path) -> list[str]:
    """Fingerprints of the key files in `keys_dir`, sorted; empty if there is no directory.

    Files that are not named `<FINGERPRINT>.asc` (such as leftover temporary
    files) are ignored.
    """
    if not keys_dir.is_dir():
        return []
    try:
        names = [entry.name for entry in keys_dir.iterdir()]
    except OSError as exc:
        raise KeysError(f"cannot list keys directory {keys_dir}: {exc.strerror}") from None
    found = [
        name.removesuffix(KEY_SUFFIX)
        for name in names
        if name.endswith(KEY_SUFFIX) and is_fingerprint(name.removesuffix(KEY_SUFFIX))
    ]
    return sorted(found)


def read_key_text(keys_dir: Path, fingerprint: str) -> str:
    """The armored text of one key file. Raises KeyFileCorrupt if it cannot be read."""
    path = key_path(keys_dir, fingerprint)
    try:
        return path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileCorrupt(f"cannot read key file {path}: {type(exc).__name__}") from None


def read_active(keys_dir: Path) -> str | None:
    """The fingerprint named in ACTIVE, or None if there is no ACTIVE file.

    Raises KeyFileCorrupt if ACTIVE is unreadable or does not hold a fingerprint.
    """
    path = keys_dir / ACTIVE_NAME
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileCorrupt(f"cannot read {path}: {type(exc).__name__}") from None
    fingerprint = text.strip()
    if not is_fingerprint(fingerprint):
        raise KeyFileCorrupt(f"{path} does not hold a key fingerprint")
    return fingerprint


def write_key(keys_dir: Path, fingerprint: str, armored: str) -> None:
    """Durably write one armored secret key file (mode 0600)."""
    atomic_write(key_path(keys_dir, fingerprint), armored.encode("ascii"))


def write_active(keys_dir: Path, fingerprint: str) -> None:
    """Durably point ACTIVE at `fingerprint` (mode 0600)."""
    atomic_write(keys_dir / ACTIVE_NAME, f"{fingerprint}\n".encode("ascii"))


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new content.

    The data is fsynced before the rename and the directory after it, so the
    new content has reached the disk when this returns. The file is mode 0600.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as fh:
            # The creation mode is filtered through the umask; state it exactly.
            os.fchmod(fh.fileno(), FILE_MODE)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
