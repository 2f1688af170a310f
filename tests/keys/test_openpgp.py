from __future__ import annotations

import random
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from keys import DecryptionFailed, VaultKeyring

MARKER = b"PLAINTEXT-MARKER-"


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(payload(10 * 1024), id="10KB random"),
        pytest.param(b"Subject: hello\r\n\r\nplain ASCII, looks like text\n", id="ASCII"),
        pytest.param(b"", id="empty"),
    ],
)
def test_round_trip(shared_ring: VaultKeyring, data: bytes) -> None:
    sealed, fingerprint = shared_ring.encrypt(data)

    assert fingerprint == shared_ring.active_fingerprint
    assert data == b"" or data not in sealed
    opened = shared_ring.decrypt(sealed)
    assert type(opened) is bytes
    assert opened == data


def test_round_trip_20mb(shared_ring: VaultKeyring) -> None:
    data = payload(20 * 1024 * 1024)
    sealed, _ = shared_ring.encrypt(data)
    opened = shared_ring.decrypt(sealed)
    assert type(opened) is bytes
    assert opened == data


def test_ciphertext_is_binary_openpgp(shared_ring: VaultKeyring) -> None:
    sealed, _ = shared_ring.encrypt(b"x" * 100)
    assert sealed[0] & 0x80  # a packet tag, not armor
    assert b"BEGIN PGP" not in sealed
    # Each message has its own session key.
    assert shared_ring.encrypt(b"x" * 100)[0] != sealed


def flip(position: Callable[[bytes], int]) -> Callable[[bytes], bytes]:
    def tamper(sealed: bytes) -> bytes:
        changed = bytearray(sealed)
        changed[position(sealed)] ^= 0x01
        return bytes(changed)

    return tamper


TAMPERING: dict[str, Callable[[bytes], bytes]] = {
    "flip in wrapped session key": flip(lambda s: 40),
    "flip in the middle": flip(lambda s: len(s) // 2),
    "flip the last byte": flip(lambda s: len(s) - 1),
    "flip in the encrypted prefix": flip(lambda s: 110),
    "truncate the end": lambda s: s[:-1],
    "truncate to half": lambda s: s[: len(s) // 2],
    "truncate to the first packet": lambda s: s[: 2 + s[1]],
    "append garbage": lambda s: s + b"\x00garbage",
    "duplicate": lambda s: s + s,
}


@pytest.mark.parametrize("tamper", TAMPERING.values(), ids=TAMPERING.keys())
def test_tampering_is_detected(shared_ring: VaultKeyring, tamper: Callable[[bytes], bytes]) -> None:
    data = MARKER + payload(1000)
    sealed, _ = shared_ring.encrypt(data)

    with pytest.raises(DecryptionFailed) as caught:
        shared_ring.decrypt(tamper(sealed))

    assert MARKER not in "".join(traceback.format_exception(caught.value)).encode()


def test_every_single_byte_change_fails_or_yields_the_original(
    shared_ring: VaultKeyring,
) -> None:
    # Changes to unauthenticated framing (the recipient key id, a header bit)
    # may still open; what must never happen is altered plaintext, another
    # exception, or any change to the encrypted data going unnoticed.
    data = payload(64, seed=1)
    sealed, _ = shared_ring.encrypt(data)
    encrypted_data_starts = 2 + sealed[1] + 2  # after the PKESK and the SEIPD header
    opened = []
    for index in range(len(sealed)):
        for mask in (0x01, 0x80):
            changed = bytearray(sealed)
            changed[index] ^= mask
            try:
                assert shared_ring.decrypt(bytes(changed)) == data
            except DecryptionFailed:
                continue
            opened.append(index)
    assert all(index < encrypted_data_starts for index in opened)


GARBAGE = {
    "empty": b"",
    "ASCII": b"hello, this is not OpenPGP",
    "armor": b"-----BEGIN PGP MESSAGE-----\n\n-----END PGP MESSAGE-----\n",
    "random": payload(4096, seed=2),
    "random with a packet tag": b"\xc1" + payload(4096, seed=3),
    "huge claimed length": b"\xc1\xff\xff\xff\xff\xff" + payload(64, seed=4),
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_is_refused(shared_ring: VaultKeyring, garbage: bytes) -> None:
    with pytest.raises(DecryptionFailed):
        shared_ring.decrypt(garbage)


def test_message_without_integrity_protection_is_refused(shared_ring: VaultKeyring) -> None:
    sealed, _ = shared_ring.encrypt(b"data")
    assert sealed[0] == 0xC1 and sealed[1] < 192  # PKESK, one-octet length
    recipient = sealed[: 2 + sealed[1]]
    # A Symmetrically Encrypted Data packet (tag 9) has no MDC.
    unprotected = recipient + bytes([0xC9, 40]) + payload(40, seed=5)

    with pytest.raises(DecryptionFailed, match="integrity"):
        shared_ring.decrypt(unprotected)


def test_concurrent_decryption_from_eight_threads(shared_ring: VaultKeyring) -> None:
    originals = [payload(2048 + n, seed=n) for n in range(16)]
    sealed = [shared_ring.encrypt(data)[0] for data in originals]
    start = threading.Barrier(8)

    def work(worker: int) -> list[bool]:
        start.wait(timeout=30)
        results = []
        for round_ in range(8):
            index = (worker + round_) % len(sealed)
            results.append(shared_ring.decrypt(sealed[index]) == originals[index])
            # Encrypting alongside must not disturb anyone's decryption.
            fresh, _ = shared_ring.encrypt(originals[index])
            results.append(shared_ring.decrypt(fresh) == originals[index])
        return results

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = [ok for batch in pool.map(work, range(8)) for ok in batch]

    assert len(outcomes) == 8 * 8 * 2
    assert all(outcomes)


def test_pgpy_cipher_table_is_built_once() -> None:
    """keys.openpgp memoises PGPy's per-access cipher table (a namedtuple class each time)."""
    import warnings

    from cryptography.hazmat.primitives.ciphers import algorithms

    from keys import openpgp

    SymmetricKeyAlgorithm = openpgp.SymmetricKeyAlgorithm
    twofish = SymmetricKeyAlgorithm.Twofish256
    assert twofish.cipher is twofish.cipher  # PGPy itself returns a new object every time
    assert twofish.block_size == 128
    assert SymmetricKeyAlgorithm.AES256.cipher is algorithms.AES
    assert SymmetricKeyAlgorithm.AES256.block_size == 128
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cryptography's TripleDES deprecation no longer fires
        assert SymmetricKeyAlgorithm.TripleDES.block_size == 64
    with pytest.raises(NotImplementedError):
        SymmetricKeyAlgorithm.Plaintext.cipher  # noqa: B018 (PGPy's own refusal)


def test_sealing_makes_the_packets_pgpy_would(template_keys_dir: Path) -> None:
    """keys.openpgp builds PGPKey.encrypt's packets itself: same layout, same recipient."""
    import pgpy
    from pgpy.constants import CompressionAlgorithm, SymmetricKeyAlgorithm

    from keys.openpgp import VaultKey

    (path,) = template_keys_dir.glob("*.asc")
    key = VaultKey(path.read_text(), path.stem)
    data = payload(10 * 1024, seed=3)
    ours = pgpy.PGPMessage.from_blob(key.encrypt(data))
    public, _ = pgpy.PGPKey.from_blob(key.export_public())
    (subkey,) = public.subkeys.values()
    literal = pgpy.PGPMessage.new(
        data, file=False, format="b", compression=CompressionAlgorithm.Uncompressed
    )
    theirs = subkey.encrypt(literal, cipher=SymmetricKeyAlgorithm.AES256)

    assert ours.is_encrypted and ours.encrypters == theirs.encrypters == {subkey.fingerprint.keyid}
    # Equal length and equal packet headers: only the random session key and IV differ.
    assert len(bytes(ours)) == len(bytes(theirs))
    packets = [*ours._sessionkeys, ours._message]
    expected = [*theirs._sessionkeys, theirs._message]
    assert [type(p) for p in packets] == [type(p) for p in expected]
    assert [bytes(p)[:4] for p in packets] == [bytes(p)[:4] for p in expected]
