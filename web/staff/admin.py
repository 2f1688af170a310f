"""Admin pages: staff accounts, the audit log (export, verification), effective settings.

Promises: every route here is for admins only; anyone else gets the neutral
404 (the pages are not confirmed to exist). Changes are CSRF-checked POSTs,
done and audited by the domain (:class:`escrow.staff.StaffDirectory`,
:class:`escrow.staff_security.StaffSecurity`). The audit export streams
:meth:`escrow.audit.Audit.export` as a CSV or JSON Lines download after
auditing ``audit.exported``. The settings view masks every secret.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from escrow.console import effective_settings
from escrow.errors import AuditChainBroken, StaffError
from escrow.models import utcnow
from web.forms import field
from web.portal import redirect
from web.staff.shell import ID, Shell, Signed

EXPORTS = {"csv": ("text/csv; charset=utf-8", "csv"), "jsonl": ("application/jsonl", "jsonl")}
DONE = {
    "added": "The account was created.",
    "disabled": "The account was disabled. Its sessions and SMTP sign-ins stop working at once.",
    "second_factor": "The second factor was reset. They will enrol a new one at their next sign-in.",
    "unlocked": "Signing in is no longer paused for this account.",
}


class AdminRoutes:
    """Staff accounts, audit and settings."""

    def __init__(self, shell: Shell) -> None:
        self.shell = shell

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/staff/admin/staff", self.staff_page, methods=["GET"]),
            Route("/staff/admin/staff", self.add_staff, methods=["POST"]),
            Route("/staff/admin/staff/{staff_id}/{action}", self.staff_action, methods=["POST"]),
            Route("/staff/admin/audit", self.audit_page, methods=["GET"]),
            Route("/staff/admin/audit/export", self.export, methods=["GET"]),
            Route("/staff/admin/audit/verify", self.verify, methods=["POST"]),
            Route("/staff/admin/settings", self.settings_page, methods=["GET"]),
        ]

    # ------------------------------------------------------------ staff accounts

    async def _staff(
        self,
        signed: Signed,
        *,
        status: int = 200,
        notice: str = "",
        errors: tuple[str, ...] = (),
        values: dict[str, str] | None = None,
    ) -> Response:
        accounts = await self.shell.console.staff_accounts()
        return self.shell.page(
            "staff/admin_staff.html",
            view=signed.view,
            staff=signed.staff,
            status=status,
            accounts=accounts,
            now=utcnow(),
            notice=notice,
            errors=errors,
            values=values or {},
            title="Staff accounts",
        )

    async def staff_page(self, request: Request) -> Response:
        signed = await self.shell.require(request, admin=True)
        if isinstance(signed, Response):
            return signed
        return await self._staff(signed, notice=DONE.get(request.query_params.get("done", ""), ""))

    async def add_staff(self, request: Request) -> Response:
        signed = await self.shell.require(request, admin=True)
        if isinstance(signed, Response):
            return signed
        form = await self.shell.form(request, signed.view, "staff.add")
        if form is None:
            return self.shell.refused(signed)
        email, name = field(form, "email").strip(), field(form, "name").strip()[:200]
        try:
            await self.shell.services.staff.add(
                email,
                field(form, "password"),
                name=name,
                admin=field(form, "admin") == "yes",
                actor=self.shell.actor(request, signed.staff.id),
            )
        except StaffError as refused:
            return await self._staff(
                signed,
                status=400,
                errors=(str(refused).capitalize() + ".",),
                values={"email": email, "name": name},
            )
        return redirect("/staff/admin/staff?done=added")

    async def staff_action(self, request: Request) -> Response:
        signed = await self.shell.require(request, admin=True)
        if isinstance(signed, Response):
            return signed
        staff_id, action = str(request.path_params["staff_id"]), str(request.path_params["action"])
        if not ID.fullmatch(staff_id) or action not in ("disable", "reset-second-factor", "unlock"):
            return self.shell.not_found(signed)
        target = await self.shell.services.staff.get(staff_id)
        if target is None:
            return self.shell.not_found(signed)
        form = await self.shell.form(request, signed.view, f"staff.{action}")
        if form is None:
            return self.shell.refused(signed)
        actor = self.shell.actor(request, signed.staff.id)
        security = self.shell.services.staff_security
        try:
            if action == "disable":
                if target.id == signed.staff.id:
                    return await self._staff(
                        signed, status=400, errors=("You cannot disable your own account.",)
                    )
                await self.shell.services.staff.disable(target.email, actor=actor)
                done = "disabled"
            elif action == "unlock":
                await security.unlock(staff_id, actor=actor)
                done = "unlocked"
            else:
                await security.reset_second_factor(staff_id, actor=actor)
                done = "second_factor"
        except StaffError as refused:
            return await self._staff(signed, status=400, errors=(str(refused).capitalize() + ".",))
        return redirect(f"/staff/admin/staff?done={done}")

    # ------------------------------------------------------------ audit

    async def audit_page(self, request: Request) -> Response:
        signed = await self.shell.require(request, admin=True)
        if isinstance(signed, Response):
            return signed
        return self.shell.page(
            "staff/admin_audit.html",
            view=signed.view,
            staff=signed.staff,
            verified=None,
            broken=None,
            title="Audit log",
        )

    async def verify(self, request: Request) -> Response:
        signed = await self.shell.require(request, admin=True)
        if isinstance(signed, Response):
            return signed
        form = await self.shell.form(request, signed.view, "audit.verify")
        if form is None:
            return self.shell.refused(signed)
        verified = broken = None
        try:
            verified = await self.shell.services.audit.verify()
        except AuditChainBroken as error:
            broken = error
        await self.shell.services.audit.log(
            "audit.verified",
            self.shell.actor(request, signed.staff.id),
            outcome="ok" if broken is None else "broken",
            detail={"first_bad": broken.seq if broken is not None else None},
        )
        return self.shell.page(
            "staff/admin_audit.html",
            view=signed.view,
            staff=signed.staff,
            verified=verified,
            broken=broken,
            title="Audit log",
        )

    async def export(self, request: Request) -> Response:
        signed = await self.shell.require(request, admin=True)
        if isinstance(signed, Response):
            return signed
        fmt = request.query_params.get("format", "jsonl")
        if fmt not in EXPORTS:
            return self.shell.not_found(signed)
        media_type, extension = EXPORTS[fmt]
        await self.shell.services.audit.log(
            "audit.exported",
            self.shell.actor(request, signed.staff.id),
            detail={"format": fmt, "via": "console"},
        )
        audit = self.shell.services.audit

        async def body() -> AsyncIterator[bytes]:
            async for chunk in audit.export(fmt):
                yield chunk.encode("utf-8")

        stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
        return StreamingResponse(
            body(),
            media_type=media_type,
            headers={
                "Content-Disposition": f'attachment; filename="audit-{stamp}.{extension}"',
                "X-Content-Type-Options": "nosniff",
            },
        )

    # ------------------------------------------------------------ settings

    async def settings_page(self, request: Request) -> Response:
        signed = await self.shell.require(request, admin=True)
        if isinstance(signed, Response):
            return signed
        return self.shell.page(
            "staff/admin_settings.html",
            view=signed.view,
            staff=signed.staff,
            rows=effective_settings(self.shell.settings),
            title="Effective settings",
        )
