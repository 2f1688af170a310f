"""Reading form posts with hard limits, keeping uploads in memory.

Promises:

* A body larger than its limit is refused (:class:`FormTooLarge`) while it
  streams in, whether or not it declared a Content-Length.
* Uploaded files stay in memory (they are health information and must not
  land in a temporary file in clear); the size limit bounds that memory.
* Malformed bodies raise :class:`FormInvalid`; nothing of their content is
  logged.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncGenerator

from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import Request

SMALL_FORM_BYTES = 64 * 1024


class FormTooLarge(Exception):
    """The body exceeded its limit."""


class FormInvalid(Exception):
    """The body could not be parsed as a form."""


class _InMemoryMultiPartParser(MultiPartParser):
    # Never roll uploads over to a temporary file on disk; the body limit bounds memory.
    spool_max_size = sys.maxsize


async def _limited(request: Request, max_bytes: int) -> AsyncGenerator[bytes, None]:
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > max_bytes:
            raise FormTooLarge
        yield chunk


async def read_form(
    request: Request,
    *,
    max_bytes: int = SMALL_FORM_BYTES,
    max_files: int = 0,
    max_fields: int = 20,
    max_field_bytes: int = 1024 * 1024,
) -> FormData:
    """The parsed form; raises :class:`FormTooLarge` or :class:`FormInvalid`."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise FormTooLarge
    content_type, _ = parse_options_header(request.headers.get("content-type", ""))
    stream = _limited(request, max_bytes)
    try:
        if content_type == b"multipart/form-data":
            parser = _InMemoryMultiPartParser(
                request.headers,
                stream,
                max_files=max_files,
                max_fields=max_fields,
                max_part_size=max_field_bytes,
            )
            return await parser.parse()
        if content_type == b"application/x-www-form-urlencoded":
            form_parser = FormParser(
                request.headers, stream, max_fields=max_fields, max_part_size=max_field_bytes
            )
            return await form_parser.parse()
    except MultiPartException:
        raise FormInvalid from None
    finally:
        await stream.aclose()
    return FormData()


def field(form: FormData, name: str) -> str:
    """A text field's value, or "" if it is missing or is a file."""
    value = form.get(name)
    return value if isinstance(value, str) else ""
