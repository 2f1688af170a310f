from __future__ import annotations

import base64
import re
import shutil
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from keys import (
    DEFAULT_USER_ID,
    DecryptionFailed,
    KeyFileCorrupt,
    KeyInfo,
    KeysError,
    KeysMissing,
    UnknownKey,
    VaultKeyring,
    WrongPassphrase,
    openpgp,
)
from tests.keys.conftest import PASSPHRASE


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def active_of(keys_dir: Path) -> str:
    return (keys_dir / "ACTIVE").read_text().strip()


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


# initialise and describe


def test_initialise_creates_one_private_key_once(tmp_path: Path) -> None:
    keys_dir = tmp_path / "data" / "keys"

    fingerprint = VaultKeyring.initialise(keys_dir, PASSPHRASE)

    assert fingerprint is not None
    assert re.fullmatch(r"[0-9A-F]{40}", fingerprint)
    assert {p.name for p in keys_dir.iterdir()} == {"ACTIVE", f"{fingerprint}.asc"}
    assert active_of(keys_dir) == fingerprint
    assert mode(keys_dir) == 0o700
    assert mode(keys_dir / f"{fingerprint}.asc") == 0o600
    assert mode(keys_dir / "ACTIVE") == 0o600
    key_text = (keys_dir / f"{fingerprint}.asc").read_text()
    assert key_text.startswith("-----BEGIN PGP PRIVATE KEY BLOCK-----")
    assert PASSPHRASE not in key_text

    before = snapshot(keys_dir)
    assert VaultKeyring.initialise(keys_dir, PASSPHRASE) is None
    assert VaultKeyring.initialise(keys_dir, "another passphrase") is None
    assert snapshot(keys_dir) == before


def test_initialise_finishes_an_interrupted_first_run(keys_dir: Path) -> None:
    fingerprint = active_of(keys_dir)
    (keys_dir / "ACTIVE").unlink()

    assert VaultKeyring.initialise(keys_dir, PASSPHRASE) is None
    assert active_of(keys_dir) == fingerprint


def test_initialise_refuses_an_empty_passphrase(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        VaultKeyring.initialise(tmp_path / "keys", "")
    assert not (tmp_path / "keys").exists()


def test_describe_needs_no_passphrase(keys_dir: Path) -> None:
    (info,) = VaultKeyring.describe(keys_dir)

    assert info == KeyInfo(
        fingerprint=active_of(keys_dir),
        created=info.created,
        algorithm="ed25519/cv25519",
        active=True,
    )
    assert info.created.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - info.created) < timedelta(minutes=10)


# open and its failures


def test_open_unlocks_and_lists(keys_dir: Path) -> None:
    with VaultKeyring.open(keys_dir, PASSPHRASE) as ring:
        assert ring.active_fingerprint == active_of(keys_dir)
        assert ring.list() == VaultKeyring.describe(keys_dir)
        assert PASSPHRASE not in repr(ring)


def test_wrong_passphrase(keys_dir: Path) -> None:
    with pytest.raises(WrongPassphrase) as caught:
        VaultKeyring.open(keys_dir, "not the passphrase")
    assert "not the passphrase" not in str(caught.value)
    assert active_of(keys_dir) in str(caught.value)


@pytest.mark.parametrize("make", ["nothing", "empty dir", "stray files"])
def test_missing_keys(tmp_path: Path, make: str) -> None:
    keys_dir = tmp_path / "keys"
    if make != "nothing":
        keys_dir.mkdir()
    if make == "stray files":
        (keys_dir / "ACTIVE").write_text("0" * 40)
        (keys_dir / "README.asc").write_text("hello")

    with pytest.raises(KeysMissing, match="escrow init"):
        VaultKeyring.describe(keys_dir)
    with pytest.raises(KeysMissing):
        VaultKeyring.open(keys_dir, PASSPHRASE)


def _garbage(keys_dir: Path, key_file: Path) -> None:
    key_file.write_text("this is not a key\n")


def _truncated(keys_dir: Path, key_file: Path) -> None:
    text = key_file.read_text()
    key_file.write_text(text[: len(text) // 2])


def _bit_rot(keys_dir: Path, key_file: Path) -> None:
    # Change one base64 character in the middle of the body: only the armor
    # checksum can tell.
    lines = key_file.read_text().splitlines(keepends=True)
    middle = len(lines) // 2
    line = lines[middle]
    lines[middle] = ("B" if line[10] == "A" else "A").join([line[:10], line[11:]])
    key_file.write_text("".join(lines))


def _public_only(keys_dir: Path, key_file: Path) -> None:
    with VaultKeyring.open(keys_dir, PASSPHRASE) as ring:
        key_file.write_text(ring.export_public())


def _misnamed(keys_dir: Path, key_file: Path) -> None:
    other = "A" * 40
    key_file.rename(keys_dir / f"{other}.asc")
    (keys_dir / "ACTIVE").write_text(other)


def _active_unknown(keys_dir: Path, key_file: Path) -> None:
    (keys_dir / "ACTIVE").write_text("B" * 40)


def _active_missing(keys_dir: Path, key_file: Path) -> None:
    (keys_dir / "ACTIVE").unlink()


def _unreadable_key_file(keys_dir: Path, key_file: Path) -> None:
    key_file.unlink()
    key_file.mkdir()


@pytest.mark.parametrize(
    "damage",
    [
        _garbage,
        _truncated,
        _bit_rot,
        _public_only,
        _misnamed,
        _active_unknown,
        _active_missing,
        _unreadable_key_file,
    ],
)
def test_corrupt_key_files(keys_dir: Path, damage: Callable[[Path, Path], None]) -> None:
    damage(keys_dir, keys_dir / f"{active_of(keys_dir)}.asc")

    with pytest.raises(KeyFileCorrupt) as caught:
        VaultKeyring.describe(keys_dir)
    with pytest.raises(KeyFileCorrupt):
        VaultKeyring.open(keys_dir, PASSPHRASE)
    assert PASSPHRASE not in str(caught.value)


def test_older_key_with_another_passphrase_is_reported(keys_dir: Path, tmp_path: Path) -> None:
    stranger_dir = tmp_path / "stranger"
    stranger = VaultKeyring.initialise(stranger_dir, "some other passphrase")
    shutil.copy(stranger_dir / f"{stranger}.asc", keys_dir)

    with pytest.raises(KeyFileCorrupt, match=str(stranger)):
        VaultKeyring.open(keys_dir, PASSPHRASE)


# rotation


def test_rotation(keys_dir: Path, shared_ring: VaultKeyring) -> None:
    with VaultKeyring.open(keys_dir, PASSPHRASE) as ring:
        old = ring.active_fingerprint
        sealed_before, used_before = ring.encrypt(b"sealed before rotation")

        new = ring.rotate()

        assert used_before == old
        assert new != old
        assert ring.active_fingerprint == new
        assert active_of(keys_dir) == new
        assert mode(keys_dir / f"{new}.asc") == 0o600
        assert [(i.fingerprint, i.active) for i in ring.list()] == [(new, True), (old, False)]
        assert ring.decrypt(sealed_before) == b"sealed before rotation"
        sealed_after, used_after = ring.encrypt(b"sealed after rotation")
        assert used_after == new
        listed = ring.list()

    assert VaultKeyring.describe(keys_dir) == listed
    with VaultKeyring.open(keys_dir, PASSPHRASE) as reopened:
        assert reopened.active_fingerprint == new
        assert reopened.decrypt(sealed_before) == b"sealed before rotation"
        assert reopened.decrypt(sealed_after) == b"sealed after rotation"
    # The new item really is sealed to the new key: the old key alone cannot open it.
    assert shared_ring.active_fingerprint == old
    with pytest.raises(KeysError):
        shared_ring.decrypt(sealed_after)


def test_repeated_rotation_orders_newest_first(keys_dir: Path) -> None:
    with VaultKeyring.open(keys_dir, PASSPHRASE) as ring:
        first = ring.active_fingerprint
        second = ring.rotate()
        third = ring.rotate()
        assert ring.list()[0].fingerprint == third
        assert {i.fingerprint for i in ring.list()} == {first, second, third}
        assert VaultKeyring.describe(keys_dir) == ring.list()
        # The new key keeps the user id: it sits in clear in the armored body.
        assert DEFAULT_USER_ID.encode() in unarmor(ring.export_public())


def unarmor(armored: str) -> bytes:
    body = armored.split("\n\n", 1)[1].rsplit("\n=", 1)[0]
    return base64.b64decode("".join(body.split()))


# the rest of the lifecycle


def test_export_public(shared_ring: VaultKeyring) -> None:
    fingerprint = shared_ring.active_fingerprint
    armored = shared_ring.export_public()

    assert armored.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert "PRIVATE" not in armored
    spaced = " ".join(fingerprint[i : i + 4] for i in range(0, 40, 4)).lower()
    assert shared_ring.export_public(spaced) == armored
    with pytest.raises(UnknownKey):
        shared_ring.export_public("C" * 40)


def test_close(keys_dir: Path) -> None:
    ring = VaultKeyring.open(keys_dir, PASSPHRASE)
    sealed, _ = ring.encrypt(b"x")
    ring.close()
    ring.close()

    assert "closed" in repr(ring)
    for call in (
        lambda: ring.encrypt(b"x"),
        lambda: ring.decrypt(sealed),
        lambda: ring.list(),
        lambda: ring.active_fingerprint,
        lambda: ring.rotate(),
        lambda: ring.export_public(),
    ):
        with pytest.raises(KeysError, match="closed"):
            call()


def test_keys_made_by_another_process_are_picked_up_without_a_restart(
    keys_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (
        VaultKeyring.open(keys_dir, PASSPHRASE) as server,
        VaultKeyring.open(keys_dir, PASSPHRASE) as operator,
    ):
        old = server.active_fingerprint
        new = operator.rotate()  # `escrow keys rotate` while the server runs
        sealed, used = operator.encrypt(b"sealed by a replica that restarted first")
        assert used == new
        # Until its next check the server still seals to the old key, which is fine...
        assert server.encrypt(b"x")[1] == old
        # ...and it opens what was sealed to the new one: the key file is loaded on demand.
        assert server.decrypt(sealed) == b"sealed by a replica that restarted first"
        assert server.active_fingerprint == new
        assert [i.fingerprint for i in server.list()] == [new, old]

        # Sealing follows ACTIVE at the periodic check.
        newer = operator.rotate()
        server.refresh_seconds = 0
        assert server.encrypt(b"y")[1] == newer

        # Another thread loads the new key while this one is trying the old ones:
        # the message still opens.
        newest = operator.rotate()
        sealed, used = operator.encrypt(b"sealed to the newest key")
        assert used == newest
        real_decrypt = openpgp.decrypt

        def another_thread_refreshes_meanwhile(ciphertext: bytes, keys: object) -> bytes:
            monkeypatch.setattr(openpgp, "decrypt", real_decrypt)
            server.refresh()
            return real_decrypt(ciphertext, keys)  # type: ignore[arg-type]

        monkeypatch.setattr(openpgp, "decrypt", another_thread_refreshes_meanwhile)
        assert server.decrypt(sealed) == b"sealed to the newest key"

        # A damaged key file beside them is left out, and not parsed again until it changes.
        damaged = keys_dir / f"{'A' * 40}.asc"
        damaged.write_text("not a key")
        assert server.refresh() is False
        assert server.encrypt(b"z")[1] == newest
        with pytest.raises(DecryptionFailed):
            server.decrypt(b"\x84garbage")
        assert list(server._unusable) == ["A" * 40]
