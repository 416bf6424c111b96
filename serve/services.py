"""The API's services wired from `Settings`: the one place the Serve ingress and an in-process
app (plain uvicorn, the fast tests) build them, with the same limits, timeouts and pools.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from finetune.datasets import DatasetLimits
from finetune.job import discard_job_objects
from finetune.launcher import JobLauncher
from registry.adapters import AdapterRegistry
from registry.alias_events import AliasEventLog
from registry.base_models import BaseModelInfo
from registry.content_policy import ContentPolicy, PolicyStore, load_policy_file
from registry.db import make_engine
from registry.files import FileCatalog
from registry.jobs import JobStore
from registry.limits import TenantLimits
from registry.near_duplicates import ImageHashIndex
from registry.promotion import default_policy
from registry.render_limits import RenderLimiter
from registry.render_queue import RenderQueueStore
from registry.retention import RetentionSweeper
from registry.secret_box import SecretBox, SecretKeyError
from registry.settings import Settings, apply_mlflow_client_limits
from registry.storage import ObjectStore
from registry.tenants import TenantDirectory
from registry.webhooks import WebhookStore
from serve.adapters import AdapterService
from serve.alias_events import AliasEvents
from serve.api import ApiServices
from serve.canvas import UploadLimits
from serve.edits import EditService
from serve.files import FileService
from serve.images import ImageService, Renderer, RenderObserver
from serve.io_pools import IOPools
from serve.jobs import JobService
from serve.limits import LimitGuard
from serve.moderation import ModerationService
from serve.near_duplicates import NearDuplicateObserver, NearDuplicateService
from serve.outputs import OutputEncoder
from serve.protocol import RenderLimits
from serve.reconciler import JobReconciler
from serve.render_queue import RenderDispatcher, RenderService
from serve.resolver import AdapterResolver
from serve.webhook_urls import check_webhook_url
from serve.webhooks import WebhookDispatcher, WebhookService

log = logging.getLogger(__name__)


def build_services(
    settings: Settings,
    model: BaseModelInfo,
    renderer: Renderer,
    on_rendered: RenderObserver | None = None,
    on_near_duplicate: NearDuplicateObserver | None = None,
) -> ApiServices:
    """Everything `serve.api.create_api` needs, for fully resolved settings. Bounds this
    process's MLflow client (`mlflow_request_timeout_s`, `mlflow_max_retries`)."""
    apply_mlflow_client_limits(settings)  # a slow MLflow fails a lookup; never stalls it
    pools = IOPools.from_settings(settings)
    engine = make_engine(settings.resolved_database_url)
    tenants = TenantDirectory(engine)
    store = ObjectStore.from_settings(settings)
    registry = AdapterRegistry(settings.resolved_mlflow_uri)
    guard = LimitGuard(TenantLimits(settings, tenants, store))
    moderation = ModerationService(
        PolicyStore(engine),
        load_policy_file(settings.content_policy_file)
        if settings.content_policy_file
        else ContentPolicy(),
        pools.db,
        settings.content_policy_cache_ttl_s,
    )
    hashes = ImageHashIndex(engine)
    resolver = AdapterResolver(
        registry, settings.adapter_resolve_ttl_s, settings.adapter_stale_serve_s
    )
    alias_events = AliasEvents(resolver, AliasEventLog(engine), settings, pools.db)
    near_duplicates = NearDuplicateService(hashes, moderation, pools.db, on_near_duplicate)
    images = ImageService(
        limits=RenderLimits.from_settings(settings, model),
        renderer=renderer,
        store=store,
        tenants=tenants,
        presign_expiry_s=settings.presign_expiry_s,
        max_inflight_per_tenant=settings.max_inflight_per_tenant,
        adapters=resolver,
        on_rendered=on_rendered,
        tenant_limits=guard,
        pools=pools,
        moderation=moderation,
        near_duplicates=near_duplicates,
        limiter=RenderLimiter(engine, settings.render_lease_s),
        outputs=OutputEncoder.from_settings(settings),
    )
    files = FileCatalog(engine)
    launcher = JobLauncher(settings)
    jobs = JobService(settings, model, JobStore(engine), files, store, launcher, guard)
    webhooks = WebhookStore(engine, SecretBox.of_settings(settings))
    renders = RenderService(
        RenderQueueStore(engine),
        images,
        default_plan=settings.render_default_plan,
        max_queued=settings.max_queued_renders_per_tenant,
        db_pool=pools.db,
        # render.succeeded|failed|cancelled go through the webhook outbox (its own transaction;
        # the queue keeps the event pending until this returns, so none is lost).
        emit=webhooks.enqueue,
        webhook_check=lambda url: check_webhook_url(url, settings),
    )
    return ApiServices(
        model=model,
        tenants=tenants,
        store=store,
        images=images,
        files=FileService(
            files,
            store,
            DatasetLimits.from_settings(settings),
            tenant_limits=guard,
            storage_pool=pools.storage,
            moderation=moderation,
            hashes=hashes,
            on_hashed=near_duplicates.forget,
        ),
        jobs=jobs,
        adapters=AdapterService(
            registry,
            pools.registry,
            tenants,
            pools.db,
            on_alias_moved=alias_events.changed,
            default_policy=default_policy(settings),
        ),
        alias_events=alias_events,
        max_request_bytes=settings.max_request_bytes,
        # Room for the multipart envelope; the dataset's own limit is checked exactly.
        max_upload_bytes=settings.dataset_max_upload_bytes + 1024 * 1024,
        db_pool=pools.db,
        moderation=moderation,
        webhooks=WebhookService(webhooks, settings),
        renders=renders,
        edits=EditService(
            images,
            store,
            tenants,
            UploadLimits(settings.edit_max_image_bytes, settings.edit_max_image_pixels),
        ),
    )


def _seal_webhook_secrets(webhooks: WebhookStore) -> None:
    """Seal the webhook secrets still stored plain (rows from before encryption) or under an
    older farm key; a farm without a key says so in the log and keeps serving."""
    try:
        sealed = webhooks.reseal_secrets()
    except SecretKeyError as e:
        log.error("%s", e)
        return
    except Exception:  # noqa: BLE001 - the database briefly down: the next start retries
        log.exception("sealing the webhook secrets failed")
        return
    if sealed:
        log.info("sealed %d webhook secrets with the farm key", sealed)


def start_background_work(settings: Settings, services: ApiServices) -> Callable[[], None]:
    """Start what an ingress runs beside its routes: the job reconciler (records follow their
    Ray jobs, the outbox gets submitted), the render-retention sweeper, the webhook
    dispatcher and the render queue's dispatcher, which synchronous renders then wait on for
    their turn, and the alias event poller. Returns a stop."""
    store = services.store
    guard = services.images.tenant_limits
    _seal_webhook_secrets(services.webhooks.store)
    sweeper = RetentionSweeper(
        settings,
        services.tenants,
        store,
        # Expired renders' bytes leave this replica's stored-bytes total at once.
        on_deleted=lambda tenant, n: guard.stored(tenant, -n) if guard else None,
    )
    sweeper.start()
    reconciler_stop = JobReconciler(
        services.jobs.jobs,
        services.jobs.launcher,
        settings.job_reconcile_interval_s,
        on_ended=lambda job: discard_job_objects(store, job),
    ).start()
    webhooks_stop = WebhookDispatcher(services.webhooks.store, settings).start()
    alias_events_stop = services.alias_events.start() if services.alias_events else None

    renders = services.renders
    dispatcher = RenderDispatcher(
        renders.queue,
        services.images,
        services.images.renderer,
        renders,
        concurrency=settings.render_queue_concurrency,
        lease_s=settings.render_queue_lease_s,
        max_attempts=settings.render_max_attempts,
        poll_s=settings.render_queue_poll_s,
    )
    dispatcher_stop = dispatcher.start()
    # Synchronous renders wait for their turn in the same fair order as async ones.
    services.images.scheduler = dispatcher

    def stop() -> None:
        services.images.scheduler = None
        webhooks_stop.set()
        if alias_events_stop is not None:
            alias_events_stop.set()
        reconciler_stop.set()
        sweeper.stop()
        dispatcher_stop()

    return stop
