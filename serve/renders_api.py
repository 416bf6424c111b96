"""Routes of async renders (`/v1/renders`): thin, over `serve.render_queue.RenderService`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from serve.api import Tenant, documented
from serve.protocol import Text
from serve.render_queue import RenderRequest, RenderService

router = APIRouter()


def _renders(request: Request) -> RenderService:
    return request.app.state.services.renders


@router.post("/v1/renders", status_code=202, responses=documented(403, 404, 429, 503))
async def create_render(body: RenderRequest, tenant: Tenant, request: Request) -> JSONResponse:
    render = await _renders(request).create(tenant, body)
    return JSONResponse(render, status_code=202)


@router.get("/v1/renders", responses=documented(503))
def list_renders(
    tenant: Tenant,
    request: Request,
    after: Annotated[
        Text | None, Query(max_length=255, description="A render id: list the renders after it.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Renders per page.")] = 20,
) -> dict:
    return _renders(request).list(tenant, after, limit)


@router.get("/v1/renders/{render_id}", responses=documented(404, 503))
def get_render(render_id: str, tenant: Tenant, request: Request) -> dict:
    return _renders(request).get(tenant, render_id)


@router.post("/v1/renders/{render_id}/cancel", responses=documented(404, 409, 503))
def cancel_render(render_id: str, tenant: Tenant, request: Request) -> dict:
    return _renders(request).cancel(tenant, render_id)


@router.get("/v1/renders/{render_id}/events", responses=documented(404, 503))
async def render_events(render_id: str, tenant: Tenant, request: Request) -> EventSourceResponse:
    """Server-sent events: the render object (event `render`) on every change, until it ends."""
    return EventSourceResponse(await _renders(request).events(tenant, render_id), ping=15)
