"""Keeping a long-running server's memory where the messages are.

A message up to ``ESCROW_MAX_MESSAGE_MB`` passes through several buffers of
its own size (SMTP lines, the joined message, its ciphertext). glibc serves
such blocks with ``mmap`` and gives them back on ``free`` — until the first
one is freed, after which its "dynamic threshold" rises to that size and
later large blocks come from per-thread heaps that are never returned. Under
ten concurrent 20 MB messages that doubles the peak resident size
(``bench/intake.py``: about 600 MB with the dynamic threshold, 375 MB with a
fixed one).

The cyclic garbage collector's full collections walk every live object. After
start-up that is mostly modules, classes and compiled SQL that live as long as
the process; walking them took up to 90 ms a time, a pause every request in
flight waited out (``bench/reading.py``). :func:`freeze_start_up_objects`
moves them out of the collector's sight once the server is built.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import platform

log = logging.getLogger(__name__)

# mallopt(3) parameter number of M_MMAP_THRESHOLD in glibc's <malloc.h>.
_M_MMAP_THRESHOLD = -3
# Blocks this large and larger always come from mmap and go back to the system when freed.
MMAP_THRESHOLD_BYTES = 1024 * 1024


def return_large_blocks_to_the_system() -> bool:
    """Fix glibc's mmap threshold (see the module notes); False where that does not apply."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        done = False
    if not done:
        log.debug("could not set the malloc mmap threshold")
    return done


def freeze_start_up_objects() -> int:
    """Exempt everything alive now from later collections; returns how many objects that is.

    Call once, when the server is built and before it serves. Objects frozen
    here are never freed, so nothing per-request may be alive at that point.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
