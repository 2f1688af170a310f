"""Message HTML made safe to show inside a portal page (nh3).

Promises for :func:`display_html`:

* No script, no event handlers, no ``javascript:`` or ``data:`` URLs, no
  forms, frames, objects, ``<meta>``, ``<base>``, ``<link>`` or ``<style>``,
  and no ``style`` attributes: the page's CSP would block inline styles
  anyway, and CSS is a channel for tracking and spoofing.
* Nothing loads from elsewhere: an ``<img>`` keeps its ``src`` only when it
  is ``cid:`` and names an image of this message, rewritten to the portal's
  own route; every other ``src`` (remote, relative, protocol-relative,
  ``data:``) is dropped, as are ``srcset``, ``background`` and ``poster``.
* Links keep only ``http``, ``https`` and ``mailto`` targets, open in a new
  tab, and carry ``rel="noopener noreferrer nofollow"``; following one is
  the reader's choice and sends no referrer.
* Comments are removed; ids and classes are removed, so the message cannot
  restyle or spoof the page around it. Images without ``alt`` get an empty
  one, so screen readers skip them.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import nh3

TAGS = (set(nh3.ALLOWED_TAGS) - {"area", "map"}) | {"font", "section", "main"}
ATTRIBUTES: dict[str, set[str]] = {
    "a": {"href", "title"},
    "img": {"src", "alt", "width", "height", "title"},
    "td": {"colspan", "rowspan", "align"},
    "th": {"colspan", "rowspan", "align", "scope"},
    "ol": {"start"},
    "abbr": {"title"},
    "p": {"align"},
    "div": {"align"},
}
# nh3 writes ``<img`` then its attributes; one without ``alt`` gets an empty one (decorative).
_IMG_WITHOUT_ALT = re.compile(r"<img(?![^>]*\salt=)")
CLEAN_CONTENT = {"script", "style", "title", "template", "noscript", "textarea", "select", "button"}


_LINK_SCHEMES = ("http:", "https:", "mailto:")


def _link(value: str) -> str | None:
    compact = "".join(ch for ch in value if ch > " ").lower()
    return value if compact.startswith(_LINK_SCHEMES) else None


def display_html(html: str, image_url: Callable[[str], str | None]) -> str:
    """Sanitised ``html``; ``image_url(cid)`` gives the portal URL of an inline image or None."""
    ours: set[str] = set()

    def attribute_filter(tag: str, attribute: str, value: str) -> str | None:
        if attribute == "src":
            if tag == "img" and value[:4].lower() == "cid:":
                url = image_url(value[4:].strip().strip("<>"))
                if url is not None:
                    ours.add(url)
                return url
            return None
        if attribute == "href":
            return _link(value)
        return value

    def relative(url: str) -> str | None:
        # nh3 checks URLs after the filter: the only relative ones left are our image routes.
        return url if url in ours else None

    cleaned = nh3.clean(
        html,
        tags=TAGS,
        clean_content_tags=CLEAN_CONTENT,
        attributes=ATTRIBUTES,
        url_schemes={"http", "https", "mailto", "cid"},  # cid: only reaches the filter
        url_relative=relative,
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
        attribute_filter=attribute_filter,
        set_tag_attribute_values={"a": {"target": "_blank"}},
    )
    return _IMG_WITHOUT_ALT.sub('<img alt=""', cleaned)
