"""Fixtures for the browser tests (see :mod:`tests.browser.support`)."""

from tests.browser.support import sink

__all__ = ["sink"]
