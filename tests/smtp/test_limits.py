"""Size limits: oversize mail gets ``552`` whether or not it declared its size, and leaves no trace."""

from __future__ import annotations

from sqlalchemy import select

from escrow.models import Message
from tests.smtp.conftest import (
    STAFF_EMAIL,
    MakeEscrow,
    Reply,
    Sink,
    count_rows,
    in_thread,
    signed_in,
    simple_message,
    transact,
)

CLIENT = "alex.client@example.net"
MEGABYTE = 1024 * 1024


async def test_oversize_mail_is_refused_with_552(make_escrow: MakeEscrow, sink: Sink) -> None:
    escrow = await make_escrow(ESCROW_MAX_MESSAGE_MB="1")
    await escrow.add_staff()
    line = "Notes from the session, nothing remarkable, kept for the record only.\n"
    big = simple_message(STAFF_EMAIL, [CLIENT], body=line * (2 * MEGABYTE // (len(line) + 1)))
    assert 2 * MEGABYTE - 1000 < len(big) < 2 * MEGABYTE + 1000
    small = simple_message(STAFF_EMAIL, [CLIENT])

    def converse() -> dict[str, object]:
        client = signed_in(escrow.port, escrow.cafile)
        try:
            seen: dict[str, object] = {"size": client.esmtp_features.get("size")}
            seen["declared"] = client.mail(STAFF_EMAIL, [f"SIZE={len(big)}"])[0]
            client.rset()
            # No SIZE at MAIL: the limit holds while the data is read.
            seen["undeclared"] = transact(client, STAFF_EMAIL, [CLIENT], big)
            # A SIZE that lies is no way around it either.
            seen["understated"] = transact(
                client, STAFF_EMAIL, [CLIENT], big, mail_options=["SIZE=2000"]
            )
            # The session survives: a normal message right after is accepted.
            seen["small"] = transact(client, STAFF_EMAIL, [CLIENT], small)
        finally:
            client.quit()
        return seen

    seen = await in_thread(converse)
    assert seen["size"] == str(MEGABYTE)
    assert seen["declared"] == 552
    assert isinstance(seen["undeclared"], Reply) and seen["undeclared"].code == 552
    assert isinstance(seen["understated"], Reply) and seen["understated"].code == 552
    assert isinstance(seen["small"], Reply) and seen["small"].code == 250

    async with escrow.services.db.read() as session:
        sizes = (await session.scalars(select(Message.size))).all()
    assert list(sizes) == [len(small)]
    assert await count_rows(escrow.services, "vault_item") == 1
    assert await count_rows(escrow.services, "delivery") == 1
