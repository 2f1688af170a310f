"""Everything the project does with PGPy, in one place.

A vault key is an Ed25519 primary key (certify, sign) with one Curve25519
ECDH subkey (encrypt). PGPy 0.6.0 is pinned, so the few private attributes
used here (`PGPMessage._sessionkeys`, `PGPMessage._message`, `PGPKey._key`)
are stable; each use says why the public API does not suffice.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pgpy
from pgpy.constants import (
    CompressionAlgorithm,
    EllipticCurveOID,
    HashAlgorithm,
    KeyFlags,
    PubKeyAlgorithm,
    SymmetricKeyAlgorithm,
)
from pgpy.errors import PGPDecryptionError
from pgpy.packet.packets import (
    IntegrityProtectedSKEDataV1,
    LiteralData,
    PKESessionKey,
    PKESessionKeyV3,
)

from keys.errors import DecryptionFailed, KeyFileCorrupt, KeysError, WrongPassphrase

_CIPHER = SymmetricKeyAlgorithm.AES256
_S2K_HASH = HashAlgorithm.SHA256
_CURVE_NAMES = {EllipticCurveOID.Ed25519: "ed25519", EllipticCurveOID.Curve25519: "cv25519"}
# A message naming more recipients than this is not one of ours; bounding it
# bounds the key agreements a crafted message can make us attempt.
_MAX_RECIPIENTS = 16
# warnings.catch_warnings() swaps process-wide state; serialise our own uses.
_WARNINGS_LOCK = threading.Lock()


def _memoise_cipher_table() -> None:
    """Make PGPy's ``SymmetricKeyAlgorithm.cipher`` a table look-up.

    PGPy rebuilds that table, creating a namedtuple class and touching the
    deprecated TripleDES name, on every access: several times a message, and
    about a fifth of the time it takes to seal or open a 10 KB one. The table
    is constant, so it is built once here; algorithms PGPy does not map still
    raise NotImplementedError from PGPy's own code.
    """
    build = SymmetricKeyAlgorithm.cipher.fget
    table: dict[SymmetricKeyAlgorithm, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cryptography's TripleDES deprecation
        for algorithm in SymmetricKeyAlgorithm:
            with contextlib.suppress(NotImplementedError):
                table[algorithm] = build(algorithm)

    def cipher(self: SymmetricKeyAlgorithm) -> Any:
        found = table.get(self)
        return build(self) if found is None else found

    SymmetricKeyAlgorithm.cipher = property(cipher)


_memoise_cipher_table()


@dataclass(frozen=True)
class _Recipient:
    """What PGPy's ECDH encryption reads of a recipient's key packet.

    ``ECDHCipherText.encrypt`` uses only ``keymaterial`` and ``fingerprint``;
    PGPy recomputes a packet's fingerprint (a SHA-1 over the serialised key)
    on every access, so it is computed once, at load.
    """

    keymaterial: Any
    fingerprint: Any


def generate(passphrase: str, user_id: str) -> tuple[str, str]:
    """Make a new vault key protected by `passphrase` (AES-256, SHA-256 S2K).

    Returns (fingerprint, armored secret key). The unprotected key exists
    only in memory, inside this call.
    """
    key = pgpy.PGPKey.new(PubKeyAlgorithm.EdDSA, EllipticCurveOID.Ed25519)
    key.add_uid(
        pgpy.PGPUID.new(user_id),
        usage={KeyFlags.Certify, KeyFlags.Sign},
        hashes=[HashAlgorithm.SHA256],
        ciphers=[_CIPHER],
        compression=[CompressionAlgorithm.Uncompressed],
    )
    subkey = pgpy.PGPKey.new(PubKeyAlgorithm.ECDH, EllipticCurveOID.Curve25519)
    key.add_subkey(subkey, usage={KeyFlags.EncryptCommunications, KeyFlags.EncryptStorage})
    key.protect(passphrase, _CIPHER, _S2K_HASH)
    return str(key.fingerprint), str(key)


class VaultKey:
    """One vault key parsed from its armored, protected secret form.

    Encryption needs only the public half. Decryption needs the key unlocked
    (see `unlock`). Once unlocked, nothing here mutates the PGPy objects, so
    `encrypt` and `session_key` may run from many threads at once.
    """

    def __init__(self, armored: str, fingerprint: str) -> None:
        """Parse and check a key file's text. Raises KeyFileCorrupt.

        The key must be a passphrase-protected secret key whose fingerprint is
        `fingerprint` and that has exactly one ECDH encryption subkey.
        """
        label = f"key file {fingerprint}"
        try:
            self._parse(armored, fingerprint, label)
        except KeyFileCorrupt:
            raise
        except Exception as exc:
            raise KeyFileCorrupt(f"{label} is not a valid key ({type(exc).__name__})") from None

    def _parse(self, armored: str, fingerprint: str, label: str) -> None:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            # PGPy only warns about a bad armor checksum; for us it is corruption.
            warnings.filterwarnings("error", message="Incorrect crc24", category=UserWarning)
            key, _ = pgpy.PGPKey.from_blob(armored)
        if key.is_public:
            raise KeyFileCorrupt(f"{label} holds no secret key")
        if not key.is_protected:
            raise KeyFileCorrupt(f"{label} is not protected by a passphrase")
        if str(key.fingerprint) != fingerprint:
            raise KeyFileCorrupt(f"{label} holds key {key.fingerprint}")
        subkeys = [s for s in key.subkeys.values() if s.key_algorithm is PubKeyAlgorithm.ECDH]
        if len(subkeys) != 1:
            raise KeyFileCorrupt(f"{label} must have exactly one ECDH encryption subkey")
        self._secret: Any = key
        self._secret_subkey: Any = subkeys[0]
        # PGPy rebuilds `pubkey` on each access and links it back weakly: keep
        # one strong reference so the public subkey can find its user id.
        self._public: Any = key.pubkey
        self._public_subkey: Any = self._public.subkeys[subkeys[0].fingerprint.keyid]
        packet = self._public_subkey._key
        self._recipient = _Recipient(packet.keymaterial, packet.fingerprint)
        self._recipient_id = bytes.fromhex(self._public_subkey.fingerprint.keyid)
        self.fingerprint = fingerprint
        self.subkey_id: str = str(subkeys[0].fingerprint.keyid)
        self.created: datetime = key.created
        self.algorithm = f"{_algorithm_name(key)}/{_algorithm_name(subkeys[0])}"
        uids = [uid.userid for uid in key.userids if uid.userid]
        self.user_id: str | None = uids[0] if uids else None

    def unlock(self, passphrase: str, stack: contextlib.ExitStack[bool | None]) -> None:
        """Unlock the secret material until `stack` closes (which clears it).

        Runs the S2K once. Raises WrongPassphrase if `passphrase` is wrong.
        """
        try:
            stack.enter_context(self._secret.unlock(passphrase))
        except PGPDecryptionError:
            raise WrongPassphrase(
                f"the master passphrase does not unlock key {self.fingerprint}"
            ) from None
        except Exception as exc:
            raise KeyFileCorrupt(
                f"key file {self.fingerprint} cannot be unlocked ({type(exc).__name__})"
            ) from None

    def export_public(self) -> str:
        """The armored public key (primary, subkey, user id, self-signatures)."""
        return str(self._public)

    def encrypt(self, data: bytes) -> bytes:
        """A binary OpenPGP message: uncompressed literal data, format 'b', AES-256, MDC.

        The packets are those ``PGPKey.encrypt`` makes (a v3 PKESK to the ECDH
        subkey, then SEIPD v1), built directly: ``PGPKey.encrypt`` re-derives
        the key's usage flags and preferences, hashing the key six times, on
        every call, which was half the cost of sealing a 10 KB message.
        Raises KeysError if PGPy fails; the message never includes `data`.
        """
        try:
            # format="b": PGPy otherwise marks ASCII-looking input as text and
            # hands it back as str.
            literal = pgpy.PGPMessage.new(
                data, file=False, format="b", compression=CompressionAlgorithm.Uncompressed
            )
            session_key = _CIPHER.gen_key()
            pkesk = PKESessionKeyV3()
            pkesk.encrypter = bytearray(self._recipient_id)
            pkesk.pkalg = PubKeyAlgorithm.ECDH
            pkesk.encrypt_sk(self._recipient, _CIPHER, session_key)
            sealed = IntegrityProtectedSKEDataV1()
            sealed.encrypt(session_key, _CIPHER, bytes(literal))
            return bytes(pkesk) + bytes(sealed)
        except Exception as exc:
            raise KeysError(f"encryption failed ({type(exc).__name__})") from None

    def session_key(self, pkesk: Any) -> tuple[Any, bytes] | None:
        """The (cipher, session key) in `pkesk` if it is addressed to this key, else None."""
        try:
            # PGPKey.decrypt insists on a matching key id; going to the packet
            # lets us also try recipients whose id is hidden or damaged.
            algorithm, key = pkesk.decrypt_sk(self._secret_subkey._key)
        except Exception:
            return None
        return algorithm, bytes(key)


def decrypt(ciphertext: bytes, keys: Sequence[VaultKey]) -> bytes:
    """Decrypt a binary OpenPGP message addressed to any of `keys`, which must be unlocked.

    Keys are chosen by the recipient key id in each PKESK packet first; PKESKs
    naming none of ours are then tried against every key. Only integrity
    protected (MDC) messages are accepted. Returns the literal data exactly as
    sealed. Every failure raises DecryptionFailed, whose message holds no
    plaintext.
    """
    if not ciphertext or not ciphertext[0] & 0x80:
        raise DecryptionFailed("not a binary OpenPGP message")
    try:
        message = pgpy.PGPMessage.from_blob(ciphertext)
        encrypted = message.message
        # PGPMessage exposes recipients only as key ids; the packets are needed
        # to unwrap the session key ourselves.
        pkesks = [p for p in message._sessionkeys if isinstance(p, PKESessionKey)]
    except Exception as exc:
        raise DecryptionFailed(f"malformed OpenPGP message ({type(exc).__name__})") from None
    # Without an MDC the ciphertext is malleable: refuse it.
    if not isinstance(encrypted, IntegrityProtectedSKEDataV1):
        raise DecryptionFailed("not an integrity-protected OpenPGP message")
    if not pkesks or len(pkesks) > _MAX_RECIPIENTS:
        raise DecryptionFailed("unexpected number of recipients in the message")

    by_id = {key.subkey_id: key for key in keys}
    attempts = [(p, by_id[p.encrypter]) for p in pkesks if p.encrypter in by_id]
    attempts += [(p, key) for p in pkesks if p.encrypter not in by_id for key in keys]
    for pkesk, key in attempts:
        unwrapped = key.session_key(pkesk)
        if unwrapped is not None:
            return _open_data(encrypted, *unwrapped)
    raise DecryptionFailed("the message is not encrypted to any vault key")


def _open_data(encrypted: Any, algorithm: Any, session_key: bytes) -> bytes:
    try:
        inner = pgpy.PGPMessage()
        inner.parse(encrypted.decrypt(session_key, algorithm))
        # The literal packet, for its format: 't' and 'u' contents come back
        # decoded, and must go back to the exact bytes that were sealed.
        literal = inner._message
        if not isinstance(literal, LiteralData):
            raise DecryptionFailed("the message holds no literal data")
        contents = literal.contents
        if isinstance(contents, str):
            return contents.encode("latin-1" if literal.format == "t" else "utf-8")
        return bytes(contents)
    except DecryptionFailed:
        raise
    except Exception as exc:
        raise DecryptionFailed(
            f"the message is damaged or was tampered with ({type(exc).__name__})"
        ) from None


def _algorithm_name(key: Any) -> str:
    size = key.key_size
    if isinstance(size, EllipticCurveOID):
        return _CURVE_NAMES.get(size, str(size.name).lower())
    return f"{key.key_algorithm.name.lower()}{size}"
