"""The image-generation feature: validate → quota → render → store → record → respond.

Talks to the engine only through a `Renderer` (a Ray Serve handle in the farm, the engine
in-process elsewhere). Nothing is written before a request has passed every check, and a
render whose objects cannot all be stored leaves none behind.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections import defaultdict
from contextlib import asynccontextmanager
from typing import Protocol

from registry.storage import ObjectStore, StorageError, render_key
from registry.tenants import TenantDirectory
from serve.errors import APIError, StorageUnavailable
from serve.protocol import (
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    RenderedImage,
    RenderJob,
    RenderLimits,
)

log = logging.getLogger(__name__)


class Renderer(Protocol):
    """Where images are made. Raise `APIError(503, ...)` when no capacity is available."""

    async def render(self, job: RenderJob) -> list[RenderedImage]: ...


class LocalRenderer:
    """Runs an in-process `DiffusionEngine` in a worker thread (no Ray)."""

    def __init__(self, engine) -> None:  # noqa: ANN001 - a serve.engine.DiffusionEngine
        self.engine = engine

    async def render(self, job: RenderJob) -> list[RenderedImage]:
        return await asyncio.to_thread(self.engine.generate, job)


class ImageService:
    def __init__(
        self,
        limits: RenderLimits,
        renderer: Renderer,
        store: ObjectStore,
        tenants: TenantDirectory,
        presign_expiry_s: int,
        max_inflight_per_tenant: int,
    ) -> None:
        self.limits = limits
        self.renderer = renderer
        self.store = store
        self.tenants = tenants
        self.presign_expiry_s = presign_expiry_s
        self.max_inflight = max_inflight_per_tenant
        self._inflight: dict[str, int] = defaultdict(int)

    @asynccontextmanager
    async def _slot(self, tenant_id: str, images: int):
        """Admit the request under the tenant's concurrency limit and hourly image quota."""
        if self._inflight[tenant_id] >= self.max_inflight:
            raise APIError(
                429,
                f"too many renders in flight for this tenant (limit {self.max_inflight}); "
                "retry when one finishes",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self._inflight[tenant_id] += 1
        try:
            tenant = await asyncio.to_thread(self.tenants.get_tenant, tenant_id)
            quota = tenant.images_per_hour if tenant else None
            if quota is not None:
                used = await asyncio.to_thread(self.tenants.images_in_last_hour, tenant_id)
                if used + images > quota:
                    raise APIError(
                        429,
                        f"hourly image quota exceeded: {used} of {quota} images used in the "
                        f"last hour, this request asks for {images}",
                        code="quota_exceeded",
                        headers={"Retry-After": "60"},
                    )
            yield
        finally:
            self._inflight[tenant_id] -= 1

    def _store_all(self, tenant_id: str, render_id: str, images: list[RenderedImage]) -> list[str]:
        keys: list[str] = []
        try:
            for i, image in enumerate(images):
                key = render_key(tenant_id, render_id, i)
                self.store.put_bytes(key, image.png, content_type="image/png")
                keys.append(key)
        except StorageError:
            for key in keys:
                try:
                    self.store.delete(key)
                except StorageError:
                    log.warning("could not remove %s after a failed render store", key)
            raise
        return keys

    async def generate(self, tenant_id: str, req: ImageGenerationRequest) -> ImagesResponse:
        job = self.limits.check(req)
        async with self._slot(tenant_id, len(job.seeds)):
            images = await self.renderer.render(job)
            render_id = secrets.token_hex(12)
            try:
                keys = await asyncio.to_thread(self._store_all, tenant_id, render_id, images)
            except StorageError as e:
                log.error("storing render %s failed: %s", render_id, e)
                raise StorageUnavailable() from e
            await asyncio.to_thread(
                self.tenants.record_render, render_id, tenant_id, len(images), self.limits.model.id
            )
        data = []
        for key, image in zip(keys, images, strict=True):
            if req.response_format == "b64_json":
                data.append(
                    ImageData(seed=image.seed, b64_json=base64.b64encode(image.png).decode())
                )
            else:
                url = self.store.presigned_get(key, self.presign_expiry_s)
                data.append(ImageData(seed=image.seed, url=url))
        return ImagesResponse(
            id=render_id, created=int(time.time()), model=self.limits.model.id, data=data
        )
