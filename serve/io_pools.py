"""Bounded thread pools for the ingress's blocking I/O: one each for the adapter registry
(MLflow), the object store and the database.

Separate pools are the isolation: a hung MLflow can fill the registry pool, never the threads
that store a base-model render or record it. Each call keeps the request's context (request id
and tenant for the log lines), as `asyncio.to_thread` does.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from registry.settings import Settings

T = TypeVar("T")


class BlockingPool:
    """A fixed number of threads for one kind of blocking call."""

    def __init__(self, name: str, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"{name} pool needs at least one worker, got {workers}")
        self.name = name
        self.workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"bf-{name}")

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on this pool's threads. Cancelling the await stops waiting (the
        call itself ends on its own, bounded by its client's timeout)."""
        context = contextvars.copy_context()
        call = functools.partial(context.run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class IOPools:
    registry: BlockingPool
    storage: BlockingPool
    db: BlockingPool

    @classmethod
    def from_settings(cls, settings: Settings) -> IOPools:
        return cls(
            registry=BlockingPool("registry", settings.registry_io_threads),
            storage=BlockingPool("storage", settings.storage_io_threads),
            db=BlockingPool("db", settings.db_io_threads),
        )

    def shutdown(self) -> None:
        for pool in (self.registry, self.storage, self.db):
            pool.shutdown()
