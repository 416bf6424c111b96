"""Routes of one brand's adapter versions: list them, read one with its lineage, archive one;
and the brand's promotion policy (`GET/PUT /v1/adapters/{brand}/policy`).

`DELETE /v1/adapters/{brand}/versions/{version}` archives (nothing is deleted at once): the
version disappears from listings and resolution, answers 409 naming the alias while an alias
points at it, and keeps its weights until `adapter_archive_retention_days` passes.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from registry.adapter_refs import MAX_VERSION
from serve.adapters import AdapterService, PolicyRequest
from serve.api import Tenant, documented

Version = Annotated[int, Path(ge=1, le=MAX_VERSION, description="The version number.")]
IncludeArchived = Annotated[
    bool, Query(description="Also list archived versions (hidden by default).")
]


def adapter_versions_router(adapters: AdapterService) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/adapters/{brand}/versions", responses=documented(404, 503))
    async def list_adapter_versions(
        brand: str, tenant: Tenant, include_archived: IncludeArchived = False
    ) -> dict:
        return await adapters.versions(tenant, brand, include_archived)

    @router.get("/v1/adapters/{brand}/versions/{version}", responses=documented(404, 503))
    async def get_adapter_version(brand: str, version: Version, tenant: Tenant) -> dict:
        return await adapters.get_version(tenant, brand, version)

    @router.delete("/v1/adapters/{brand}/versions/{version}", responses=documented(404, 409, 503))
    async def archive_adapter_version(brand: str, version: Version, tenant: Tenant) -> dict:
        return await adapters.archive(tenant, brand, version)

    @router.get("/v1/adapters/{brand}/policy", responses=documented(404, 503))
    async def get_adapter_policy(brand: str, tenant: Tenant) -> dict:
        return await adapters.get_policy(tenant, brand)

    @router.put("/v1/adapters/{brand}/policy", responses=documented(400, 404, 503))
    async def put_adapter_policy(brand: str, body: PolicyRequest, tenant: Tenant) -> dict:
        return await adapters.put_policy(tenant, brand, body)

    return router
