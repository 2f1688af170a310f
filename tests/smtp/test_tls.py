"""TLS on both listeners: 1.2 and 1.3 only, with forward-secret AEAD suites.

The legacy client is built to really speak TLS 1.0 and 1.1 (a control
server proves it), so a refused handshake is our server's doing.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import threading
import warnings
from pathlib import Path

import pytest

from smtp.tls import TLS12_CIPHERS
from tests.smtp.conftest import (
    STAFF_EMAIL,
    STAFF_PASSWORD,
    EscrowServer,
    client_context,
    connect,
    in_thread,
)

LEGACY = [
    pytest.param(ssl.TLSVersion.TLSv1, "TLSv1", id="TLSv1.0"),
    pytest.param(ssl.TLSVersion.TLSv1_1, "TLSv1.1", id="TLSv1.1"),
]
MODERN = [
    pytest.param(ssl.TLSVersion.TLSv1_2, "TLSv1.2", id="TLSv1.2"),
    pytest.param(ssl.TLSVersion.TLSv1_3, "TLSv1.3", id="TLSv1.3"),
]


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """TLS does not touch the database: SQLite is enough here."""
    return f"sqlite+aiosqlite:///{tmp_path / 'escrow.db'}"


def pinned(context: ssl.SSLContext, version: ssl.TLSVersion) -> ssl.SSLContext:
    with warnings.catch_warnings():
        # Naming TLS 1.0/1.1 is deprecated in Python; speaking them is what this test is for.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = version
        context.maximum_version = version
    return context


def legacy_client(version: ssl.TLSVersion, ciphers: str = "ALL:@SECLEVEL=0") -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    pinned(context, version)
    context.set_ciphers(ciphers)
    return context


def handshake_with_legacy_server(
    cafile: Path, version: ssl.TLSVersion, ciphers: str = "ALL:@SECLEVEL=0"
) -> str:
    """Control: a throwaway server that allows ``version``; returns what the client negotiated."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    pinned(server_context, version)
    server_context.set_ciphers("ALL:@SECLEVEL=0")
    server_context.load_cert_chain(cafile, cafile.with_name("dev-key.pem"))
    failures: list[BaseException] = []

    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            connection, _ = listener.accept()
            try:
                with server_context.wrap_socket(connection, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (OSError, ssl.SSLError) as error:
                failures.append(error)
            finally:
                connection.close()

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=10) as raw,
                legacy_client(version, ciphers).wrap_socket(raw) as tls,
            ):
                assert tls.recv(2) == b"ok"
                negotiated = f"{tls.version()} {tls.cipher()[0]}"  # type: ignore[index]
        finally:
            thread.join(10)
    assert failures == []
    return negotiated


@pytest.mark.parametrize(("version", "name"), LEGACY)
async def test_legacy_tls_is_refused_on_both_listeners(
    escrow: EscrowServer, version: ssl.TLSVersion, name: str
) -> None:
    # The client can speak it: against a server that allows it, it does.
    negotiated = await in_thread(handshake_with_legacy_server, escrow.cafile, version)
    assert negotiated.split()[0] == name

    def starttls() -> None:
        client = connect(escrow.port)
        try:
            client.ehlo()
            client.starttls(context=legacy_client(version))
        finally:
            client.close()

    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await in_thread(starttls)

    def implicit() -> None:
        with (
            socket.create_connection(("127.0.0.1", escrow.smtps_port), timeout=10) as raw,
            legacy_client(version).wrap_socket(raw) as tls,
        ):
            tls.recv(100)

    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await in_thread(implicit)


@pytest.mark.parametrize(("version", "name"), MODERN)
async def test_modern_tls_works_on_both_listeners(
    escrow: EscrowServer, version: ssl.TLSVersion, name: str
) -> None:
    def starttls() -> tuple[str | None, str, int]:
        client = connect(escrow.port)
        try:
            client.ehlo()
            client.starttls(context=pinned(client_context(escrow.cafile), version))
            client.ehlo()
            assert isinstance(client.sock, ssl.SSLSocket)
            negotiated = client.sock.version()
            cipher = client.sock.cipher()
            assert cipher is not None
            code, _ = client.login(STAFF_EMAIL, STAFF_PASSWORD)
        finally:
            client.quit()
        return negotiated, cipher[0], code

    def implicit() -> tuple[str | None, bool, int]:
        client = smtplib.SMTP_SSL(
            "127.0.0.1",
            escrow.smtps_port,
            local_hostname="client.test",
            context=pinned(client_context(escrow.cafile), version),
            timeout=30,
        )
        try:
            client.ehlo()
            assert isinstance(client.sock, ssl.SSLSocket)
            offers_auth = client.has_extn("auth") and not client.has_extn("starttls")
            code, _ = client.login(STAFF_EMAIL, STAFF_PASSWORD)
            negotiated = client.sock.version()
        finally:
            client.quit()
        return negotiated, offers_auth, code

    negotiated, cipher, code = await in_thread(starttls)
    assert (negotiated, code) == (name, 235)
    if version is ssl.TLSVersion.TLSv1_2:
        assert cipher in TLS12_CIPHERS.split(":")
    assert await in_thread(implicit) == (name, True, 235)


# CBC suites with SHA-1/SHA-2 MACs: TLS 1.2 could use them, we must not.
WEAK_TLS12 = "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA256:@SECLEVEL=0"


async def test_tls12_without_an_aead_suite_is_refused(escrow: EscrowServer) -> None:
    control = await in_thread(
        handshake_with_legacy_server, escrow.cafile, ssl.TLSVersion.TLSv1_2, WEAK_TLS12
    )
    assert control.split()[0] == "TLSv1.2" and control.split()[1] in WEAK_TLS12

    def starttls() -> None:
        client = connect(escrow.port)
        try:
            client.ehlo()
            client.starttls(context=legacy_client(ssl.TLSVersion.TLSv1_2, WEAK_TLS12))
        finally:
            client.close()

    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await in_thread(starttls)
