"""Following a link: ``GET /m/{token}``, then the access steps under ``/access``.

Promises:

* An unknown or expired link gets one neutral page: the same status (404)
  and the same bytes whatever the reason, and no cookie. A withdrawn
  message's link says only that the practice withdrew it (410, no cookie,
  no subject or date): whoever holds the link already knows a message was
  sent, so this tells them nothing new, and spares the client a puzzle.
* A usable link starts a ``link`` session bound to its delivery and
  redirects to ``/access`` at once, so the token leaves the address bar
  and the history entry that follows.
* ``/access`` shows the one step this recipient needs next (first-access
  code, consent, choosing a passphrase, signing in). Every POST checks the
  session's CSRF token; a failure redraws the same form with status 400
  and a plain explanation, and is audited (``csrf.failed``).
* Signing in (or choosing the first passphrase) issues a new session
  cookie and redirects to the message the link was for.
"""

from __future__ import annotations

from datetime import datetime

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from escrow.lockout import is_locked
from escrow.models import utcnow
from escrow.passwords import MAX_SECRET_CHARS
from escrow.recipients import LinkWithdrawn, Outcome, RecipientState, Step, next_step
from escrow.sessions import SessionView, Started
from escrow.strength import MIN_CHARS
from web.forms import FormInvalid, FormTooLarge, field, read_form
from web.portal import Portal, redirect
from web.security import csrf_valid

CSRF_MESSAGE = (
    "This page was open for a long time, or the form was sent twice, so we did not act on it. "
    "Please try again."
)


class LinkRoutes:
    """The routes a client uses before being signed in."""

    def __init__(self, portal: Portal) -> None:
        self.portal = portal
        self.recipients = portal.domain.recipients
        self.sessions = portal.domain.sessions

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/m/{token}", self.open_link, methods=["GET"]),
            Route("/access", self.access, methods=["GET"]),
            Route("/access/code", self.code, methods=["POST"]),
            Route("/access/consent", self.consent, methods=["POST"]),
            Route("/access/passphrase", self.choose, methods=["POST"]),
            Route("/access/sign-in", self.sign_in, methods=["POST"]),
        ]

    # ------------------------------------------------------------ the link

    async def open_link(self, request: Request) -> Response:
        token = str(request.path_params["token"])
        target = await self.recipients.open_link(token, self.portal.actor(request))
        if target is None:
            return self.portal.page(
                "link_unavailable.html", view=None, status=404, title="This link cannot be used"
            )
        if isinstance(target, LinkWithdrawn):
            return self.portal.page(
                "link_withdrawn.html", view=None, status=410, title="This message was withdrawn"
            )
        current = (await self.portal.current(request)).session
        if (
            current is not None
            and current.signed_in
            and current.principal_id == target.recipient_id
        ):
            return redirect(f"/messages/{target.message_id}")
        if current is not None:
            await self.sessions.end(
                current, self.portal.actor(request, current), detail={"reason": "new link"}
            )
        actor = self.portal.actor(request)
        started = await self.sessions.start(
            "recipient",
            target.recipient_id,
            stage="link",
            actor=actor,
            delivery_id=target.delivery_id,
        )
        response = redirect("/access")
        self.portal.cookies.set(response, started.token)
        return response

    # ------------------------------------------------------------ the steps

    async def access(self, request: Request) -> Response:
        view = await self.portal.require(request, full=False)
        if isinstance(view, Response):
            return view
        if view.signed_in:
            return await self._landing(view)
        state = await self.recipients.state(view.principal_id)
        return self._step(view, state)

    def _step(
        self,
        view: SessionView,
        state: RecipientState,
        *,
        status: int = 200,
        errors: tuple[str, ...] = (),
        suggestions: tuple[str, ...] = (),
        locked_until: datetime | None = None,
        throttled: bool = False,
    ) -> Response:
        step = next_step(state, view.stage)
        common = {"errors": errors, "suggestions": suggestions, "email": state.email}
        if step is Step.CODE:
            return self.portal.page(
                "access_code.html", view=view, status=status, title="First-access code", **common
            )
        if step is Step.CONSENT:
            paragraphs = [
                p.strip() for p in self.recipients.consent_text.split("\n\n") if p.strip()
            ]
            return self.portal.page(
                "consent.html",
                view=view,
                status=status,
                title="Before you start",
                consent=paragraphs,
                **common,
            )
        if step is Step.CHOOSE:
            return self.portal.page(
                "choose.html",
                view=view,
                status=status,
                title="Choose a passphrase",
                min_chars=MIN_CHARS,
                max_chars=MAX_SECRET_CHARS,
                **common,
            )
        if locked_until is None and is_locked(state.locked_until, utcnow()):
            locked_until = state.locked_until
        return self.portal.page(
            "sign_in.html",
            view=view,
            status=status,
            title="Sign in",
            max_chars=MAX_SECRET_CHARS,
            locked_until=locked_until,
            throttled=throttled,
            **common,
        )

    async def _landing(self, view: SessionView) -> Response:
        message_id = None
        if view.delivery_id is not None:
            message_id = await self.portal.domain.mailbox.message_for(
                view.principal_id, view.delivery_id
            )
        return redirect(f"/messages/{message_id}" if message_id else "/inbox")

    async def _signed_in(self, started: Started) -> Response:
        response = await self._landing(started.session)
        self.portal.cookies.set(response, started.token)
        return response

    async def _post(
        self, request: Request, expected: Step
    ) -> tuple[SessionView, RecipientState, FormData] | Response:
        """The session, state and form of a step POST, or the response that replaces it."""
        view = await self.portal.require(request, full=False)
        if isinstance(view, Response):
            return view
        if view.signed_in:
            return await self._landing(view)
        state = await self.recipients.state(view.principal_id)
        try:
            form = await read_form(request)
        except (FormTooLarge, FormInvalid):
            return self._step(
                view, state, status=400, errors=("That form could not be read. Please try again.",)
            )
        if not csrf_valid(view, form.get("csrf")):
            await self.portal.services.audit.log(
                "csrf.failed",
                self.portal.actor(request, view),
                outcome="refused",
                detail={"form": expected.value},
            )
            return self._step(view, state, status=400, errors=(CSRF_MESSAGE,))
        if next_step(state, view.stage) is not expected:
            return redirect("/access")
        return view, state, form

    async def code(self, request: Request) -> Response:
        posted = await self._post(request, Step.CODE)
        if isinstance(posted, Response):
            return posted
        view, state, form = posted
        actor = self.portal.actor(request, view)
        attempt = await self.recipients.check_code(view, field(form, "code"), actor)
        if attempt.outcome is Outcome.OK:
            return redirect("/access")
        if attempt.outcome is Outcome.THROTTLED:
            return self._step(
                view,
                state,
                status=429,
                errors=(
                    "There have been too many attempts from your network. Please wait 15 minutes and try again.",
                ),
            )
        if attempt.outcome is Outcome.LOCKED:
            return self._step(
                view,
                state,
                status=401,
                errors=(
                    "For your safety, after several codes that did not match, entering a code is paused. "
                    f"Please contact {self.portal.settings.practice_name}.",
                ),
            )
        return self._step(
            view,
            state,
            status=401,
            errors=("That code does not match. Please check it and try again.",),
        )

    async def consent(self, request: Request) -> Response:
        posted = await self._post(request, Step.CONSENT)
        if isinstance(posted, Response):
            return posted
        view, state, form = posted
        if field(form, "agree") != "yes":
            return self._step(
                view,
                state,
                status=400,
                errors=("Please tick the box to say you have read this notice.",),
            )
        await self.recipients.give_consent(view, self.portal.actor(request, view))
        return redirect("/access")

    async def choose(self, request: Request) -> Response:
        posted = await self._post(request, Step.CHOOSE)
        if isinstance(posted, Response):
            return posted
        view, state, form = posted
        passphrase, confirmation = field(form, "passphrase"), field(form, "confirm")
        judgement = await self.recipients.judge(passphrase, confirmation, state)
        if not judgement.ok:
            return self._step(
                view,
                state,
                status=400,
                errors=judgement.problems,
                suggestions=judgement.suggestions,
            )
        started = await self.recipients.choose_passphrase(
            view, passphrase, self.portal.actor(request, view)
        )
        if started is None:  # set meanwhile (another tab or person): sign in instead
            return redirect("/access")
        return await self._signed_in(started)

    async def sign_in(self, request: Request) -> Response:
        posted = await self._post(request, Step.SIGN_IN)
        if isinstance(posted, Response):
            return posted
        view, state, form = posted
        attempt = await self.recipients.sign_in(
            view, field(form, "passphrase"), self.portal.actor(request, view)
        )
        if attempt.outcome is Outcome.OK and attempt.started is not None:
            return await self._signed_in(attempt.started)
        if attempt.outcome is Outcome.LOCKED:
            return self._step(view, state, status=401, locked_until=attempt.locked_until)
        if attempt.outcome is Outcome.THROTTLED:
            return self._step(view, state, status=429, throttled=True)
        return self._step(
            view,
            state,
            status=401,
            errors=(
                "That passphrase does not match. Please check it and try again. "
                "Passphrases are case-sensitive.",
            ),
        )
