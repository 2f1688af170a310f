"""Argon2id: production parameters, checks, the length cap and rehashing."""

from __future__ import annotations

import re

import pytest
from argon2 import PasswordHasher

from escrow.passwords import MAX_SECRET_CHARS, Check, SecretHasher
from tests.conftest import fast_hasher

HASH_PARAMS = re.compile(r"^\$argon2id\$v=19\$m=(\d+),t=(\d+),p=(\d+)\$[^$]+\$[^$]+$")


def params(encoded: str) -> tuple[int, int, int]:
    """(memory KiB, time cost, parallelism) read from an encoded Argon2id hash."""
    match = HASH_PARAMS.match(encoded)
    assert match, f"not an Argon2id v1.3 hash: {encoded[:30]}"
    m, t, p = (int(g) for g in match.groups())
    return m, t, p


@pytest.fixture(scope="module")
def production() -> SecretHasher:
    """The default hasher (RFC 9106 parameters); its sync methods only, as it outlives a loop."""
    return SecretHasher()


def test_default_parameters_are_rfc9106_low_memory_or_stronger(production: SecretHasher) -> None:
    m, t, p = params(production.hash_sync("correct horse battery staple"))
    assert t >= 3
    assert m >= 64 * 1024
    assert p >= 4


def test_hashes_are_salted(production: SecretHasher) -> None:
    first = production.hash_sync("the same secret")
    second = production.hash_sync("the same secret")
    assert first != second
    assert "the same secret" not in first


def test_right_secret_passes_and_wrong_fails(production: SecretHasher) -> None:
    stored = production.hash_sync("correct horse battery staple")
    right = production.check_sync(stored, "correct horse battery staple")
    assert right.ok
    assert right.new_hash is None
    assert not production.check_sync(stored, "correct horse battery stapler").ok
    assert not production.check_sync(stored, "").ok


async def test_async_hash_and_check() -> None:
    hasher = fast_hasher()
    stored = await hasher.hash("s3cret passphrase")
    assert (await hasher.check(stored, "s3cret passphrase")).ok
    assert not (await hasher.check(stored, "S3cret passphrase")).ok


async def test_nothing_stored_never_matches() -> None:
    hasher = fast_hasher()
    assert not (await hasher.check(None, "anything at all")).ok
    # Unknown accounts are checked against an internal dummy hash for equal cost;
    # the dummy's own secret must not open them either.
    assert not (await hasher.check(None, "no account has this secret")).ok
    assert not (await hasher.check("", "anything at all")).ok
    assert not (await hasher.check("", "no account has this secret")).ok


async def test_a_corrupt_stored_hash_fails_closed() -> None:
    hasher = fast_hasher()
    assert not (await hasher.check("$argon2id$v=19$garbage", "anything")).ok
    assert not (await hasher.check("plain text password", "plain text password")).ok


async def test_over_length_secrets_are_refused_before_hashing() -> None:
    hasher = fast_hasher()
    at_limit = "x" * MAX_SECRET_CHARS
    stored = await hasher.hash(at_limit)
    assert (await hasher.check(stored, at_limit)).ok
    with pytest.raises(ValueError, match=str(MAX_SECRET_CHARS)):
        await hasher.hash(at_limit + "x")
    assert not (await hasher.check(stored, at_limit + "x")).ok


def test_over_length_check_does_not_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    hasher = fast_hasher()
    stored = hasher.hash_sync("fine")

    def refuse(*_args: object) -> None:
        raise AssertionError("an over-length secret reached Argon2")

    monkeypatch.setattr(PasswordHasher, "verify", refuse)
    assert not hasher.check_sync(stored, "y" * (MAX_SECRET_CHARS + 1)).ok


def test_weaker_stored_hash_is_replaced_with_production_parameters(
    production: SecretHasher,
) -> None:
    old = fast_hasher().hash_sync("correct horse battery staple")
    check = production.check_sync(old, "correct horse battery staple")
    assert check.ok
    assert check.new_hash is not None
    assert params(check.new_hash) == params(production.hash_sync("x"))
    assert production.check_sync(check.new_hash, "correct horse battery staple") == Check(
        ok=True, new_hash=None
    )


def test_any_parameter_change_asks_for_a_new_hash(production: SecretHasher) -> None:
    stored = production.hash_sync("correct horse battery staple")
    fast = fast_hasher()
    check = fast.check_sync(stored, "correct horse battery staple")
    assert check.ok
    assert check.new_hash is not None
    assert params(check.new_hash) == (8, 1, 1)


def test_wrong_secret_never_yields_a_new_hash(production: SecretHasher) -> None:
    old = fast_hasher().hash_sync("correct horse battery staple")
    check = production.check_sync(old, "wrong horse battery staple")
    assert not check.ok
    assert check.new_hash is None


def test_hashes_are_interchangeable_with_argon2_cffi(production: SecretHasher) -> None:
    """Lanes computed on one thread give the standard result, both ways round."""
    reference = PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=4)
    ours = production.hash_sync("correct horse battery staple")
    assert reference.verify(ours, "correct horse battery staple")
    theirs = reference.hash("correct horse battery staple")
    assert production.check_sync(theirs, "correct horse battery staple") == Check(ok=True)
    assert not production.check_sync(theirs, "correct horse battery stapler").ok


def test_a_hash_with_altered_parameters_fails() -> None:
    hasher = fast_hasher()
    stored = hasher.hash_sync("s3cret passphrase")
    for before, after in (("t=1", "t=2"), ("p=1", "p=2"), ("m=8", "m=16")):
        assert before in stored
        assert not hasher.check_sync(stored.replace(before, after), "s3cret passphrase").ok
    huge = re.sub(r"m=\d+", f"m={8 * 1024 * 1024}", stored)  # 8 GiB: refused before computing
    assert not hasher.check_sync(huge, "s3cret passphrase").ok


def test_hashing_leaves_a_cpu_to_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    from escrow import passwords

    for cpus, expected in ((1, 1), (2, 1), (8, 7), (None, 1)):
        monkeypatch.setattr(passwords.os, "cpu_count", lambda cpus=cpus: cpus)
        assert passwords.default_concurrency() == expected
