"""The one polling helper of the tests: wait on a condition, never on a bare sleep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def wait_for(
    condition: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.25
) -> float:
    """Poll until `condition()` holds; returns the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s:.0f}s: {what}")
        time.sleep(every_s)
    return time.monotonic() - start


async def async_wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """`wait_for` inside an event loop: polls without blocking the loop."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s:.0f}s: {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start
