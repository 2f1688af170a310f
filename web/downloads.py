"""Serving message parts: safe types, safe names, never rendered by the browser as a page.

Promises: an attachment is served with ``Content-Disposition: attachment``
and an RFC 6266 file name (an ASCII fallback, and ``filename*`` in UTF-8
for anything else), ``X-Content-Type-Options: nosniff``, and its declared
type only when that type is on :data:`SAFE_TYPES`; anything else is
``application/octet-stream``. Inline images are served only for
:data:`SAFE_IMAGES` (never SVG, which can carry script).
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote

from starlette.responses import Response

SAFE_TYPES = frozenset(
    {"application/pdf", "image/png", "image/jpeg", "image/gif", "image/webp", "text/plain"}
)
SAFE_IMAGES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
_NOT_ASCII_SAFE = re.compile(r"[^A-Za-z0-9._ ()+-]")


def content_disposition(filename: str, kind: str = "attachment") -> str:
    """``attachment; filename="..."; filename*=UTF-8''...`` for an already-safe name."""
    ascii_name = unicodedata.normalize("NFKD", filename).encode("ascii", "ignore").decode("ascii")
    ascii_name = _NOT_ASCII_SAFE.sub("_", ascii_name).strip(" .") or "download"
    return f"{kind}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"


def download_type(content_type: str) -> str:
    return content_type if content_type in SAFE_TYPES else "application/octet-stream"


def part_response(
    data: bytes, filename: str, content_type: str, *, inline: bool = False
) -> Response:
    """The bytes of a part, as a download (or, for a safe image, inline in the page)."""
    return Response(
        data,
        media_type=content_type if inline else download_type(content_type),
        headers={
            "Content-Disposition": content_disposition(
                filename, "inline" if inline else "attachment"
            ),
            "X-Content-Type-Options": "nosniff",
        },
    )
