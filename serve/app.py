"""The Ray Serve application: an ingress deployment (FastAPI) and the diffusion replicas.

Both are thin: the ingress builds `serve.api.create_api` from its services, the replica wraps a
`serve.engine.DiffusionEngine`. `build_app(settings)` is what `brandfarm up` deploys.
"""

from __future__ import annotations

import logging

from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from finetune.datasets import DatasetLimits
from finetune.launcher import JobLauncher
from registry.adapters import AdapterRegistry
from registry.base_models import BaseModelInfo
from registry.db import make_engine
from registry.files import FileCatalog
from registry.jobs import JobStore
from registry.settings import Settings
from registry.storage import ObjectStore
from registry.tenants import TenantDirectory
from serve.adapters import AdapterService
from serve.api import ApiServices, create_api
from serve.errors import APIError
from serve.files import FileService
from serve.images import ImageService
from serve.jobs import JobService
from serve.protocol import RenderedImage, RenderJob, RenderLimits

APP_NAME = "brandfarm"
log = logging.getLogger(__name__)


@serve.deployment(name="DiffusionReplica")
class DiffusionReplica:
    """One warm pipeline. Requests beyond `max_ongoing_requests` queue at the handle."""

    def __init__(self, model: BaseModelInfo, device: str) -> None:
        from serve.engine import DiffusionEngine  # torch is imported on replicas only

        self.engine = DiffusionEngine.load(model, device)

    def render(self, job: RenderJob) -> list[RenderedImage]:
        return self.engine.generate(job)

    def check_health(self) -> None:
        if self.engine.pipeline is None:
            raise RuntimeError("pipeline not loaded")


class ServeRenderer:
    """A `Renderer` over the replica deployment's handle; Ray's capacity errors become 503."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def render(self, job: RenderJob) -> list[RenderedImage]:
        try:
            return await self.handle.render.remote(job)
        except (BackPressureError, DeploymentUnavailableError) as e:
            raise APIError(
                503,
                "no render capacity available right now; retry shortly",
                code="overloaded",
                headers={"Retry-After": "2"},
            ) from e


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    def __init__(self, settings: Settings, model: BaseModelInfo, replica: DeploymentHandle):
        engine = make_engine(settings.resolved_database_url)
        tenants = TenantDirectory(engine)
        store = ObjectStore.from_settings(settings)
        images = ImageService(
            limits=RenderLimits.from_settings(settings, model),
            renderer=ServeRenderer(replica),
            store=store,
            tenants=tenants,
            presign_expiry_s=settings.presign_expiry_s,
            max_inflight_per_tenant=settings.max_inflight_per_tenant,
        )
        files = FileCatalog(engine)
        jobs = JobService(settings, model, JobStore(engine), files, store, JobLauncher(settings))
        self._api = create_api(
            ApiServices(
                model=model,
                tenants=tenants,
                store=store,
                images=images,
                files=FileService(files, store, DatasetLimits.from_settings(settings)),
                jobs=jobs,
                adapters=AdapterService(AdapterRegistry(settings.resolved_mlflow_uri)),
                max_request_bytes=settings.max_request_bytes,
                # Room for the multipart envelope; the dataset's own limit is checked exactly.
                max_upload_bytes=settings.dataset_max_upload_bytes + 1024 * 1024,
            )
        )

    def __serve_build_asgi_app__(self):
        return self._api


def build_app(settings: Settings, model: BaseModelInfo) -> serve.Application:
    """The farm's Serve application for fully resolved settings (absolute paths, credentials)."""
    replica = DiffusionReplica.options(
        num_replicas=settings.num_replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        ray_actor_options={
            "num_cpus": settings.replica_num_cpus,
            "num_gpus": settings.replica_num_gpus,
        },
    ).bind(model, settings.device)
    return Ingress.options(ray_actor_options={"num_cpus": 0}).bind(settings, model, replica)
