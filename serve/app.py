"""The Ray Serve application: an ingress deployment (FastAPI) and the diffusion replicas.

Both are thin: the ingress builds `serve.api.create_api` from its services, the replica wraps a
`serve.engine.DiffusionEngine`. `build_app(settings)` is what `brandfarm up` deploys.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from registry.adapters import AdapterRegistry
from registry.base_models import BaseModelInfo
from registry.settings import Settings
from registry.storage import ObjectStore
from serve import replica_state
from serve.adapter_cache import (
    AdapterFetcher,
    AdapterLoadError,
    AdapterWeights,
    HostAdapterCache,
    parse_weights,
)
from serve.api import create_api
from serve.errors import ServiceUnavailable
from serve.placement import ingress_deployment_options, replica_deployment_options
from serve.protocol import AdapterSpec, RenderedImage, RenderJob
from serve.services import build_services, start_background_work

APP_NAME = "brandfarm"
log = logging.getLogger(__name__)


MIB = 1024 * 1024
_MAX_SPECS = 4096


class ResidentAdapter:
    """What Serve's multiplexer holds for one adapter id on a replica: its parsed weights.

    The multiplexer calls `__del__` when it evicts the adapter (least recently used beyond
    `max_adapters_per_replica`); that queues the adapter's removal from the pipeline. Python
    calls it again when the object is collected, hence the flag.
    """

    def __init__(self, engine, weights: AdapterWeights) -> None:  # noqa: ANN001 - DiffusionEngine
        self.engine = engine
        self.weights = weights
        self._released = False

    def __del__(self) -> None:
        if not self._released:
            self._released = True
            self.engine.release_adapter(self.weights.model_id)


@serve.deployment(name="DiffusionReplica")
class DiffusionReplica:
    """One warm pipeline plus its brand adapters (see `serve.adapter_cache` for the tiers).

    Requests name their adapter version through Serve's `multiplexed_model_id`, so the router
    prefers replicas that already hold it. The engine batches the images of all requests in the
    replica (up to `max_batch_images`, any brands, each with its own adapter and scale); a
    request joins the running batch at the next denoising step. Requests beyond
    `max_ongoing_requests` wait at the handle (503 `overloaded` past `max_queued_requests`). A
    request whose caller goes away (Serve cancels `render`) or whose `render_timeout_s` passes
    leaves the batch at the next step.
    """

    def __init__(self, settings: Settings, model: BaseModelInfo) -> None:
        from serve.engine import DiffusionEngine  # torch is imported on replicas only

        self.batch_size = metrics.Histogram(
            "brandfarm_batch_size",
            description="Images denoised together in one step.",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
        )
        self.queue_wait = metrics.Histogram(
            "brandfarm_queue_wait_seconds",
            description="Time an image waited in the replica before joining a batch.",
            boundaries=[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
        )
        self.joined_mid_batch = metrics.Counter(
            "brandfarm_rows_joined_mid_batch",
            description="Images that joined a batch already running (continuous batching).",
        )

        def on_admit(waited_s: float, joined: bool) -> None:
            self.queue_wait.observe(waited_s)
            if joined:
                self.joined_mid_batch.inc()

        self.engine = DiffusionEngine.load(
            model,
            settings.device,
            max_adapters=settings.max_adapters_per_replica,
            max_batch_images=settings.max_batch_images,
            batch_wait_s=settings.batch_wait_ms / 1000,
            exact_pixels=settings.exact_batch_pixels,
            on_step=lambda size: self.batch_size.observe(size),
            on_admit=on_admit,
        )
        self.render_timeout_s = settings.render_timeout_s
        self.host = HostAdapterCache(settings.adapter_host_cache_mb * MIB)
        registry_uri = settings.resolved_mlflow_uri

        def via_mlflow(uri: str, folder: Path) -> Path:

            return AdapterRegistry(registry_uri).fetch_weights_uri(uri, folder)

        self.fetcher = AdapterFetcher(
            ObjectStore.from_settings(settings, bucket=settings.mlflow_artifacts_bucket),
            via_mlflow,
        )
        self._specs: dict[str, AdapterSpec] = {}
        self._waiting = 0
        self._published: tuple | None = None

        async def load_adapter(model_id: str) -> ResidentAdapter:
            # A plain function: Serve keeps its multiplexer as an attribute of what it wraps,
            # which a bound method cannot hold.
            return await self._load_adapter_by_id(model_id)

        self._adapter = serve.multiplexed(
            max_num_models_per_replica=settings.max_adapters_per_replica
        )(load_adapter)
        self.cache_hits = metrics.Counter(
            "brandfarm_adapter_cache_hits",
            description="Adapter lookups answered by a cache tier (pipeline, host).",
            tag_keys=("tier",),
        )
        self.cache_misses = metrics.Counter(
            "brandfarm_adapter_cache_misses",
            description="Adapter lookups a cache tier (pipeline, host) could not answer.",
            tag_keys=("tier",),
        )
        self.load_seconds = metrics.Histogram(
            "brandfarm_adapter_load_seconds",
            description="Time to make an adapter usable, by where its weights came from.",
            boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
            tag_keys=("source",),
        )
        self.queue_depth = metrics.Gauge(
            "brandfarm_replica_queue_depth",
            description="Render requests in this replica: waiting for the engine or rendering.",
        )
        self.queue_depth.set(0)
        self._publish()

    async def render(
        self, job: RenderJob, on_progress: Callable[[int, int], None] | None = None
    ) -> list[RenderedImage]:
        self._waiting += 1
        self.queue_depth.set(self._waiting)
        try:
            routed = serve.get_multiplexed_model_id()
            if job.adapter is not None and routed != job.adapter.model_id:
                # The ingress always sets both from one resolution.
                raise RuntimeError(
                    f"request routed for {routed!r} carries adapter {job.adapter.model_id!r}"
                )
            weights = [await self._weights_for(spec) for spec in job.adapters]
            timeout = self.render_timeout_s
            deadline = None if timeout is None else time.monotonic() + timeout
            # Cancelling this coroutine (the caller went away) cancels the engine's future,
            # and the request's images leave the batch at the next step.
            return await asyncio.wrap_future(
                self.engine.submit(job, weights, deadline, on_progress)
            )
        finally:
            self._waiting -= 1
            self.queue_depth.set(self._waiting)
            self._publish()

    async def render_stream(self, job: RenderJob) -> AsyncIterator[tuple]:
        """`render`, streamed (a handle with `stream=True`): `("progress", done, total)` in
        image-steps as the engine steps (the latest only, when the caller reads slower), then
        `("images", [RenderedImage, ...])`. Closing the stream cancels the render."""
        loop = asyncio.get_running_loop()
        latest: asyncio.Queue = asyncio.Queue()

        def on_progress(done: int, total: int) -> None:  # the engine thread
            loop.call_soon_threadsafe(latest.put_nowait, (done, total))

        rendering = asyncio.ensure_future(self.render(job, on_progress))
        try:
            while True:
                update = asyncio.ensure_future(latest.get())
                await asyncio.wait({rendering, update}, return_when=asyncio.FIRST_COMPLETED)
                if not update.done():
                    update.cancel()
                elif not rendering.done():
                    done, total = update.result()
                    while not latest.empty():
                        done, total = latest.get_nowait()
                    yield ("progress", done, total)
                if rendering.done():
                    yield ("images", rendering.result())
                    return
        finally:
            rendering.cancel()

    async def _weights_for(self, spec: AdapterSpec) -> AdapterWeights:
        """The adapter's weights through Serve's multiplexer (which loads it if need be). A
        job that combines several adapters was routed by its first one; the others load here
        through the same multiplexer, so they count against the same LRU and show in routing."""
        tier = self.cache_hits if self.engine.has_adapter(spec.model_id) else self.cache_misses
        tier.inc(tags={"tier": "pipeline"})
        if len(self._specs) >= _MAX_SPECS:
            self._specs.clear()
        self._specs[spec.model_id] = spec  # what the loader needs beyond the id
        resident: ResidentAdapter = await self._adapter(spec.model_id)
        return resident.weights

    async def _load_adapter_by_id(self, model_id: str) -> ResidentAdapter:
        """Serve's multiplexed loader: host-RAM tier, else the object store; then the pipeline.
        Nothing is cached unless the adapter verified and loaded into the pipeline."""
        spec = self._specs[model_id]
        started = time.perf_counter()
        weights = self.host.get(model_id, spec.sha256)
        if weights is not None:
            self.cache_hits.inc(tags={"tier": "host"})
            source = "host"
        else:
            self.cache_misses.inc(tags={"tier": "host"})
            source = "store"
            data = await asyncio.to_thread(self.fetcher.fetch, spec)
            weights = await asyncio.to_thread(parse_weights, spec, data)
        await asyncio.to_thread(self.engine.load_adapter, weights, spec)
        if source == "store":
            self.host.put(weights)
        self.load_seconds.observe(time.perf_counter() - started, tags={"source": source})
        self._publish()
        return ResidentAdapter(self.engine, weights)

    def _publish(self) -> None:
        """Tell `brandfarm status` what this replica holds, when that changed."""
        state = (tuple(self.engine.loaded_adapters()), tuple(self.host.model_ids()))
        if state == self._published:
            return
        self._published = state
        context = ray.get_runtime_context()
        try:
            replica_state.publish(
                context.get_actor_name() or context.get_actor_id(),
                {
                    "node_id": context.get_node_id(),
                    "adapters": list(state[0]),
                    "host_cached": list(state[1]),
                    "host_cache_bytes": self.host.nbytes,
                },
            )
        except Exception as e:  # noqa: BLE001 - status is best effort, rendering is not
            log.warning("could not publish replica state: %s", e)

    def check_health(self) -> None:
        if self.engine.pipeline is None:
            raise RuntimeError("pipeline not loaded")


class ServeRenderer:
    """A `Renderer` over the replica deployment's handle. The adapter version picks the
    multiplexed model id (set here, never taken from the client); Ray's capacity errors and a
    replica lost mid-request become a retryable 503, and a replica's `AdapterLoadError` comes
    back as itself."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def render(self, job: RenderJob) -> list[RenderedImage]:
        model_id = job.adapter.model_id if job.adapter else ""
        response = self.handle.options(multiplexed_model_id=model_id).render.remote(job)
        with self._errors(response):
            return await response

    async def render_progress(
        self, job: RenderJob, on_progress: Callable[[int, int], None]
    ) -> list[RenderedImage]:
        """`render` over the replica's streaming method, calling `on_progress(done, total)`
        (image-steps) as the replica reports them."""
        model_id = job.adapter.model_id if job.adapter else ""
        handle = self.handle.options(multiplexed_model_id=model_id, stream=True)
        stream = handle.render_stream.remote(job)
        with self._errors(stream):
            async for kind, *rest in stream:
                if kind == "progress":
                    on_progress(*rest)
                else:
                    return rest[0]
        raise RuntimeError("the replica's render stream ended without images")

    @staticmethod
    @contextmanager
    def _errors(response) -> Iterator[None]:  # noqa: ANN001 - a response or response stream
        try:
            yield
        except asyncio.CancelledError:
            # The client went away (Serve cancels the ingress request): cancel the render too,
            # so the replica does not keep working for no one.
            response.cancel()
            raise
        except (BackPressureError, DeploymentUnavailableError) as e:
            raise ServiceUnavailable("no render capacity available right now", "overloaded") from e
        except RayActorError as e:
            # The replica died under the request (its node was lost, or it crashed); Serve is
            # already replacing it, so this is as retryable as a full queue.
            raise ServiceUnavailable(
                "the replica rendering this request was lost", "replica_lost"
            ) from e
        except RayTaskError as e:
            if isinstance(e.cause, AdapterLoadError):
                raise AdapterLoadError(*e.cause.args) from None
            if isinstance(e.cause, TimeoutError):  # the engine's RenderDeadlineExceeded
                raise ServiceUnavailable(
                    "the render did not finish within render_timeout_s", "render_timeout"
                ) from e
            raise


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    def __init__(self, settings: Settings, model: BaseModelInfo, replica: DeploymentHandle):
        renders = metrics.Counter(
            "brandfarm_renders",
            description="Successful render requests, per tenant.",
            tag_keys=("tenant",),
        )
        rendered_images = metrics.Counter(
            "brandfarm_rendered_images",
            description="Images rendered for successful requests, per tenant.",
            tag_keys=("tenant",),
        )

        # Per adapter version, so a canary's champion and challenger can be compared live
        # (this replica's counts; GET /v1/adapters has the durable ones of every replica).
        adapter_renders = metrics.Counter(
            "brandfarm_adapter_renders",
            description="Successful render requests per adapter version, and whether the "
            "version served as a canary's champion or challenger (`-` outside a canary).",
            tag_keys=("tenant", "brand", "version", "canary"),
        )

        def on_rendered(tenant: str, images: int, adapter: AdapterSpec | None) -> None:
            renders.inc(tags={"tenant": tenant})
            rendered_images.inc(images, tags={"tenant": tenant})
            if adapter is not None:
                adapter_renders.inc(
                    tags={
                        "tenant": tenant,
                        "brand": adapter.brand,
                        "version": str(adapter.version),
                        "canary": adapter.canary or "-",
                    }
                )

        near_duplicates = metrics.Counter(
            "brandfarm_near_duplicates",
            description="Rendered images near a reference or training image, per tenant and "
            "action (flag, block).",
            tag_keys=("tenant", "action"),
        )

        def on_near_duplicate(tenant: str, action: str) -> None:
            near_duplicates.inc(tags={"tenant": tenant, "action": action})

        services = build_services(
            settings,
            model,
            ServeRenderer(replica),
            on_rendered=on_rendered,
            on_near_duplicate=on_near_duplicate,
        )
        # Job records follow their Ray jobs (the outbox gets submitted) and old renders expire,
        # from this replica on; both are idempotent across ingress replicas.
        self._background = start_background_work(settings, services)
        self._api = create_api(services)

    def __serve_build_asgi_app__(self):
        return self._api


def build_app(
    settings: Settings, model: BaseModelInfo, replica: serve.Deployment = DiffusionReplica
) -> serve.Application:
    """The farm's Serve application for fully resolved settings (absolute paths, credentials).
    `replica` is the render deployment (benchmarks swap in variants built from it)."""
    bound = replica.options(**replica_deployment_options(settings)).bind(settings, model)
    return Ingress.options(**ingress_deployment_options(settings)).bind(settings, model, bound)
