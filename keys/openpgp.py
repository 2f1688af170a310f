"""Everything the project does with PGPy, in one place.

A vault key is an Ed25519 primary key (certify, sign) with one Curve25519
ECDH subkey (encrypt). PGPy 0.6.0 is pinned, so the few private attributes
used here (`PGPMessage._sessionkeys`, `PGPMessage._message`, `PGPKey._key`)
are stable; each use says why the public API does not suffice.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import warnings
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import pgpy
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
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


# RFC 6637 and RFC 4880bis: the Curve25519 OID, and the fixed text in the KDF's parameters.
_CURVE25519_OID = bytes.fromhex("2b060104019755010501")
_ANONYMOUS_SENDER = b"Anonymous Sender    "
_KDF_HASHES = {
    HashAlgorithm.SHA256: "sha256",
    HashAlgorithm.SHA384: "sha384",
    HashAlgorithm.SHA512: "sha512",
}
_KEK_SIZES = {
    SymmetricKeyAlgorithm.AES128: 16,
    SymmetricKeyAlgorithm.AES192: 24,
    SymmetricKeyAlgorithm.AES256: 32,
}
_MDC_HEADER = b"\xd3\x14"  # modification detection code packet: tag 19, 20 bytes of SHA-1
_BLOCK = 1 << 20  # plaintext encrypted and hashed per step, to bound the copies


def _header(tag: int, length: int) -> bytes:
    """A new-format packet header, with the length forms PGPy writes (RFC 4880 4.2.2)."""
    if length < 192:
        return bytes((0xC0 | tag, length))
    if length < 8384:
        length -= 192
        return bytes((0xC0 | tag, (length >> 8) + 192, length & 0xFF))
    return bytes((0xC0 | tag, 0xFF)) + length.to_bytes(4, "big")


class _Sealer:
    """Encrypts to one Curve25519 ECDH subkey with ``cryptography`` alone.

    PGPy's packet objects cost more than the cryptography itself (an ASN.1
    encoder per message for the curve's OID, MPI objects, repeated
    serialisation). The output is the message PGPy makes, packet for packet
    (``tests/keys/test_openpgp.py`` compares them, and GnuPG and PGPy both
    open it): a v3 PKESK (RFC 4880 5.1, RFC 6637 section 8) and a SEIPD v1
    holding a literal data packet and its MDC (RFC 4880 5.13).
    """

    def __init__(self, keymaterial: Any, fingerprint: Any, key_id: bytes) -> None:
        if keymaterial.oid is not EllipticCurveOID.Curve25519:
            raise KeyFileCorrupt("the encryption subkey must be Curve25519")
        kdf = keymaterial.kdf
        if kdf.halg not in _KDF_HASHES or kdf.encalg not in _KEK_SIZES:
            raise KeyFileCorrupt("the encryption subkey has unsupported KDF parameters")
        self._public = x25519.X25519PublicKey.from_public_bytes(bytes(keymaterial.p.x))
        self._hash = _KDF_HASHES[kdf.halg]
        self._kek_size = _KEK_SIZES[kdf.encalg]
        self._param = (
            bytes((len(_CURVE25519_OID),))
            + _CURVE25519_OID
            + bytes((PubKeyAlgorithm.ECDH, 3, 1, kdf.halg, kdf.encalg))
            + _ANONYMOUS_SENDER
            + bytes.fromhex(str(fingerprint).replace(" ", ""))
        )
        self._pkesk_start = bytes((3,)) + key_id + bytes((PubKeyAlgorithm.ECDH,))

    def seal(self, data: bytes) -> bytes:
        session_key = os.urandom(_CIPHER.key_size // 8)
        checksum = (sum(session_key) & 0xFFFF).to_bytes(2, "big")
        m = bytes((_CIPHER,)) + session_key + checksum
        m += bytes((8 - len(m) % 8,)) * (8 - len(m) % 8)  # PKCS#5 padding, as PGPy pads
        ephemeral = x25519.X25519PrivateKey.generate()
        shared = ephemeral.exchange(self._public)
        # RFC 6637 KDF: one round of the hash covers every KEK size used here.
        kek = hashlib.new(self._hash, b"\0\0\0\1" + shared + self._param).digest()
        wrapped = aes_key_wrap(kek[: self._kek_size], m)
        point = b"\x40" + ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        # MPI of the 0x40-prefixed point: 263 bits.
        pkesk = self._pkesk_start + b"\x01\x07" + point + bytes((len(wrapped),)) + wrapped

        literal_start = b"b\x00" + int(time.time()).to_bytes(4, "big")
        literal_header = _header(11, len(literal_start) + len(data)) + literal_start
        prefix = os.urandom(16)
        prefix += prefix[-2:]
        sealed_length = 1 + len(prefix) + len(literal_header) + len(data) + 22
        out = bytearray(_header(1, len(pkesk)) + pkesk + _header(18, sealed_length) + b"\x01")
        mdc = hashlib.sha1(prefix)  # noqa: S324 (RFC 4880 5.14: the MDC is SHA-1)
        encryptor = Cipher(algorithms.AES(session_key), modes.CFB(bytes(16))).encryptor()
        out += encryptor.update(prefix)
        mdc.update(literal_header)
        out += encryptor.update(literal_header)
        view = memoryview(data)
        for offset in range(0, len(data), _BLOCK):
            block = view[offset : offset + _BLOCK]
            mdc.update(block)
            out += encryptor.update(block)
        mdc.update(_MDC_HEADER)
        out += encryptor.update(_MDC_HEADER + mdc.digest()) + encryptor.finalize()
        return bytes(out)


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
        self._sealer = _Sealer(
            packet.keymaterial,
            packet.fingerprint,
            bytes.fromhex(self._public_subkey.fingerprint.keyid),
        )
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
        subkey, then SEIPD v1), built by :class:`_Sealer`: 10 KB seals in about
        a third of the time PGPy's own packet objects take. Raises KeysError
        if encryption fails; the error never includes `data`.
        """
        try:
            return self._sealer.seal(data)
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
