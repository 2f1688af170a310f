"""The two places smtp.server stands in for aiosmtpd internals: same answers, less CPU."""

from __future__ import annotations

import asyncio
import collections
import inspect
import ssl
import types

import aiosmtpd.smtp
import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given
from hypothesis import strategies as st

from smtp.server import EscrowSMTP, Replicator

PATHS = [
    "<a@b.c>",
    "<therapist.name+tag@practice.example> SIZE=10240 BODY=8BITMIME",
    "<a@b.c>  SIZE=1",
    "<x@[192.0.2.1]>",
    "<a..b@c.d>",
    "<.a@c.d>",
    "<a@b.c>x",
    "<a@b.c> (comment) SIZE=1",
    "<>",
    "< a@b.c >",
    "a@b.c",
    '<"quoted local"@b.c>',
    "<=?utf-8?q?admin?=@b.c>",
    "<=?utf-8?q?admin?=@b.c> SIZE=1",
    "<ünïcode@exämple.de>",
    "<a@b.c",
    "<" + "l" * 65 + "@b.c>",
    "<" + "l" * 64 + "@b.c>",
    "",
]


class _Handler:
    pass


@pytest.fixture
async def server() -> EscrowSMTP:
    return EscrowSMTP(_Handler(), implicit_tls=False)  # type: ignore[arg-type]


@pytest.mark.parametrize("arg", PATHS)
async def test_paths_parse_as_aiosmtpd_parses_them(server: EscrowSMTP, arg: str) -> None:
    assert server._getaddr(arg) == _aiosmtpd_getaddr(server, arg)


ATOM = st.text(alphabet="abcXYZ019!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=8)
LOCAL = st.lists(ATOM, min_size=1, max_size=3).map(".".join)
DOMAIN = st.lists(st.text(alphabet="ab-9", min_size=1, max_size=6), min_size=1, max_size=3).map(
    ".".join
)
PARAMS = st.lists(st.sampled_from(["SIZE=10", "BODY=8BITMIME", "SMTPUTF8", "(x)"]), max_size=3)


@given(
    local=LOCAL,
    domain=DOMAIN,
    params=PARAMS,
    gap=st.sampled_from([" ", "  ", "\t", " \t"]),
)
async def test_simple_paths_parse_as_aiosmtpd_parses_them(
    local: str, domain: str, params: list[str], gap: str
) -> None:
    server = EscrowSMTP(_Handler(), implicit_tls=False)  # type: ignore[arg-type]
    arg = f"<{local}@{domain}>" + (gap + " ".join(params) if params else "")
    ours = server._getaddr(arg)
    theirs = _aiosmtpd_getaddr(server, arg)
    assert ours[0] == theirs[0]
    # The parameters are split on whitespace by aiosmtpd; leading blanks do not count.
    assert (ours[1] or "").split() == (theirs[1] or "").split()


def _aiosmtpd_getaddr(server: EscrowSMTP, arg: str) -> tuple[str | None, str | None]:
    return SMTP._getaddr(server, arg)


async def test_auth_mechanisms_are_found_as_inspect_finds_them(server: EscrowSMTP) -> None:
    shim = vars(aiosmtpd.smtp)["inspect"]
    assert shim is not inspect
    assert sorted(server._auth_methods) == ["LOGIN", "PLAIN"]
    assert all(method.is_builtin for method in server._auth_methods.values())

    server.auth_CUSTOM = lambda *_: None  # type: ignore[attr-defined]
    expected = [(n, v) for n, v in inspect.getmembers(server) if n.startswith("auth_")]
    assert shim.getmembers(server) == expected
    # A handler that is a class or a module, and whatever else inspect offers: unchanged.
    assert shim.getmembers(_Handler) == inspect.getmembers(_Handler)
    assert shim.getmembers(inspect) == inspect.getmembers(inspect)
    assert shim.isfunction is inspect.isfunction


class _DataHandler:
    def plaintext_allowed(self, session: object) -> bool:
        return False

    async def handle_DATA(self, *args: object) -> str:
        return "250 OK"


# Containers every connection of a listener may share: nothing writes to them.
SHARED = {"_handle_hooks"}


def _same_state(copy: EscrowSMTP, built: EscrowSMTP, first: EscrowSMTP) -> None:
    """``copy`` holds what aiosmtpd's constructor gives ``built``, with objects of its own."""
    ours, theirs = vars(copy), vars(built)
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        mine = ours[name]
        if isinstance(value, types.MethodType) and value.__self__ is built:
            assert (mine.__func__, mine.__self__) == (value.__func__, copy), name
        elif name == "_smtp_methods":
            assert {k: (m.__func__, m.__self__) for k, m in mine.items()} == {
                k: (m.__func__, copy) for k, m in value.items()
            }
        elif name == "_auth_methods":
            assert {
                k: (a.method.__func__, a.method.__self__, a.is_builtin) for k, a in mine.items()
            } == {k: (a.method.__func__, copy, a.is_builtin) for k, a in value.items()}
        elif name in {"_closed", "_strong_reader", "_stream_reader_wr", "_drain_waiters"}:
            # The stream's own objects: new for each connection.
            assert type(mine) is type(value), name
            assert mine is not value and mine is not vars(first)[name], name
        else:
            assert mine == value, name
            if isinstance(value, dict | list | set | collections.deque) and name not in SHARED:
                # A container a connection could change: never another's.
                assert mine is not vars(first)[name], name
    assert copy._strong_reader._limit == built._strong_reader._limit  # type: ignore[attr-defined]


@pytest.mark.parametrize("implicit_tls", [False, True])
async def test_replicated_protocols_are_what_aiosmtpd_would_build(implicit_tls: bool) -> None:
    loop = asyncio.get_running_loop()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    handler = _DataHandler()

    def build() -> EscrowSMTP:
        options = {"tls_context": context, "require_starttls": True} if not implicit_tls else {}
        return EscrowSMTP(
            handler,  # type: ignore[arg-type]
            implicit_tls=implicit_tls,
            auth_require_tls=not implicit_tls,
            data_size_limit=1234,
            enable_SMTPUTF8=True,
            hostname="mx.practice.example",
            ident="escrow",
            loop=loop,
            **options,
        )

    replicate = Replicator(build)
    first = replicate()
    first.require_starttls = False  # a connection changes its own state ...
    first.auth_failures = 2
    copies = [replicate(), replicate()]
    for copy in copies:
        assert copy is not first
        _same_state(copy, build(), first)  # ... and no copy inherits it
    assert copies[0]._strong_reader is not copies[1]._strong_reader  # type: ignore[attr-defined]
    # EHLO raises a connection's MAIL limit (SIZE, SMTPUTF8): aiosmtpd keeps the limits on
    # the class, so without a table per connection they would grow with every copy.
    copies[0].command_size_limits["MAIL"] += 26
    assert copies[1].command_size_limits["MAIL"] == SMTP.command_size_limit
    assert replicate().command_size_limits["MAIL"] == SMTP.command_size_limit
