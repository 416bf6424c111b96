"""The image-generation feature: validate → quota → render → store → record → respond.

Talks to the engine only through a `Renderer` (a Ray Serve handle in the farm, the engine
in-process elsewhere). Nothing is written before a request has passed every check, and a
render whose objects cannot all be stored leaves none behind.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Protocol

from sqlalchemy.exc import SQLAlchemyError

from registry.adapter_refs import AdapterRef
from registry.adapters import AdapterNotFound, RegistryError
from registry.render_limits import Admission, AdmissionRefused, RenderLimiter
from registry.storage import ObjectStore, StorageError, render_key
from registry.tenants import RenderOrigin, TenantDirectory
from serve.adapter_cache import AdapterLoadError
from serve.errors import APIError, InvalidField, StorageUnavailable, registry_unavailable
from serve.io_pools import BlockingPool, IOPools
from serve.limits import LimitGuard
from serve.moderation import ModerationService
from serve.near_duplicates import NearDuplicateService
from serve.outputs import EncodedOutput, OutputEncoder
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


class RenderScheduler(Protocol):
    """Orders renders fairly across tenants (`serve.render_queue.RenderDispatcher`): `turn`
    waits for the render's turn and holds its slot for the block."""

    def turn(self, tenant_id: str, job: RenderJob) -> AbstractAsyncContextManager[None]: ...


class AdapterLookup(Protocol):
    """Resolves a tenant's adapter reference (`serve.resolver.AdapterResolver`); `render_id`
    picks the champion or challenger of a brand's canary."""

    def resolve(
        self, tenant: str, ref: AdapterRef, scale: float, render_id: str | None = None
    ) -> AdapterSpec: ...


#: The lease of a service built without a limiter (tests, tools); the farm's is a setting.
DEFAULT_LEASE_S = 60.0


def refusal(e: AdmissionRefused) -> APIError:
    """429 for a limit that clears by itself: a render finishing, usage aging out; 403 for an
    in-flight cap of 0, a plan without renders."""
    if e.cap == 0:
        return APIError(
            403,
            f"this tenant's plan allows no renders ({e.limit}=0)",
            code=f"{e.limit}_exceeded",
        )
    if e.limit == "images_per_hour":
        return APIError(
            429,
            f"hourly image quota exceeded: {e.used} of {e.cap} images used or reserved in the "
            f"last hour, this request asks for {e.asked}",
            code="quota_exceeded",
            headers={"Retry-After": "60"},
        )
    return APIError(
        429,
        f"too many renders in flight for this tenant (limit {e.cap}); retry when one finishes",
        code="rate_limit_exceeded",
        headers={"Retry-After": "1"},
    )


#: Called after each successful render with (tenant, images rendered, adapter or None).
RenderObserver = Callable[[str, int, AdapterSpec | None], None]


def used_version(adapter: AdapterSpec | None) -> tuple[str, int] | None:
    """(brand, version) of the adapter a render used, as its usage row records it."""
    return (adapter.brand, adapter.version) if adapter is not None else None


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
        moderation: ModerationService | None = None,
        near_duplicates: NearDuplicateService | None = None,
        limiter: RenderLimiter | None = None,
        *,
        outputs: OutputEncoder,
    ) -> None:
        #: Watermarks, encodes and signs every image before it is stored or returned.
        self.outputs = outputs
        self.tenant_limits = tenant_limits
        self.moderation = moderation
        self.near_duplicates = near_duplicates
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
        self.limiter = limiter or RenderLimiter(tenants.engine, DEFAULT_LEASE_S)
        #: Where renders wait for their turn: the ingress's render dispatcher, set when it
        #: starts (`serve.services.start_background_work`). None: render at once.
        self.scheduler: RenderScheduler | None = None

    @asynccontextmanager
    async def _slot(self, tenant_id: str, images: int) -> AsyncIterator[Admission]:
        """Admit the request under the tenant's in-flight limit and hourly image quota, on
        every ingress replica at once (a slot and a reservation in the farm database). The
        lease is renewed while the request runs. Success commits both as usage
        (`RenderLimiter.commit`); any other end gives them back."""
        try:
            admission = await self.pools.db.run(
                self.limiter.admit, tenant_id, images, self.max_inflight
            )
        except AdmissionRefused as e:
            raise refusal(e) from None
        renewing = asyncio.create_task(self._renew(admission))
        try:
            yield admission
        finally:
            renewing.cancel()
            try:
                # Shielded: a second cancel (the client gone) must not leave the rows to lapse.
                await asyncio.shield(self.pools.db.run(self.limiter.release, admission))
            except SQLAlchemyError as e:  # the lease frees them; the request's own outcome wins
                log.warning("releasing a render slot failed (its lease frees it): %s", e)

    async def _renew(self, admission: Admission) -> None:
        every = self.limiter.lease.total_seconds() / 3
        while True:
            await asyncio.sleep(every)
            if admission.ended:  # committed: nothing left to hold
                return
            try:
                if not await self.pools.db.run(self.limiter.renew, admission):
                    log.warning("render lease of %s lapsed before renewal", admission.tenant_id)
            except SQLAlchemyError as e:  # the next renewal may succeed within the lease
                log.warning("renewing a render lease failed: %s", e)

    async def encode_outputs(
        self,
        tenant_id: str,
        render_id: str,
        images: list[RenderedImage],
        output_format: str = "png",
        quality: int | None = None,
        source: bytes | None = None,
    ) -> list[EncodedOutput]:
        """The output files of a render's images (watermarked, encoded, C2PA-signed; see
        `serve.outputs.OutputEncoder.encode`), made off the event loop. Every route that
        stores or returns images calls this first; `source` marks an edit of that image. The
        tenant's content policy may hide the adapter (`provenance_hide_adapter`)."""
        hide = False
        if self.moderation is not None:
            hide = (await self.moderation.policy(tenant_id)).provenance_hide_adapter

        def encode_all() -> list[EncodedOutput]:
            return [
                self.outputs.encode(
                    image.png,
                    tenant=tenant_id,
                    render_id=render_id,
                    index=i,
                    output_format=output_format,
                    quality=quality,
                    source=source,
                    hide_adapter=hide,
                )
                for i, image in enumerate(images)
            ]

        return await asyncio.to_thread(encode_all)

    def _store_all(self, tenant_id: str, render_id: str, outputs: list[EncodedOutput]) -> list[str]:
        keys: list[str] = []
        try:
            for i, output in enumerate(outputs):
                key = render_key(tenant_id, render_id, i, output.extension)
                self.store.put_bytes(key, output.data, content_type=output.content_type)
                keys.append(key)
        except StorageError:
            for key in keys:
                try:
                    self.store.delete(key)
                except StorageError:
                    log.warning("could not remove %s after a failed render store", key)
            raise
        return keys

    async def _resolve(
        self, tenant_id: str, req: ImageGenerationRequest, render_id: str
    ) -> tuple[AdapterSpec, ...]:
        """The concrete adapter versions render `render_id` uses for the adapters the request
        names, in its order: 404 if the tenant has no such brand, whichever entry names it
        (another tenant's brand is "no such"); 400 if two entries resolve to the same version.
        A canary splits each brand's production reference by the render id."""
        parsed = self.limits.adapters(req)
        if not parsed:
            return ()
        if self.adapters is None:
            raise InvalidField(parsed[0][0], "this server renders the base model only")
        specs: list[AdapterSpec] = []
        for field, ref, scale in parsed:
            try:
                spec = await self.pools.registry.run(
                    self.adapters.resolve, tenant_id, ref, scale, render_id
                )
            except AdapterNotFound as e:
                raise APIError(404, str(e), param=field, code="adapter_not_found") from None
            except RegistryError as e:
                log.error("resolving adapter %s failed: %s", ref, e)
                raise registry_unavailable() from None
            except AdapterLoadError as e:
                raise e.as_api_error() from None
            twin = next((s for s in specs if s.model_id == spec.model_id), None)
            if twin is not None:
                raise InvalidField(
                    field,
                    f"{spec.ref!r} and {twin.ref!r} are both {spec.brand} version "
                    f"{spec.version}; list each adapter version once with its scale",
                )
            specs.append(spec)
        return tuple(specs)

    async def _render(self, job: RenderJob) -> list[RenderedImage]:
        try:
            return await self.renderer.render(job)
        except AdapterLoadError as e:
            log.error("render with adapter %s failed: %s", job.adapter, e)
            raise e.as_api_error() from None

    async def _render_in_turn(self, tenant_id: str, job: RenderJob) -> list[RenderedImage]:
        """Render when the fair scheduler says it is this render's turn (sync and async
        renders share one order), holding its slot only while the replica works."""
        if self.scheduler is None:
            return await self._render(job)
        async with self.scheduler.turn(tenant_id, job):
            return await self._render(job)

    async def _moderate(
        self, tenant_id: str, req: ImageGenerationRequest, job: RenderJob | None = None
    ) -> None:
        """The content policy on every text the render uses: the prompt, the negative prompt,
        and a blend's or interpolation's prompts (400; a refusal leaves only its audit event)."""
        if self.moderation is None:
            return
        texts = {"prompt": req.prompt, "negative_prompt": req.negative_prompt}
        mixed = dict.fromkeys(
            p for mix in ((job.mixes or ()) if job else ()) for p, _ in mix.prompts
        )
        texts.update({f"prompts[{i}]": p for i, p in enumerate(mixed)})
        source = "edit" if job is not None and (job.source or job.origin or job.mixes) else None
        await self.moderation.check(
            tenant_id, source or "generation", texts, getattr(req, "moderation", None)
        )

    async def generate(self, tenant_id: str, req: ImageGenerationRequest) -> ImagesResponse:
        job = self.limits.check(req)
        return await self.render(tenant_id, req, job)

    async def render(
        self,
        tenant_id: str,
        req: ImageGenerationRequest,
        job: RenderJob,
        origin: RenderOrigin | None = None,
    ) -> ImagesResponse:
        """Admit, render, store, record and answer a checked job (`req` names its adapter and
        response format). `origin` records the stored render an operation started from; an
        edit's source image becomes the C2PA manifest's ingredient."""
        await self._moderate(tenant_id, req, job)
        if self.tenant_limits is not None:  # the storage cap (403) before any work
            await self.tenant_limits.check_stored_bytes(tenant_id)
        # The adapter lookup counts against the tenant's in-flight limit too: a tenant cannot
        # queue more than its share of lookups on the registry's pool.
        # The render id is drawn first: a canary assigns the render by it.
        render_id = secrets.token_hex(12)
        async with self._slot(tenant_id, len(job.seeds)) as admission:
            job = job.with_adapters(await self._resolve(tenant_id, req, render_id))
            adapter = job.adapter
            images = await self._render_in_turn(tenant_id, job)
            near: list[dict | None] = [None] * len(images)
            if self.near_duplicates is not None:  # a block (422) stores and charges nothing
                images, near = await self.near_duplicates.check(tenant_id, adapter, images)
            outputs = await self.encode_outputs(
                tenant_id,
                render_id,
                images,
                req.output_format,
                req.output_compression,
                source=job.source.png if job.source is not None else None,
            )
            try:
                keys = await self.pools.storage.run(self._store_all, tenant_id, render_id, outputs)
            except StorageError as e:
                log.error("storing render %s failed: %s", render_id, e)
                raise StorageUnavailable() from e
            await self.pools.db.run(
                partial(self.limiter.commit, origin=origin, adapter=used_version(adapter)),
                admission,
                render_id,
                len(images),
                self.limits.model.id,
            )
            if self.tenant_limits is not None:
                self.tenant_limits.stored(tenant_id, sum(len(o.data) for o in outputs))
        if self.on_rendered is not None:
            self.on_rendered(tenant_id, len(images), adapter)
        data = []
        for key, image, output, match in zip(keys, images, outputs, near, strict=True):
            if req.response_format == "b64_json":
                data.append(
                    ImageData(
                        seed=image.seed,
                        b64_json=base64.b64encode(output.data).decode(),
                        near_duplicate=match,
                    )
                )
            else:
                url = self.store.presigned_get(key, self.presign_expiry_s)  # no I/O: signing
                data.append(ImageData(seed=image.seed, url=url, near_duplicate=match))
        return ImagesResponse(
            id=render_id,
            created=int(time.time()),
            model=self.limits.model.id,
            data=data,
            adapter=adapter.describe() if adapter else None,
            adapters=[spec.describe() for spec in job.adapters],
            output_format=req.output_format,
            origin=origin,
        )

    # --- shared with the render queue (serve.render_queue) --------------------------------------
    async def prepare(
        self, tenant_id: str, req: ImageGenerationRequest, render_id: str
    ) -> RenderJob:
        """Every check of `generate` short of the in-flight slot (400, 403, 404), and the
        adapter version render `render_id` uses: the job to render. Nothing is written."""
        job = self.limits.check(req)
        await self._moderate(tenant_id, req)
        if self.tenant_limits is not None:
            await self.tenant_limits.check_stored_bytes(tenant_id)
        return job.with_adapters(await self._resolve(tenant_id, req, render_id))

    async def store_images(
        self,
        tenant_id: str,
        render_id: str,
        images: list[RenderedImage],
        adapter: AdapterSpec | None = None,
        output_format: str = "png",
        quality: int | None = None,
    ) -> tuple[list[str], list[dict | None]]:
        """The near-duplicate check (422 when the tenant's policy blocks a match), then the
        output files (watermarked, encoded, signed) stored all or none: their keys and each
        image's near-duplicate match. 503 when the store fails."""
        near: list[dict | None] = [None] * len(images)
        if self.near_duplicates is not None:
            images, near = await self.near_duplicates.check(tenant_id, adapter, images)
        outputs = await self.encode_outputs(tenant_id, render_id, images, output_format, quality)
        try:
            keys = await self.pools.storage.run(self._store_all, tenant_id, render_id, outputs)
        except StorageError as e:
            log.error("storing render %s failed: %s", render_id, e)
            raise StorageUnavailable() from e
        if self.tenant_limits is not None:
            self.tenant_limits.stored(tenant_id, sum(len(o.data) for o in outputs))
        return keys, near
