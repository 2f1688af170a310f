"""Tables of record. Nothing here holds health information in clear.

Subject, body, attachment names and contents, and replies live only as
OpenPGP ciphertext in :class:`VaultItem` (and, for mail still to be sent, in
:class:`OutboxJob.payload`). Addresses are kept in clear because mail must be
sent to them. Link and session tokens are stored only as SHA-256 hashes.
The schema is created and changed only by the Alembic migrations in
``escrow/migrations``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def new_id() -> str:
    """A random 128-bit identifier as 32 hex digits (unguessable, URL-safe)."""
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Staff(Base):
    """A practice user: SMTP AUTH and console sign-in."""

    __tablename__ = "staff"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    role: Mapped[str] = mapped_column(String(16), default="staff")  # staff | admin
    password_hash: Mapped[str] = mapped_column(String(200))
    totp_secret: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # sealed
    totp_enrolled_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The last TOTP time step accepted: a code is never accepted twice.
    totp_last_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class AppPassword(Base):
    """A named, revocable SMTP password for one mail client or device (Argon2id hash)."""

    __tablename__ = "app_password"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    staff_id: Mapped[str] = mapped_column(ForeignKey("staff.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    secret_hash: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class RecoveryCode(Base):
    """A one-time second-factor code for a staff member who lost their authenticator."""

    __tablename__ = "recovery_code"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    staff_id: Mapped[str] = mapped_column(ForeignKey("staff.id", ondelete="CASCADE"), index=True)
    code_hash: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class StaffAlias(Base):
    """Another envelope sender an admin allowed a staff member to use."""

    __tablename__ = "staff_alias"

    address: Mapped[str] = mapped_column(String(320), primary_key=True)
    staff_id: Mapped[str] = mapped_column(ForeignKey("staff.id", ondelete="CASCADE"), index=True)


class Recipient(Base):
    """One external address that has been sent escrowed mail."""

    __tablename__ = "recipient"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    passphrase_hash: Mapped[str | None] = mapped_column(String(200), nullable=True)
    passphrase_set_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    access_code_hash: Mapped[str | None] = mapped_column(String(200), nullable=True)
    consent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    failed_attempts: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Message(Base):
    """An accepted message or a client's reply. Its content is only in :class:`VaultItem`."""

    __tablename__ = "message"
    __table_args__ = (
        Index("ix_message_staff_created", "staff_id", "created_at"),
        Index("ix_message_expires", "expires_at"),
        # The retention sweeps (escrow.lifecycle): only messages still to expire or purge.
        Index(
            "ix_message_unexpired",
            "expires_at",
            sqlite_where=text("expired_at IS NULL"),
            postgresql_where=text("expired_at IS NULL"),
        ),
        Index(
            "ix_message_unpurged",
            "created_at",
            sqlite_where=text("purged_at IS NULL"),
            postgresql_where=text("purged_at IS NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    thread_id: Mapped[str] = mapped_column(String(32), index=True)
    direction: Mapped[str] = mapped_column(String(16))  # outbound | reply
    sender: Mapped[str] = mapped_column(String(320))
    staff_id: Mapped[str | None] = mapped_column(ForeignKey("staff.id"), nullable=True)
    recipient_id: Mapped[str | None] = mapped_column(ForeignKey("recipient.id"), nullable=True)
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("message.id"), nullable=True)
    rfc_message_id: Mapped[str] = mapped_column(String(998), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    legal_hold: Mapped[bool] = mapped_column(Boolean, default=False)
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The subject alone, sealed to the vault key, so an inbox page decrypts a few
    # bytes per row instead of every whole message (filled in by the portal).
    subject_sealed: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class VaultItem(Base):
    """OpenPGP ciphertext of a message's MIME, the key it was sealed to, and its SHA-256."""

    __tablename__ = "vault_item"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    message_id: Mapped[str | None] = mapped_column(
        ForeignKey("message.id", ondelete="CASCADE"), unique=True, nullable=True
    )
    fingerprint: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    ciphertext: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Delivery(Base):
    """One message to one recipient, found by the hash of its link token."""

    __tablename__ = "delivery"
    __table_args__ = (
        UniqueConstraint("message_id", "recipient_id"),
        Index("ix_delivery_recipient_created", "recipient_id", "created_at"),
        Index("ix_delivery_status", "status", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    message_id: Mapped[str] = mapped_column(
        ForeignKey("message.id", ondelete="CASCADE"), index=True
    )
    recipient_id: Mapped[str] = mapped_column(ForeignKey("recipient.id"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # queued | notified | opened | read | replied | revoked | expired
    status: Mapped[str] = mapped_column(String(16), default="queued")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    notified_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    opened_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    read_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    replied_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class OutboxJob(Base):
    """A durable mail job. ``payload`` is always sealed OpenPGP (it may hold a link token)."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_due", "done_at", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    # notification | reply | passthrough | bounce | receipt
    kind: Mapped[str] = mapped_column(String(16))
    message_id: Mapped[str | None] = mapped_column(
        ForeignKey("message.id", ondelete="SET NULL"), nullable=True, index=True
    )
    delivery_id: Mapped[str | None] = mapped_column(
        ForeignKey("delivery.id", ondelete="SET NULL"), nullable=True
    )
    mail_from: Mapped[str] = mapped_column(String(320))
    rcpt_to: Mapped[str] = mapped_column(Text)  # JSON list of addresses
    payload: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)  # sent | gave_up


class WebSession(Base):
    """A server-side session; the cookie carries only a random value whose hash is ``token_hash``."""

    __tablename__ = "session"
    __table_args__ = (Index("ix_session_principal", "principal_type", "principal_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    principal_type: Mapped[str] = mapped_column(String(16))  # recipient | staff
    principal_id: Mapped[str] = mapped_column(String(32))
    csrf_secret: Mapped[str] = mapped_column(String(64))
    stage: Mapped[str] = mapped_column(String(16), default="full")  # full | mfa | link | code
    # The delivery whose link started this session (keeps the token out of URLs).
    delivery_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    remote_addr: Mapped[str] = mapped_column(String(64), default="")
    user_agent: Mapped[str] = mapped_column(String(300), default="")


class AuditEvent(Base):
    """One link of the append-only audit hash chain. Never holds health information."""

    __tablename__ = "audit_event"
    __table_args__ = (
        Index("ix_audit_message", "message_id"),
        Index("ix_audit_actor", "actor_type", "actor_id"),
        Index("ix_audit_at", "at"),
    )

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor_type: Mapped[str] = mapped_column(String(16))  # staff | recipient | system | smtp
    actor_id: Mapped[str] = mapped_column(String(320), default="")
    action: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    delivery_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    remote_addr: Mapped[str] = mapped_column(String(64), default="")
    user_agent: Mapped[str] = mapped_column(String(300), default="")
    outcome: Mapped[str] = mapped_column(String(16), default="ok")
    detail: Mapped[str] = mapped_column(Text, default="{}")  # canonical JSON, no PHI
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)
