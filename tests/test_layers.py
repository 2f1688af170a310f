"""The layers of the design (README, "Design and security"), checked on the source: keys <- escrow <- smtp, web.

Only ``keys/`` speaks PGPy. ``keys/`` and ``escrow/`` import no SMTP or web
framework and none of the upper packages, except ``escrow/cli.py``, the one
composition root, which starts ``smtp/`` and ``web/``. Tests are not scanned:
they may cross layers to check them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("keys", "escrow", "smtp", "web")
FRAMEWORKS = {"smtp", "web", "starlette", "aiosmtpd", "aiosmtplib", "uvicorn"}
# The composition root may start the upper layers. It also builds the uvicorn
# server that runs web/'s application, so that one framework is allowed too.
COMPOSITION_ROOT = Path("escrow/cli.py")
COMPOSITION_ROOT_MAY_IMPORT = {"smtp", "web", "uvicorn"}


def source_files() -> Iterator[Path]:
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def imported_modules(source: str, package: tuple[str, ...]) -> set[str]:
    """Top-level names of every module ``source`` (a module of ``package``) imports,
    however it spells the import."""
    tree = ast.parse(source)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                found.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                found.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return {name.split(".")[0] for name in found if name}


IMPORTS = {
    path.relative_to(ROOT): imported_modules(
        path.read_text(encoding="utf-8"), path.relative_to(ROOT).parts[:-1]
    )
    for path in source_files()
}


def test_the_scan_sees_the_source() -> None:
    """Guard against a scan that passes because it read nothing."""
    assert Path("escrow/vault.py") in IMPORTS
    assert "keys" in IMPORTS[Path("escrow/vault.py")]
    assert "web" in IMPORTS[COMPOSITION_ROOT]
    assert any("pgpy" in names for path, names in IMPORTS.items() if path.parts[0] == "keys")


def test_the_scan_sees_every_spelling_of_an_import() -> None:
    source = (
        "from . import store\n"
        "from ..vault import Vault\n"
        "import importlib, aiosmtpd.smtp as smtpd\n"
        "importlib.import_module('pgpy.constants')\n"
        "__import__('uvicorn')\n"
    )
    assert imported_modules(source, ("escrow", "sub")) == {
        "escrow",
        "importlib",
        "aiosmtpd",
        "pgpy",
        "uvicorn",
    }


@pytest.mark.parametrize("path", sorted(IMPORTS), ids=str)
def test_only_keys_imports_pgpy(path: Path) -> None:
    if path.parts[0] != "keys":
        assert "pgpy" not in IMPORTS[path]


@pytest.mark.parametrize(
    "path", sorted(p for p in IMPORTS if p.parts[0] in {"keys", "escrow"}), ids=str
)
def test_domain_and_keys_import_no_framework_or_upper_layer(path: Path) -> None:
    allowed = COMPOSITION_ROOT_MAY_IMPORT if path == COMPOSITION_ROOT else set()
    assert IMPORTS[path] & FRAMEWORKS <= allowed


@pytest.mark.parametrize("path", sorted(p for p in IMPORTS if p.parts[0] == "keys"), ids=str)
def test_keys_does_not_import_the_domain(path: Path) -> None:
    assert "escrow" not in IMPORTS[path]
