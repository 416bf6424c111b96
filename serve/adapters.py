"""A tenant's brand adapters over HTTP: list versions with aliases, tags and metrics; move aliases.

Promotion and rollback are the same call: point an alias (`production`, `staging`, ...) at a
version. Serving reads aliases on the next request; nothing is redeployed. Moving `production`
goes through the brand's promotion gate (`registry.promotion`): a version that fails it answers
409 `evaluation_failed` with the figures unless the body says `force: true`. The gate's policy is
read and replaced with `GET/PUT /v1/adapters/{brand}/policy`.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from registry import promotion
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
    force: bool = Field(
        False,
        description="Move production even past a failing promotion gate (recorded on the "
        "version and its MLflow run).",
    )


class PolicyRequest(BaseModel):
    """A brand's promotion gate. PUT replaces it: an omitted field takes the farm's default."""

    model_config = STRICT_BODY
    min_improvement: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="Least improvement over production (or the base model when there is none): "
        "brand_score gain on the built-in model, else the relative drop of heldout_denoise_loss. "
        "-1..1.",
    )
    max_adherence_drop: float | None = Field(
        None, ge=0.0, le=1.0, description="Largest allowed drop in prompt adherence, 0..1."
    )
    auto_promote: bool | None = Field(
        None, description="Make a version that passes its gate production when its job ends."
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
        default_policy: promotion.PromotionPolicy | None = None,
    ) -> None:
        self.registry = registry
        self.pool = pool or BlockingPool("registry", 4)
        self.default_policy = default_policy or promotion.PromotionPolicy()

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
        except promotion.EvaluationFailed as e:
            raise APIError(
                409,
                str(e),
                param="version",
                code="evaluation_failed",
                details={"gate": e.decision.to_dict()},
            ) from None
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
            self._promote,
            tenant_id,
            brand,
            alias,
            req.version,
            req.force,
        )
        return version_object(version)

    def _promote(
        self, tenant_id: str, brand: str, alias: str, version: int, force: bool
    ) -> AdapterVersion:
        return promotion.promote(
            self.registry,
            tenant_id,
            brand,
            alias,
            version,
            default=self.default_policy,
            force=force,
            by=f"tenant {tenant_id} over the API",
        )

    async def get_policy(self, tenant_id: str, brand: str) -> dict:
        _check_brand(brand)
        policy = await self._call(
            f"reading the policy of {brand}",
            promotion.read_policy,
            self.registry,
            tenant_id,
            brand,
            self.default_policy,
        )
        return policy_object(brand, policy)

    async def put_policy(self, tenant_id: str, brand: str, req: PolicyRequest) -> dict:
        _check_brand(brand)
        d = self.default_policy
        policy = promotion.PromotionPolicy(
            min_improvement=d.min_improvement
            if req.min_improvement is None
            else req.min_improvement,
            max_adherence_drop=(
                d.max_adherence_drop if req.max_adherence_drop is None else req.max_adherence_drop
            ),
            auto_promote=d.auto_promote if req.auto_promote is None else req.auto_promote,
        )
        await self._call(
            f"writing the policy of {brand}",
            promotion.write_policy,
            self.registry,
            tenant_id,
            brand,
            policy,
        )
        return policy_object(brand, policy)


def policy_object(brand: str, policy: promotion.PromotionPolicy) -> dict:
    return {"object": "adapter.policy", "brand": brand, **policy.to_dict()}


def _check_brand(brand: str) -> None:
    try:
        check_name("brand", brand)
    except ValueError as e:
        raise InvalidField("brand", str(e)) from None
