"""GnuPG interoperability: the escape hatch promised by the design."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from keys import DEFAULT_USER_ID, DecryptionFailed, KeyFileCorrupt, VaultKeyring
from tests.keys.conftest import PASSPHRASE
from tests.keys.gnupg import GnuPG, require_tool

PAYLOAD = random.Random(7).randbytes(10 * 1024)


# Each packet length form (one, two and five octets) and several encryption blocks.
@pytest.mark.parametrize("size", [0, 150, 5000, 10 * 1024, 3 * 1024 * 1024 + 7])
def test_gnupg_decrypts_what_we_encrypt(
    gpg: GnuPG, shared_ring: VaultKeyring, template_keys_dir: Path, tmp_path: Path, size: int
) -> None:
    fingerprint = shared_ring.active_fingerprint
    gpg.run("--import", str(template_keys_dir / f"{fingerprint}.asc"), passphrase=PASSPHRASE)
    assert fingerprint in gpg.fingerprints(secret=True)
    payload = random.Random(size).randbytes(size)
    sealed, used = shared_ring.encrypt(payload)
    assert used == fingerprint
    (tmp_path / "item.gpg").write_bytes(sealed)

    gpg.run(
        "--output", str(tmp_path / "item"), "--decrypt", str(tmp_path / "item.gpg"),
        passphrase=PASSPHRASE,
    )  # fmt: skip

    assert (tmp_path / "item").read_bytes() == payload
    assert shared_ring.decrypt(sealed) == payload


def _encrypt_with_gnupg(gpg: GnuPG, ring: VaultKeyring, tmp_path: Path, *options: str) -> bytes:
    (tmp_path / "public.asc").write_text(ring.export_public())
    gpg.run("--import", str(tmp_path / "public.asc"))
    (tmp_path / "plain").write_bytes(PAYLOAD)
    gpg.run(
        "--trust-model", "always", "--recipient", ring.active_fingerprint, *options,
        "--output", str(tmp_path / "sealed.gpg"), "--encrypt", str(tmp_path / "plain"),
    )  # fmt: skip
    return (tmp_path / "sealed.gpg").read_bytes()


def test_we_decrypt_what_gnupg_encrypts(
    gpg: GnuPG, shared_ring: VaultKeyring, tmp_path: Path
) -> None:
    sealed = _encrypt_with_gnupg(gpg, shared_ring, tmp_path)
    assert shared_ring.decrypt(sealed) == PAYLOAD


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(("--throw-keyids",), id="hidden recipient"),
        pytest.param(("--compress-algo", "zlib"), id="compressed"),
    ],
)
def test_we_decrypt_gnupg_variants(
    gpg: GnuPG, shared_ring: VaultKeyring, tmp_path: Path, options: tuple[str, ...]
) -> None:
    sealed = _encrypt_with_gnupg(gpg, shared_ring, tmp_path, *options)
    assert shared_ring.decrypt(sealed) == PAYLOAD


def test_gnupg_text_mode_comes_back_byte_exact(
    gpg: GnuPG, shared_ring: VaultKeyring, tmp_path: Path
) -> None:
    text = "Grüße\r\nline two\r\n".encode()
    (tmp_path / "public.asc").write_text(shared_ring.export_public())
    gpg.run("--import", str(tmp_path / "public.asc"))
    (tmp_path / "plain.txt").write_bytes(text)
    gpg.run(
        "--trust-model", "always", "--recipient", shared_ring.active_fingerprint, "--textmode",
        "--output", str(tmp_path / "sealed.gpg"), "--encrypt", str(tmp_path / "plain.txt"),
    )  # fmt: skip

    assert shared_ring.decrypt((tmp_path / "sealed.gpg").read_bytes()) == text


def test_passphrase_only_message_is_refused(
    gpg: GnuPG, shared_ring: VaultKeyring, tmp_path: Path
) -> None:
    (tmp_path / "plain").write_bytes(PAYLOAD)
    gpg.run(
        "--output", str(tmp_path / "sealed.gpg"), "--symmetric", str(tmp_path / "plain"),
        passphrase=PASSPHRASE,
    )  # fmt: skip

    with pytest.raises(DecryptionFailed):
        shared_ring.decrypt((tmp_path / "sealed.gpg").read_bytes())


def test_exported_public_key_imports_with_its_fingerprint(
    gpg: GnuPG, shared_ring: VaultKeyring, tmp_path: Path
) -> None:
    (tmp_path / "public.asc").write_text(shared_ring.export_public())
    gpg.run("--import", str(tmp_path / "public.asc"))

    listing = gpg.run("--with-colons", "--list-keys", shared_ring.active_fingerprint)
    fingerprints = gpg.fingerprints()
    assert fingerprints[0] == shared_ring.active_fingerprint
    assert len(fingerprints) == 2  # primary and encryption subkey
    assert f":{DEFAULT_USER_ID}:" in listing
    assert gpg.fingerprints(secret=True) == []


def test_require_tool_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = "escrow-no-such-tool"
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        require_tool(missing)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        require_tool(missing)


def test_key_without_passphrase_is_refused(gpg: GnuPG, tmp_path: Path) -> None:
    gpg.run(
        "--passphrase", "", "--quick-gen-key", "Loose key <loose@escrow.invalid>", "future-default"
    )
    (fingerprint, *_) = gpg.fingerprints(secret=True)
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir(mode=0o700)
    (keys_dir / f"{fingerprint}.asc").write_text(
        gpg.run("--armor", "--export-secret-keys", fingerprint, passphrase="")
    )
    (keys_dir / "ACTIVE").write_text(fingerprint)

    with pytest.raises(KeyFileCorrupt, match="not protected"):
        VaultKeyring.describe(keys_dir)
