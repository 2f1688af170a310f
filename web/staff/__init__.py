"""The staff console under ``/staff/``: sign-in, sent messages, recipients, admin.

:func:`install_console` adds its routes to the app built by
:func:`web.app.create_app`. It reuses the portal's security middleware,
neutral error pages and static files, so call it after
:func:`web.routes.install_portal`.
"""

from __future__ import annotations

from starlette.applications import Starlette

from escrow.console import Console
from escrow.services import Services
from web.pages import Pages
from web.staff.admin import AdminRoutes
from web.staff.auth import AuthRoutes
from web.staff.devices import DeviceRoutes
from web.staff.messages import MessageRoutes
from web.staff.recipients import RecipientRoutes
from web.staff.shell import Shell


def install_console(app: Starlette, services: Services) -> Shell:
    """Add the console's routes to ``app`` (after the portal's; see the module docstring)."""
    console = Console(
        services.settings, services.db, services.vault, services.audit, services.portal.recorder
    )
    shell = Shell(services, Pages(services.settings), console)
    for group in (
        AuthRoutes(shell),
        MessageRoutes(shell),
        RecipientRoutes(shell),
        DeviceRoutes(shell),
        AdminRoutes(shell),
    ):
        app.router.routes.extend(group.routes())
    return shell
