"""A tenant's brand adapters over HTTP: list versions with aliases, tags and metrics; move aliases.

Promotion and rollback are the same call: point an alias (`production`, `staging`, ...) at a
version. Serving reads aliases on the next request; nothing is redeployed.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from registry.adapter_refs import MAX_VERSION, check_alias, check_name
from registry.adapters import AdapterNotFound, AdapterRegistry, AdapterVersion, RegistryError
from serve.errors import APIError, InvalidField, registry_unavailable
from serve.io_pools import BlockingPool
from serve.protocol import STRICT_BODY
from serve.request_context import request_logger

log = request_logger(__name__)


class AliasRequest(BaseModel):
    model_config = STRICT_BODY
    version: int = Field(
        ge=1, le=MAX_VERSION, description="The version the alias points to from now on."
    )


def version_object(v: AdapterVersion) -> dict:
    return {
        "object": "adapter.version",
        "brand": v.brand,
        "version": v.version,
        "aliases": sorted(v.aliases),
        "tags": v.tags,
        "metrics": v.metrics,
        "created_at": int(v.created_at.timestamp()) if v.created_at else None,
    }


class AdapterService:
    """Every registry call runs on the registry's own thread pool, bounded by MLflow's client
    timeout; MLflow down or hung is a 503 `registry_unavailable`, never a 500."""

    def __init__(self, registry: AdapterRegistry, pool: BlockingPool | None = None) -> None:
        self.registry = registry
        self.pool = pool or BlockingPool("registry", 4)

    def _list(self, tenant_id: str) -> dict:
        data = []
        for brand in self.registry.brands(tenant_id):
            versions = self.registry.versions(tenant_id, brand)
            data.append(
                {
                    "object": "adapter",
                    "brand": brand,
                    "versions": [version_object(v) for v in versions],
                }
            )
        return {"object": "list", "data": data}

    async def list(self, tenant_id: str) -> dict:
        try:
            return await self.pool.run(self._list, tenant_id)
        except RegistryError as e:
            log.error("listing adapters failed: %s", e)
            raise registry_unavailable() from None

    async def set_alias(self, tenant_id: str, brand: str, alias: str, req: AliasRequest) -> dict:
        for param, check in (
            ("brand", lambda: check_name("brand", brand)),
            ("alias", lambda: check_alias(alias)),
        ):
            try:
                check()
            except ValueError as e:
                raise InvalidField(param, str(e)) from None
        try:
            version = await self.pool.run(
                self.registry.set_alias, tenant_id, brand, alias, req.version
            )
        except AdapterNotFound as e:
            raise APIError(404, str(e), param="brand", code="adapter_not_found") from None
        except RegistryError as e:
            log.error("setting alias %s of %s failed: %s", alias, brand, e)
            raise registry_unavailable() from None
        return version_object(version)
