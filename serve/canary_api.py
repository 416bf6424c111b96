"""Routes of a brand's canary: `production` split between the champion and a challenger.

`PUT /v1/adapters/{brand}/canary` starts one (or changes its challenger or share), `GET` reads
it with each side's render counts, `POST .../canary/promote` makes the challenger production
and ends it, `DELETE` drops the challenger. Renders naming `acme` or `acme@production` go to the
challenger by a stable hash of their render id; pinned references (`acme:3`, `acme@staging`)
are never split.
"""

from __future__ import annotations

from fastapi import APIRouter

from serve.adapters import AdapterService, CanaryPromoteRequest, CanaryRequest
from serve.api import Tenant, documented


def canary_router(adapters: AdapterService) -> APIRouter:
    router = APIRouter(tags=["canary"])

    @router.get("/v1/adapters/{brand}/canary", responses=documented(404, 503))
    async def get_adapter_canary(brand: str, tenant: Tenant) -> dict:
        """The running canary: share, champion and challenger with their renders since it
        started. 404 `canary_not_found` when none runs."""
        return await adapters.get_canary(tenant, brand)

    @router.put("/v1/adapters/{brand}/canary", responses=documented(404, 409, 503))
    async def start_adapter_canary(brand: str, body: CanaryRequest, tenant: Tenant) -> dict:
        """Start a canary, or change the running one's challenger or share. 409 without a
        production version, when the version is production's, or when it is archived."""
        return await adapters.start_canary(tenant, brand, body)

    @router.post("/v1/adapters/{brand}/canary/promote", responses=documented(404, 409, 503))
    async def promote_adapter_canary(
        brand: str, tenant: Tenant, body: CanaryPromoteRequest | None = None
    ) -> dict:
        """Point `production` at the challenger (as `POST .../aliases/production` does, with
        its checks: a failing promotion gate answers 409 `evaluation_failed` unless the body
        says `force: true`) and end the canary."""
        return await adapters.promote_canary(tenant, brand, force=bool(body and body.force))

    @router.delete("/v1/adapters/{brand}/canary", responses=documented(404, 503))
    async def drop_adapter_canary(brand: str, tenant: Tenant) -> dict:
        """Drop the challenger: the champion keeps `production` and every render."""
        return await adapters.drop_canary(tenant, brand)

    return router
