"""A `Renderer` over an in-process `DiffusionEngine`: the API without Ray (plain uvicorn on one
box, the fast test tier). Adapters come through the same tiers a replica uses: the host-RAM
cache, else the object store, verified against the registry's sha256.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from serve.adapter_cache import AdapterFetcher, AdapterWeights, HostAdapterCache, parse_weights
from serve.protocol import AdapterSpec, RenderedImage, RenderJob


class EngineRenderer:
    """Renders on `engine` (a `serve.engine.DiffusionEngine`) in a worker thread. The engine
    serialises renders itself; a cancelled request stops waiting, its render runs out."""

    def __init__(
        self,
        engine,  # noqa: ANN001 - serve.engine.DiffusionEngine (torch is not imported here)
        fetcher: AdapterFetcher | None = None,
        host_cache: HostAdapterCache | None = None,
    ) -> None:
        self.engine = engine
        self.fetcher = fetcher
        self.host = host_cache or HostAdapterCache(256 * 1024 * 1024)
        self._fetch_lock = threading.Lock()

    def _weights(self, spec: AdapterSpec) -> AdapterWeights:
        with self._fetch_lock:  # one fetch per adapter, not one per concurrent request
            weights = self.host.get(spec.model_id, spec.sha256)
            if weights is None:
                if self.fetcher is None:
                    raise ValueError("this renderer has no adapter fetcher")
                weights = parse_weights(spec, self.fetcher.fetch(spec))
                self.host.put(weights)
            return weights

    async def _all_weights(self, job: RenderJob) -> list[AdapterWeights]:
        return [await asyncio.to_thread(self._weights, spec) for spec in job.adapters]

    async def render(self, job: RenderJob) -> list[RenderedImage]:
        weights = await self._all_weights(job)
        return await asyncio.to_thread(self.engine.generate, job, weights)

    async def render_progress(
        self, job: RenderJob, on_progress: Callable[[int, int], None]
    ) -> list[RenderedImage]:
        """`render`, calling `on_progress(done, total)` (image-steps) on this event loop as the
        engine steps. Cancelling it makes the job's rows leave the engine's batch."""
        weights = await self._all_weights(job)
        loop = asyncio.get_running_loop()

        def report(done: int, total: int) -> None:  # the engine thread
            loop.call_soon_threadsafe(on_progress, done, total)

        future = self.engine.submit(job, weights, None, report)
        try:
            return await asyncio.wrap_future(future)
        finally:
            future.cancel()
