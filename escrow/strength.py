"""Is a new passphrase good enough? Length rules and zxcvbn's estimate, with plain feedback.

Promises: :func:`judge` never raises on any input and never echoes the
passphrase back in its feedback. A passphrase is accepted when it is
:data:`MIN_CHARS` to :data:`~escrow.passwords.MAX_SECRET_CHARS` characters
long, matches its confirmation, and zxcvbn rates it at least
:data:`MIN_SCORE` (of 4), judged with the recipient's address and the
practice name as words an attacker would try first (the first of
``user_inputs`` is the recipient's address; its local part is refused outright). zxcvbn looks at the
first :data:`ZXCVBN_CHARS` characters only (its own limit, and it keeps the
check in milliseconds); anything longer only gets stronger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from zxcvbn import zxcvbn

from escrow.passwords import MAX_SECRET_CHARS

MIN_CHARS = 10
MIN_SCORE = 3
ZXCVBN_CHARS = 72


@dataclass(frozen=True)
class Judgement:
    ok: bool
    problems: tuple[str, ...] = ()
    suggestions: tuple[str, ...] = ()


def judge(passphrase: str, confirmation: str, user_inputs: Sequence[str] = ()) -> Judgement:
    """Accept or refuse a new passphrase, with reasons a non-technical reader can act on."""
    if len(passphrase) < MIN_CHARS:
        return Judgement(
            False,
            (f"Your passphrase needs at least {MIN_CHARS} characters.",),
            (
                "A short sentence or four unrelated words works well, for example four things you "
                "can see from a favourite place.",
            ),
        )
    if len(passphrase) > MAX_SECRET_CHARS:
        return Judgement(
            False, (f"Your passphrase can be at most {MAX_SECRET_CHARS} characters long.",)
        )
    if passphrase != confirmation:
        return Judgement(
            False, ("The two passphrases you typed are not the same. Please type it twice.",)
        )
    local = (user_inputs[0].rpartition("@")[0] if user_inputs else "").lower()
    if len(local) >= 4 and local in passphrase.lower():
        return Judgement(
            False,
            ("Please do not use your email address in your passphrase.",),
            ("Try a few unrelated words, or a short sentence only you would think of.",),
        )
    words = [
        w for item in user_inputs for w in item.lower().replace("@", " ").replace(".", " ").split()
    ]
    result = zxcvbn(passphrase[:ZXCVBN_CHARS], user_inputs=[*user_inputs, *words])
    if int(result["score"]) >= MIN_SCORE:
        return Judgement(True)
    feedback = result.get("feedback") or {}
    warning = str(feedback.get("warning") or "")
    problems = (warning,) if warning else ("This passphrase would be too easy to guess.",)
    suggestions = (
        *(str(s) for s in feedback.get("suggestions") or ()),
        "Try a few unrelated words, or a short sentence only you would think of.",
    )
    return Judgement(False, problems, suggestions)
