"""A tenant's brand adapters over HTTP: list versions with aliases, tags and metrics; move aliases.

Promotion and rollback are the same call: point an alias (`production`, `staging`, ...) at a
version. Serving reads aliases on the next request; nothing is redeployed.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from registry.adapters import AdapterNotFound, AdapterRegistry, AdapterVersion
from serve.errors import APIError, InvalidField


class AliasRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(description="The version the alias points to from now on.")


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
    def __init__(self, registry: AdapterRegistry) -> None:
        self.registry = registry

    def list(self, tenant_id: str) -> dict:
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

    def set_alias(self, tenant_id: str, brand: str, alias: str, req: AliasRequest) -> dict:
        try:
            self.registry.set_alias(tenant_id, brand, alias, req.version)
            version = self.registry.get(tenant_id, brand, req.version)
        except AdapterNotFound as e:
            raise APIError(404, str(e), param="brand", code="adapter_not_found") from e
        except ValueError as e:
            raise InvalidField("alias", str(e)) from e
        return version_object(version)
