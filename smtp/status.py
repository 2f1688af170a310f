"""Every SMTP reply the server gives, in one table.

Replies never carry exception text or anything from the message. A ``4xx``
tells the client to keep the message and retry; a ``5xx`` is final.
"""

from __future__ import annotations

OK = "250 2.0.0 OK"
SENDER_OK = "250 2.1.0 Sender OK"
RECIPIENT_OK = "250 2.1.5 Recipient OK"
ACCEPTED = "250 2.0.0 Message accepted for secure delivery"

AUTH_REQUIRED = "530 5.7.0 Authentication required"
RELAY_DENIED = "554 5.7.1 Relay access denied: sign in with SMTP AUTH"
SENDER_NOT_OWNED = "553 5.7.1 Sender address is not yours: use your own address"
BAD_SENDER = "501 5.1.7 Bad sender address syntax"
BAD_RECIPIENT = "553 5.1.3 Bad recipient address syntax"
NULL_SENDER = "550 5.7.1 Null sender is not accepted here"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
TOO_BIG = "552 5.3.4 Message too big"
EMPTY = "554 5.6.0 Message is empty"
NOT_STORED = "451 4.3.0 Message not stored, please try again later"
TRY_LATER = "421 4.3.0 Service temporarily unavailable, try again later"
OUT_OF_STEP = "421 4.5.0 Commands sent ahead of the reply to DATA, closing"
AUTH_THROTTLED = "454 4.7.0 Too many failed attempts, try again later"
