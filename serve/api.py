"""The HTTP API (FastAPI): authentication, body limits and thin routes over the feature services.

`create_api` builds the app from its services, so the same app runs inside the Ray Serve ingress
deployment and, for tests or a Ray-less box, under plain uvicorn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Form, Header, Request, UploadFile
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from registry.base_models import BaseModelInfo
from registry.storage import ObjectStore
from registry.tenants import TenantDirectory
from serve.adapters import AdapterService, AliasRequest
from serve.errors import APIError, error_response, install_error_handlers
from serve.files import FileService
from serve.images import ImageService
from serve.jobs import FineTuneJobRequest, JobService
from serve.protocol import ImageGenerationRequest


@dataclass
class ApiServices:
    model: BaseModelInfo
    tenants: TenantDirectory
    store: ObjectStore
    images: ImageService
    files: FileService
    jobs: JobService
    adapters: AdapterService
    max_request_bytes: int
    max_upload_bytes: int  # body limit of POST /v1/files (dataset limit + multipart overhead)


class _BodyTooLarge(StarletteHTTPException):
    pass


class BodySizeLimit:
    """Refuse bodies over the route's limit with 413, by Content-Length up front or while
    streaming. `per_path` maps exact paths to their own limits (uploads)."""

    def __init__(self, app: ASGIApp, max_bytes: int, per_path: dict[str, int]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.per_path = per_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope["path"].rstrip("/"), self.max_bytes)
        too_large = f"request body exceeds the limit of {limit} bytes"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            response = error_response(413, too_large, None, "request_too_large")
            await response(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(413, too_large)
            return message

        await self.app(scope, limited, send)


def authenticated_tenant(request: Request) -> str:
    """The tenant of the request's bearer key; 401 without a valid, unrevoked key."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(
            401,
            "missing API key: send it as the header 'Authorization: Bearer <key>' "
            "(create one with `brandfarm tenants create NAME`)",
            code="missing_api_key",
        )
    services: ApiServices = request.app.state.services
    tenant = services.tenants.authenticate(key.strip())
    if tenant is None:
        raise APIError(401, "incorrect or revoked API key", code="invalid_api_key")
    return tenant


Tenant = Annotated[str, Depends(authenticated_tenant)]


def create_api(services: ApiServices) -> FastAPI:
    app = FastAPI(title="brandfarm", version="0.1.0")
    app.state.services = services
    install_error_handlers(app)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=services.max_request_bytes,
        per_path={"/v1/files": services.max_upload_bytes},
    )

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        if not services.store.ping():
            return error_response(503, "object store unreachable", None, "storage_unavailable")
        return JSONResponse({"status": "ok", "model": services.model.id})

    @app.get("/v1/models")
    def list_models(_: Tenant) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": services.model.id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "brandfarm",
                    "revision": services.model.revision,
                }
            ],
        }

    @app.post("/v1/images/generations")
    async def generate_images(body: ImageGenerationRequest, tenant: Tenant) -> dict:
        return (await services.images.generate(tenant, body)).to_dict()

    @app.post("/v1/files")
    async def upload_file(
        tenant: Tenant,
        file: Annotated[UploadFile, Form(description="The dataset zip.")],
        purpose: Annotated[str, Form(description="Must be `fine-tune`.")],
    ) -> dict:
        data = await file.read()
        return await services.files.upload(tenant, file.filename or "upload.zip", purpose, data)

    @app.get("/v1/files")
    def list_files(tenant: Tenant) -> dict:
        return services.files.list(tenant)

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str, tenant: Tenant) -> dict:
        return services.files.get(tenant, file_id)

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str, tenant: Tenant) -> dict:
        return services.files.delete(tenant, file_id)

    @app.post("/v1/fine_tuning/jobs")
    def create_job(
        body: FineTuneJobRequest,
        tenant: Tenant,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> dict:
        return services.jobs.create(tenant, body, idempotency_key)

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(tenant: Tenant, after: str | None = None, limit: int = 20) -> dict:
        return services.jobs.list(tenant, after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def get_job(job_id: str, tenant: Tenant) -> dict:
        return services.jobs.get(tenant, job_id)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def job_events(job_id: str, tenant: Tenant, after: int = 0, limit: int = 100) -> dict:
        return services.jobs.events(tenant, job_id, after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def job_checkpoints(job_id: str, tenant: Tenant) -> dict:
        return services.jobs.checkpoints(tenant, job_id)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str, tenant: Tenant) -> dict:
        return services.jobs.cancel(tenant, job_id)

    @app.get("/v1/adapters")
    def list_adapters(tenant: Tenant) -> dict:
        return services.adapters.list(tenant)

    @app.post("/v1/adapters/{brand}/aliases/{alias}")
    def set_adapter_alias(brand: str, alias: str, body: AliasRequest, tenant: Tenant) -> dict:
        return services.adapters.set_alias(tenant, brand, alias, body)

    return app
