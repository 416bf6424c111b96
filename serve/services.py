"""The API's services wired from `Settings`: the one place the Serve ingress and an in-process
app (plain uvicorn, the fast tests) build them, with the same limits, timeouts and pools.
"""

from __future__ import annotations

from collections.abc import Callable

from finetune.datasets import DatasetLimits
from finetune.job import discard_job_objects
from finetune.launcher import JobLauncher
from registry.adapters import AdapterRegistry
from registry.base_models import BaseModelInfo
from registry.db import make_engine
from registry.files import FileCatalog
from registry.jobs import JobStore
from registry.limits import TenantLimits
from registry.retention import RetentionSweeper
from registry.settings import Settings, apply_mlflow_client_limits
from registry.storage import ObjectStore
from registry.tenants import TenantDirectory
from serve.adapters import AdapterService
from serve.api import ApiServices
from serve.canvas import UploadLimits
from serve.edits import EditService
from serve.files import FileService
from serve.images import ImageService, Renderer, RenderObserver
from serve.io_pools import IOPools
from serve.jobs import JobService
from serve.limits import LimitGuard
from serve.protocol import RenderLimits
from serve.reconciler import JobReconciler
from serve.resolver import AdapterResolver


def build_services(
    settings: Settings,
    model: BaseModelInfo,
    renderer: Renderer,
    on_rendered: RenderObserver | None = None,
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
    images = ImageService(
        limits=RenderLimits.from_settings(settings, model),
        renderer=renderer,
        store=store,
        tenants=tenants,
        presign_expiry_s=settings.presign_expiry_s,
        max_inflight_per_tenant=settings.max_inflight_per_tenant,
        adapters=AdapterResolver(
            registry, settings.adapter_resolve_ttl_s, settings.adapter_stale_serve_s
        ),
        on_rendered=on_rendered,
        tenant_limits=guard,
        pools=pools,
    )
    files = FileCatalog(engine)
    launcher = JobLauncher(settings)
    jobs = JobService(settings, model, JobStore(engine), files, store, launcher, guard)
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
        ),
        jobs=jobs,
        adapters=AdapterService(registry, pools.registry),
        max_request_bytes=settings.max_request_bytes,
        # Room for the multipart envelope; the dataset's own limit is checked exactly.
        max_upload_bytes=settings.dataset_max_upload_bytes + 1024 * 1024,
        db_pool=pools.db,
        edits=EditService(
            images,
            store,
            tenants,
            UploadLimits(settings.edit_max_image_bytes, settings.edit_max_image_pixels),
        ),
    )


def start_background_work(settings: Settings, services: ApiServices) -> Callable[[], None]:
    """Start what an ingress runs beside its routes: the job reconciler (records follow their
    Ray jobs, the outbox gets submitted) and the render-retention sweeper. Returns a stop."""
    store = services.store
    guard = services.images.tenant_limits
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

    def stop() -> None:
        reconciler_stop.set()
        sweeper.stop()

    return stop
