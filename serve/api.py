"""The HTTP API (FastAPI): authentication, body limits and thin routes over the feature services.

`create_api` builds the app from its services, so the same app runs inside the Ray Serve ingress
deployment and, for tests or a Ray-less box, under plain uvicorn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, FastAPI, Form, Header, Query, Request, UploadFile
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from registry.alias_webhook import PATH as ALIAS_WEBHOOK_PATH
from registry.base_models import BaseModelInfo
from registry.storage import ObjectStore
from registry.tenants import TenantDirectory
from serve import request_context
from serve.adapters import AdapterService, AliasRequest
from serve.error_handlers import RequestIds, error_response, install_error_handlers
from serve.errors import APIError, ErrorResponse
from serve.files import FileService
from serve.images import ImageService
from serve.io_pools import BlockingPool
from serve.jobs import FineTuneJobRequest, JobService
from serve.moderation import ModerationService, moderation_router
from serve.protocol import ImageGenerationRequest, Text
from serve.webhooks import WebhookService

if TYPE_CHECKING:
    from serve.alias_events import AliasEvents
    from serve.render_queue import RenderService

if TYPE_CHECKING:
    from serve.edits import EditService

#: Largest event id a client may page after (SQL BIGINT); beyond it is a 400, not a DB error.
MAX_EVENT_ID = 2**63 - 1

_ERROR_DESCRIPTIONS = {
    400: "Invalid request: the message names the field and the limit.",
    401: "Missing, incorrect or revoked API key.",
    403: "Not allowed for this tenant (a plan limit).",
    404: "No such object for this tenant (another tenant's objects read the same).",
    409: "Conflicts with the object's state.",
    413: "Request body over the limit.",
    429: "Over a rate or quota limit; see Retry-After.",
    500: "An adapter that cannot be used, or an internal error (with a request id).",
    503: "A dependency (object store, adapter registry, render capacity, cluster) is "
    "unavailable; retry after Retry-After.",
}
_ALWAYS = (400, 401, 413, 500)


def documented(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI `responses` for a route: its error statuses with the OpenAI error model."""
    return {
        status: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[status]}
        for status in sorted({*_ALWAYS, *statuses})
    }


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
    db_pool: BlockingPool | None = None  # API-key checks; default: a small pool of its own
    moderation: ModerationService | None = None  # content policy routes (none: no routes)
    webhooks: WebhookService | None = None  # the /v1/webhooks routes (serve.webhooks_api)
    renders: RenderService | None = None  # async renders (/v1/renders), where the farm has them
    edits: EditService | None = None  # edits, variations, render operations, interpolations
    alias_events: AliasEvents | None = None  # instant alias updates (MLflow's webhook route)


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


async def authenticated_tenant(request: Request) -> str:
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
    tenant = await services.db_pool.run(services.tenants.authenticate, key.strip())
    if tenant is None:
        raise APIError(401, "incorrect or revoked API key", code="invalid_api_key")
    request_context.tenant_id.set(tenant)
    return tenant


Tenant = Annotated[str, Depends(authenticated_tenant)]


def _without_422(app: FastAPI) -> None:
    """Validation errors answer 400 (OpenAI's status), so FastAPI's automatic 422 entries and
    their models are dropped from the schema."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def create_api(services: ApiServices) -> FastAPI:
    from serve import provenance_api  # here: it imports this module

    app = FastAPI(title="brandfarm", version="0.1.0")
    if services.db_pool is None:
        services.db_pool = BlockingPool("db", 4)
    app.state.services = services
    install_error_handlers(app)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=services.max_request_bytes,
        per_path={
            "/v1/files": services.max_upload_bytes,
            provenance_api.VERIFY_PATH: services.max_upload_bytes,
            **_edit_upload_limits(services),
        },
    )
    app.add_middleware(RequestIds)  # added last: outermost, so every answer carries the id
    _without_422(app)

    @app.get("/healthz", responses=documented(503))
    def healthz() -> JSONResponse:
        if not services.store.ping():
            return error_response(503, "object store unreachable", None, "storage_unavailable")
        body = {"status": "ok", "model": services.model.id}
        if services.alias_events is not None:
            body["alias_updates"] = services.alias_events.status()
        return JSONResponse(body)

    @app.get("/v1/models", responses=documented())
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

    @app.post("/v1/images/generations", responses=documented(403, 404, 429, 503))
    async def generate_images(body: ImageGenerationRequest, tenant: Tenant) -> dict:
        return (await services.images.generate(tenant, body)).to_dict()

    @app.post("/v1/files", responses=documented(403, 429, 503))
    async def upload_file(
        tenant: Tenant,
        file: Annotated[UploadFile, Form(description="The dataset zip.")],
        purpose: Annotated[Text, Form(max_length=64, description="Must be `fine-tune`.")],
    ) -> dict:
        data = await file.read()
        return await services.files.upload(tenant, file.filename or "upload.zip", purpose, data)

    @app.get("/v1/files", responses=documented(503))
    def list_files(tenant: Tenant) -> dict:
        return services.files.list(tenant)

    @app.get("/v1/files/{file_id}", responses=documented(404, 503))
    def get_file(file_id: str, tenant: Tenant) -> dict:
        return services.files.get(tenant, file_id)

    @app.delete("/v1/files/{file_id}", responses=documented(404, 503))
    def delete_file(file_id: str, tenant: Tenant) -> dict:
        return services.files.delete(tenant, file_id)

    @app.post("/v1/fine_tuning/jobs", responses=documented(403, 404, 409, 429, 503))
    def create_job(
        body: FineTuneJobRequest,
        tenant: Tenant,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> dict:
        return services.jobs.create(tenant, body, idempotency_key)

    @app.get("/v1/fine_tuning/jobs", responses=documented(503))
    def list_jobs(
        tenant: Tenant,
        after: Annotated[
            Text | None, Query(max_length=255, description="A job id: list the jobs after it.")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=100, description="Jobs per page.")] = 20,
    ) -> dict:
        return services.jobs.list(tenant, after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}", responses=documented(404, 503))
    def get_job(job_id: str, tenant: Tenant) -> dict:
        return services.jobs.get(tenant, job_id)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events", responses=documented(404, 503))
    def job_events(
        job_id: str,
        tenant: Tenant,
        after: Annotated[
            int, Query(ge=0, le=MAX_EVENT_ID, description="An event id: list the events after it.")
        ] = 0,
        limit: Annotated[int, Query(ge=1, le=1000, description="Events per page.")] = 100,
    ) -> dict:
        return services.jobs.events(tenant, job_id, after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", responses=documented(404, 503))
    def job_checkpoints(job_id: str, tenant: Tenant) -> dict:
        return services.jobs.checkpoints(tenant, job_id)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel", responses=documented(404, 409, 503))
    def cancel_job(job_id: str, tenant: Tenant) -> dict:
        return services.jobs.cancel(tenant, job_id)

    @app.get("/v1/adapters", responses=documented(503))
    async def list_adapters(
        tenant: Tenant,
        include_archived: Annotated[
            bool, Query(description="Also list archived versions (hidden by default).")
        ] = False,
    ) -> dict:
        return await services.adapters.list(tenant, include_archived)

    @app.post("/v1/adapters/{brand}/aliases/{alias}", responses=documented(404, 409, 503))
    async def set_adapter_alias(brand: str, alias: str, body: AliasRequest, tenant: Tenant) -> dict:
        return await services.adapters.set_alias(tenant, brand, alias, body)

    if services.alias_events is not None:

        @app.post(ALIAS_WEBHOOK_PATH, responses=documented(), include_in_schema=False)
        async def mlflow_alias_event(request: Request) -> dict:
            """MLflow's registry webhook (signed, no API key): an alias moved."""
            body = await request.body()
            return await services.alias_events.webhook(dict(request.headers), body)

    if services.moderation is not None:
        app.include_router(moderation_router(services.moderation))
    from serve.webhooks_api import router as webhooks_router  # it imports this module

    app.include_router(webhooks_router)
    app.include_router(provenance_api.router)
    if services.renders is not None:
        from serve.renders_api import router as renders_router  # it imports this module

        app.include_router(renders_router)
    from serve.adapter_versions_api import adapter_versions_router  # imports this module

    app.include_router(adapter_versions_router(services.adapters))
    from serve.canary_api import canary_router  # imports this module

    app.include_router(canary_router(services.adapters))
    if services.edits is not None:
        from serve.edits_api import edits_router  # it imports this module's dependencies

        app.include_router(edits_router(services.edits))
    return app


def _edit_upload_limits(services: ApiServices) -> dict[str, int]:
    from serve.edits_api import UPLOAD_PATHS

    return {path: services.edits.body_limit for path in UPLOAD_PATHS} if services.edits else {}
