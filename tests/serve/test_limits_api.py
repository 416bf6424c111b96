"""Tenant limits at the API, in-process: `create_api` over the real services (the engine on the
tiny random model, a real S3 server, SQLite). Over a job cap: 429 with Retry-After; over the
storage cap: 403; both in OpenAI's error shape, naming the limit and the tenant's use."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from cluster.processes import free_ports
from finetune.datasets import DatasetLimits
from finetune.launcher import JobLauncher
from finetune.world import write_brand_zip
from registry.adapters import AdapterRegistry
from registry.base_models import TINY_RANDOM, ensure_base_model
from registry.db import make_engine
from registry.files import FileCatalog
from registry.jobs import JobStore
from registry.limits import TenantLimits
from registry.settings import Settings
from registry.storage import ObjectStore, tenant_prefix
from registry.tenants import TenantDirectory
from serve.adapters import AdapterService
from serve.api import ApiServices, create_api
from serve.engine import DiffusionEngine
from serve.files import FileService
from serve.images import ImageService
from serve.jobs import JobService
from serve.limits import LimitGuard
from serve.outputs import OutputEncoder
from serve.protocol import RenderJob, RenderLimits
from tests.object_store import s3_settings  # noqa: F401 - fixture


class EngineRenderer:
    """The `Renderer` seam over an in-process engine (what the replica does, without Ray)."""

    def __init__(self, engine: DiffusionEngine) -> None:
        self.engine = engine

    async def render(self, job: RenderJob):  # noqa: ANN201
        return await asyncio.to_thread(self.engine.generate, job, None)


@dataclass
class App:
    client: TestClient
    tenants: TenantDirectory
    jobs: JobStore
    store: ObjectStore
    dataset: bytes

    def tenant(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tenants.create_tenant(name).key}"}

    def stored(self, tenant: str) -> int:
        return sum(o.size for o in self.store.list(tenant_prefix(tenant)))


@pytest.fixture(scope="module")
def app(s3_settings: Settings, tmp_path_factory) -> Iterator[App]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("api")
    (no_ray, no_mlflow) = free_ports(2)  # nothing listens: job submits answer 503
    settings = s3_settings.model_copy(
        update={"stored_bytes_cache_ttl_s": 0.0, "ray_dashboard_port": no_ray}
    )
    model = ensure_base_model(TINY_RANDOM, tmp / "models", settings.max_image_side)
    db = make_engine(f"sqlite:///{tmp / 'farm.db'}")
    tenants, store, files = (
        TenantDirectory(db),
        ObjectStore.from_settings(settings),
        FileCatalog(db),
    )
    guard = LimitGuard(TenantLimits(settings, tenants, store))
    services = ApiServices(
        model=model,
        tenants=tenants,
        store=store,
        images=ImageService(
            RenderLimits.from_settings(settings, model),
            EngineRenderer(DiffusionEngine.load(model, "cpu")),
            store,
            tenants,
            settings.presign_expiry_s,
            settings.max_inflight_per_tenant,
            tenant_limits=guard,
            outputs=OutputEncoder.from_settings(settings),
        ),
        files=FileService(files, store, DatasetLimits.from_settings(settings), guard),
        jobs=JobService(settings, model, JobStore(db), files, store, JobLauncher(settings), guard),
        adapters=AdapterService(AdapterRegistry(f"http://127.0.0.1:{no_mlflow}")),
        max_request_bytes=settings.max_request_bytes,
        max_upload_bytes=settings.dataset_max_upload_bytes,
    )
    dataset = write_brand_zip(tmp / "acme.zip", "acme", n=4, seed=1).read_bytes()
    with TestClient(create_api(services)) as client:
        yield App(client, tenants, JobStore(db), store, dataset)
    db.dispose()


def upload(app: App, auth: dict[str, str]):  # noqa: ANN201
    return app.client.post(
        "/v1/files",
        headers=auth,
        files={"file": ("acme.zip", app.dataset)},
        data={"purpose": "fine-tune"},
    )


def error_of(resp, status: int, code: str) -> str:  # noqa: ANN001
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["code"] == code
    types = {429: "rate_limit_error", 403: "invalid_request_error", 503: "server_error"}
    assert error["type"] == types[status]
    return error["message"]


def test_an_upload_past_the_storage_cap_is_403_and_stores_nothing(app: App) -> None:
    auth = app.tenant("up-acme")
    app.tenants.set_limits("up-acme", max_stored_bytes=len(app.dataset) - 1)
    message = error_of(upload(app, auth), 403, "max_stored_bytes_exceeded")
    assert f"max_stored_bytes={len(app.dataset) - 1}" in message
    assert "stores 0 bytes" in message and f"adds {len(app.dataset)}" in message
    assert app.stored("up-acme") == 0

    app.tenants.set_limits("up-acme", max_stored_bytes=len(app.dataset))  # exactly fits
    assert upload(app, auth).status_code == 200
    assert app.stored("up-acme") == len(app.dataset)
    message = error_of(upload(app, auth), 403, "max_stored_bytes_exceeded")
    assert f"stores {len(app.dataset)} bytes" in message


def test_a_render_at_the_storage_cap_is_403(app: App) -> None:
    acme, globex = app.tenant("rd-acme"), app.tenant("rd-globex")
    body = {"prompt": "a red circle", "steps": 2, "response_format": "b64_json"}
    assert app.client.post("/v1/images/generations", headers=acme, json=body).status_code == 200
    used = app.stored("rd-acme")
    assert used > 0
    app.tenants.set_limits("rd-acme", max_stored_bytes=used)
    resp = app.client.post("/v1/images/generations", headers=acme, json=body)
    assert f"stores {used} bytes of its max_stored_bytes={used}" in error_of(
        resp, 403, "max_stored_bytes_exceeded"
    )
    assert app.stored("rd-acme") == used  # nothing rendered or stored
    assert app.client.post("/v1/images/generations", headers=globex, json=body).status_code == 200


def test_job_caps_answer_429_naming_the_limit_and_the_use(app: App) -> None:
    auth = app.tenant("jb-acme")
    file_id = upload(app, auth).json()["id"]
    body = {"training_file": file_id, "brand": "logo", "hyperparameters": {"steps": 4}}

    def create():  # noqa: ANN202
        return app.client.post("/v1/fine_tuning/jobs", headers=auth, json=body)

    app.jobs.create("jb-acme", "logo", file_id, "m", {"seed": 1})  # one queued already
    app.tenants.set_limits("jb-acme", max_queued_jobs=1)
    resp = create()
    message = error_of(resp, 429, "max_queued_jobs_exceeded")
    assert "1 queued of its max_queued_jobs=1" in message
    assert resp.headers["retry-after"] == "30"

    app.tenants.set_limits("jb-acme", max_queued_jobs=5, max_concurrent_fine_tunes=1)
    message = error_of(create(), 429, "max_concurrent_fine_tunes_exceeded")
    assert "1 unfinished (0 running, 1 queued) of its max_concurrent_fine_tunes=1" in message

    app.tenants.set_limits("jb-acme", max_concurrent_fine_tunes=2, max_stored_bytes=1)
    error_of(create(), 403, "max_stored_bytes_exceeded")  # its upload already fills the cap

    app.tenants.set_limits("jb-acme", max_stored_bytes=None)
    # Under every cap the job is recorded and goes to the cluster; none answers here.
    error_of(create(), 503, "cluster_unavailable")
    assert len(app.jobs.list("jb-acme", None, 10)[0]) == 2
