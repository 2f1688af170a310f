"""Build the domain services once, at start-up, and hand them to every part.

:func:`build_services` is the one place that reads the master passphrase,
unlocks the vault keys and opens the database. SMTP, web and the CLI receive
the resulting :class:`Services`; nothing keeps module-level state.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass

from escrow.audit import Audit
from escrow.cpu import BoundedRunner
from escrow.db import Database
from escrow.errors import SettingsError
from escrow.intake import Intake
from escrow.lifecycle import Lifecycle
from escrow.links import LinkTokens
from escrow.outbox import Outbox
from escrow.passwords import SecretHasher
from escrow.portal import PortalServices, build_portal
from escrow.receipts import ReadReceipts
from escrow.settings import Settings
from escrow.staff import StaffDirectory
from escrow.staff_security import StaffSecurity
from escrow.vault import Vault
from keys import VaultKeyring

log = logging.getLogger(__name__)


def resolve_master_passphrase(settings: Settings, *, create: bool = False) -> str:
    """The master passphrase: from the settings, else (development only) from ``master.secret``.

    With ``create`` a development passphrase is generated if none exists, with a
    loud warning. In production (PostgreSQL or an https public URL) a missing
    ``ESCROW_MASTER_PASSPHRASE`` is a configuration error.
    """
    if settings.master_passphrase:
        return settings.master_passphrase.reveal()
    if settings.is_production:
        raise SettingsError(
            "ESCROW_MASTER_PASSPHRASE (or ESCROW_MASTER_PASSPHRASE_FILE) must be set: "
            "a generated development passphrase is refused with PostgreSQL or an https URL"
        )
    path = settings.master_secret_file
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    if not create:
        raise SettingsError(
            f"no master passphrase: set ESCROW_MASTER_PASSPHRASE, or run `escrow init` "
            f"to generate a development one in {path}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(value + "\n")
    log.warning(
        "DEVELOPMENT ONLY: generated a master passphrase in %s. Anyone who can read that "
        "file and the database can read every message. Set ESCROW_MASTER_PASSPHRASE for real use.",
        path,
    )
    return value


@dataclass
class Services:
    """Everything the SMTP server, the web app, the worker and the CLI share."""

    settings: Settings
    db: Database
    keyring: VaultKeyring
    vault: Vault
    audit: Audit
    hasher: SecretHasher
    staff: StaffDirectory
    staff_security: StaffSecurity
    outbox: Outbox
    intake: Intake
    links: LinkTokens
    portal: PortalServices
    lifecycle: Lifecycle
    receipts: ReadReceipts

    async def aclose(self) -> None:
        await self.db.dispose()
        self.keyring.close()


def build_services(settings: Settings, *, hasher: SecretHasher | None = None) -> Services:
    """Open the database and unlock the vault keys. Raises SettingsError or keys errors."""
    passphrase = resolve_master_passphrase(settings)
    keyring = VaultKeyring.open(settings.keys_dir, passphrase)
    db = Database(settings.database_url)
    audit = Audit(db)
    hasher = hasher or SecretHasher()
    crypto_threads = BoundedRunner(max(2, os.cpu_count() or 2))
    vault = Vault(keyring, crypto_threads)
    outbox = Outbox(settings, db, vault, audit)
    links = LinkTokens(passphrase)
    receipts = ReadReceipts(settings, db, outbox)
    return Services(
        settings=settings,
        db=db,
        keyring=keyring,
        vault=vault,
        audit=audit,
        hasher=hasher,
        staff=StaffDirectory(db, hasher, audit),
        staff_security=StaffSecurity(settings, db, hasher, audit, vault),
        outbox=outbox,
        intake=Intake(settings, db, vault, audit, outbox, links),
        links=links,
        portal=build_portal(settings, db, vault, audit, hasher, outbox, receipts),
        lifecycle=Lifecycle(settings, db, audit),
        receipts=receipts,
    )
