"""The image-generation feature: validate → quota → render → store → record → respond.

Talks to the engine only through a `Renderer` (a Ray Serve handle in the farm, the engine
in-process elsewhere). Nothing is written before a request has passed every check, and a
render whose objects cannot all be stored leaves none behind.
"""

from __future__ import annotations

import base64
import dataclasses
import secrets
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Protocol

from registry.adapter_refs import AdapterRef
from registry.adapters import AdapterNotFound, RegistryError
from registry.storage import ObjectStore, StorageError, render_key
from registry.tenants import RenderOrigin, TenantDirectory
from serve.adapter_cache import AdapterLoadError
from serve.errors import APIError, InvalidField, StorageUnavailable, registry_unavailable
from serve.io_pools import BlockingPool, IOPools
from serve.limits import LimitGuard
from serve.protocol import (
    AdapterSpec,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    RenderedImage,
    RenderJob,
    RenderLimits,
)
from serve.request_context import request_logger

log = request_logger(__name__)


class Renderer(Protocol):
    """Where images are made. Raise `APIError(503, ...)` when no capacity is available and
    `AdapterLoadError` when the job's adapter cannot be used."""

    async def render(self, job: RenderJob) -> list[RenderedImage]: ...


class AdapterLookup(Protocol):
    """Resolves a tenant's adapter reference (`serve.resolver.AdapterResolver`)."""

    def resolve(self, tenant: str, ref: AdapterRef, scale: float) -> AdapterSpec: ...


#: Called after each successful render with (tenant, images rendered, adapter or None).
RenderObserver = Callable[[str, int, AdapterSpec | None], None]


class ImageService:
    def __init__(
        self,
        limits: RenderLimits,
        renderer: Renderer,
        store: ObjectStore,
        tenants: TenantDirectory,
        presign_expiry_s: int,
        max_inflight_per_tenant: int,
        adapters: AdapterLookup | None = None,
        on_rendered: RenderObserver | None = None,
        tenant_limits: LimitGuard | None = None,
        pools: IOPools | None = None,
    ) -> None:
        self.tenant_limits = tenant_limits
        # Blocking calls run on bounded pools, one per dependency, so that a hung registry
        # (adapter lookups) cannot take the threads base-model renders store and record with.
        self.pools = pools or IOPools(
            BlockingPool("registry", 4), BlockingPool("storage", 8), BlockingPool("db", 4)
        )
        self.adapters = adapters
        self.on_rendered = on_rendered
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
            tenant = await self.pools.db.run(self.tenants.get_tenant, tenant_id)
            quota = tenant.images_per_hour if tenant else None
            if quota is not None:
                used = await self.pools.db.run(self.tenants.images_in_last_hour, tenant_id)
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

    async def _resolve(self, tenant_id: str, req: ImageGenerationRequest) -> AdapterSpec | None:
        """The concrete adapter version the request names (404 if the tenant has no such)."""
        parsed = self.limits.adapter(req)
        if parsed is None:
            return None
        if self.adapters is None:
            raise InvalidField("adapter", "this server renders the base model only")
        ref, scale = parsed
        try:
            return await self.pools.registry.run(self.adapters.resolve, tenant_id, ref, scale)
        except AdapterNotFound as e:
            raise APIError(404, str(e), param="adapter", code="adapter_not_found") from None
        except RegistryError as e:
            log.error("resolving adapter %s failed: %s", ref, e)
            raise registry_unavailable() from None
        except AdapterLoadError as e:
            raise e.as_api_error() from None

    async def _render(self, job: RenderJob) -> list[RenderedImage]:
        try:
            return await self.renderer.render(job)
        except AdapterLoadError as e:
            log.error("render with adapter %s failed: %s", job.adapter, e)
            raise e.as_api_error() from None

    async def generate(self, tenant_id: str, req: ImageGenerationRequest) -> ImagesResponse:
        return await self.render(tenant_id, req, self.limits.check(req))

    async def render(
        self,
        tenant_id: str,
        req: ImageGenerationRequest,
        job: RenderJob,
        origin: RenderOrigin | None = None,
    ) -> ImagesResponse:
        """Admit, render, store, record and answer a checked job (`req` names its adapter and
        response format). `origin` records the stored render an operation started from."""
        if self.tenant_limits is not None:  # the storage cap (403) before any work
            await self.tenant_limits.check_stored_bytes(tenant_id)
        # The adapter lookup counts against the tenant's in-flight limit too: a tenant cannot
        # queue more than its share of lookups on the registry's pool.
        async with self._slot(tenant_id, len(job.seeds)):
            adapter = await self._resolve(tenant_id, req)
            job = dataclasses.replace(job, adapter=adapter)
            images = await self._render(job)
            render_id = secrets.token_hex(12)
            try:
                keys = await self.pools.storage.run(self._store_all, tenant_id, render_id, images)
            except StorageError as e:
                log.error("storing render %s failed: %s", render_id, e)
                raise StorageUnavailable() from e
            await self.pools.db.run(
                partial(self.tenants.record_render, origin=origin),
                render_id,
                tenant_id,
                len(images),
                self.limits.model.id,
            )
            if self.tenant_limits is not None:
                self.tenant_limits.stored(tenant_id, sum(len(im.png) for im in images))
        if self.on_rendered is not None:
            self.on_rendered(tenant_id, len(images), adapter)
        data = []
        for key, image in zip(keys, images, strict=True):
            if req.response_format == "b64_json":
                data.append(
                    ImageData(seed=image.seed, b64_json=base64.b64encode(image.png).decode())
                )
            else:
                url = self.store.presigned_get(key, self.presign_expiry_s)  # no I/O: signing
                data.append(ImageData(seed=image.seed, url=url))
        return ImagesResponse(
            id=render_id,
            created=int(time.time()),
            model=self.limits.model.id,
            data=data,
            adapter=adapter.describe() if adapter else None,
            origin=origin,
        )
