"""The `/v1/webhooks` routes: a tenant's signing secret and default URL, its deliveries (with
every attempt) and replays. Thin: `serve.webhooks.WebhookService` does the work."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from serve.api import Tenant, documented
from serve.errors import APIError
from serve.protocol import Text
from serve.webhooks import WebhookConfigRequest, WebhookService

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


def _service(request: Request) -> WebhookService:
    service = getattr(request.app.state.services, "webhooks", None)
    if service is None:
        raise APIError(404, "webhooks are not enabled on this farm", code="not_found")
    return service


@router.post("/secret", responses=documented())
def rotate_secret(request: Request, tenant: Tenant) -> dict:
    """Create or rotate the signing secret; the answer holds it, shown this once. The previous
    secret keeps signing too for `webhook_secret_grace_s`."""
    return _service(request).rotate_secret(tenant)


@router.get("/config", responses=documented())
def get_config(request: Request, tenant: Tenant) -> dict:
    return _service(request).get_config(tenant)


@router.put("/config", responses=documented())
def set_config(request: Request, body: WebhookConfigRequest, tenant: Tenant) -> dict:
    return _service(request).set_config(tenant, body)


@router.get("/deliveries", responses=documented())
def list_deliveries(
    request: Request,
    tenant: Tenant,
    after: Annotated[
        Text | None, Query(max_length=64, description="A delivery id: list those after it.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Deliveries per page.")] = 20,
    event_type: Annotated[
        Text | None, Query(max_length=64, description="Only events of this type.")
    ] = None,
) -> dict:
    return _service(request).list_deliveries(tenant, after, limit, event_type)


@router.get("/deliveries/{delivery_id}", responses=documented(404))
def get_delivery(request: Request, delivery_id: str, tenant: Tenant) -> dict:
    return _service(request).get_delivery(tenant, delivery_id)


@router.post("/deliveries/{delivery_id}/replay", responses=documented(404, 409))
def replay_delivery(request: Request, delivery_id: str, tenant: Tenant) -> dict:
    """Send the delivery again now (same event and `webhook-id`), with a fresh retry schedule."""
    return _service(request).replay(tenant, delivery_id)
