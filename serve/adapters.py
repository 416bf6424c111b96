"""A tenant's brand adapters over HTTP: list versions with aliases, tags and metrics; move aliases.

Promotion and rollback are the same call: point an alias (`production`, `staging`, ...) at a
version. Serving reads aliases on the next request; nothing is redeployed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from pydantic import BaseModel, Field

from registry.adapter_refs import MAX_VERSION, check_alias, check_name
from registry.adapters import (
    WEIGHTS_DELETED_TAG,
    AdapterArchived,
    AdapterInUse,
    AdapterNotFound,
    AdapterRegistry,
    AdapterVersion,
    RegistryError,
)
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
        "archived_at": int(v.archived_at.timestamp()) if v.archived_at else None,
    }


#: The version tags that say where a version came from.
LINEAGE_KEYS = ("job_id", "dataset_sha256", "base_model", "base_model_revision")


def version_detail(v: AdapterVersion) -> dict:
    """`version_object` plus the version's lineage and whether its weights are still stored."""
    return {
        **version_object(v),
        "lineage": {
            **{key: v.tags.get(key) or None for key in LINEAGE_KEYS},
            "run_id": v.run_id or None,
            "weights_sha256": v.sha256 or None,
        },
        "weights": "deleted" if v.tags.get(WEIGHTS_DELETED_TAG) else "stored",
    }


class AdapterService:
    """Every registry call runs on the registry's own thread pool, bounded by MLflow's client
    timeout; MLflow down or hung is a 503 `registry_unavailable`, never a 500."""

    def __init__(
        self,
        registry: AdapterRegistry,
        pool: BlockingPool | None = None,
        on_alias_moved: Callable[[str, str, str], Awaitable[None]] | None = None,
    ) -> None:
        self.registry = registry
        self.pool = pool or BlockingPool("registry", 4)
        # (tenant, brand, source): drops cached alias answers on every ingress (serve.alias_events)
        self.on_alias_moved = on_alias_moved

    def _list(self, tenant_id: str, include_archived: bool = False) -> dict:
        data = []
        for brand in self.registry.brands(tenant_id):
            versions = self.registry.versions(tenant_id, brand, include_archived)
            data.append(
                {
                    "object": "adapter",
                    "brand": brand,
                    "versions": [version_object(v) for v in versions],
                }
            )
        return {"object": "list", "data": data}

    async def list(self, tenant_id: str, include_archived: bool = False) -> dict:
        return await self._call("listing adapters", self._list, tenant_id, include_archived)

    async def versions(self, tenant_id: str, brand: str, include_archived: bool) -> dict:
        _check_brand(brand)
        found = await self._call(
            f"listing versions of {brand}",
            self.registry.versions,
            tenant_id,
            brand,
            include_archived,
        )
        return {"object": "list", "data": [version_object(v) for v in found]}

    async def get_version(self, tenant_id: str, brand: str, version: int) -> dict:
        _check_brand(brand)
        found = await self._call(
            f"reading {brand} v{version}", self.registry.get, tenant_id, brand, version
        )
        return version_detail(found)

    async def archive(self, tenant_id: str, brand: str, version: int) -> dict:
        _check_brand(brand)
        found = await self._call(
            f"archiving {brand} v{version}", self.registry.archive, tenant_id, brand, version
        )
        return version_detail(found)

    async def _call(self, what: str, fn, *args):  # noqa: ANN001, ANN202 - any registry call
        """Run a registry call on the pool; its errors become the API's answers."""
        try:
            return await self.pool.run(fn, *args)
        except AdapterNotFound as e:
            raise APIError(404, str(e), param="brand", code="adapter_not_found") from None
        except AdapterInUse as e:
            raise APIError(409, str(e), param="version", code="adapter_version_in_use") from None
        except AdapterArchived as e:
            raise APIError(409, str(e), param="version", code="adapter_version_archived") from None
        except RegistryError as e:
            log.error("%s failed: %s", what, e)
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
        version = await self._call(
            f"setting alias {alias} of {brand}",
            self.registry.set_alias,
            tenant_id,
            brand,
            alias,
            req.version,
        )
        if self.on_alias_moved is not None:  # before answering: the next render sees it
            await self.on_alias_moved(tenant_id, brand, "api")
        return version_object(version)


def _check_brand(brand: str) -> None:
    try:
        check_name("brand", brand)
    except ValueError as e:
        raise InvalidField("brand", str(e)) from None
