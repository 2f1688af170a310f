"""The recipient portal's domain services, built once and carried in :class:`Services`."""

from __future__ import annotations

from dataclasses import dataclass

from escrow.accesslog import AccessRecorder
from escrow.activity import ActivityLog
from escrow.audit import Audit
from escrow.db import Database
from escrow.mailbox import Mailbox
from escrow.outbox import Outbox
from escrow.passwords import SecretHasher
from escrow.receipts import ReadReceipts
from escrow.recipients import RecipientAccess
from escrow.replies import Replies
from escrow.sessions import SessionStore
from escrow.settings import Settings
from escrow.vault import Vault


@dataclass
class PortalServices:
    """Sessions, recipient access, mailbox, replies, the activity log, and the group committer
    of read events that all of them (and the staff console) share."""

    sessions: SessionStore
    recipients: RecipientAccess
    mailbox: Mailbox
    replies: Replies
    activity: ActivityLog
    recorder: AccessRecorder


def build_portal(
    settings: Settings,
    db: Database,
    vault: Vault,
    audit: Audit,
    hasher: SecretHasher,
    outbox: Outbox,
    receipts: ReadReceipts | None = None,
) -> PortalServices:
    """Wire the portal services to the shared database, vault, audit log and outbox."""
    # One group committer for every write a page view causes (audit, read marks, session touches,
    # and the read receipt a first read queues).
    recorder = AccessRecorder(db, audit, receipts or ReadReceipts(settings, db, outbox))
    sessions = SessionStore(settings, db, audit, recorder)
    return PortalServices(
        sessions=sessions,
        recipients=RecipientAccess(settings, db, audit, hasher, sessions),
        mailbox=Mailbox(settings, db, vault, audit, recorder),
        replies=Replies(settings, db, vault, audit, outbox),
        activity=ActivityLog(db),
        recorder=recorder,
    )
