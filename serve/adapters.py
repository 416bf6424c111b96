"""A tenant's brand adapters over HTTP: list versions with aliases, tags, metrics and render
counts; move aliases; run a canary on the production alias.

Promotion and rollback are the same call: point an alias (`production`, `staging`, ...) at a
version. Serving reads aliases on the next request; nothing is redeployed. Moving `production`
goes through the brand's promotion gate (`registry.promotion`): a version that fails it answers
409 `evaluation_failed` with the figures unless the body says `force: true`. The gate's policy is
read and replaced with `GET/PUT /v1/adapters/{brand}/policy`. A canary (`registry.canary`)
splits `production` between the champion and a challenger; promoting the challenger goes
through that same alias call, gate included.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable

from pydantic import BaseModel, Field

from registry import promotion
from registry.adapter_refs import MAX_VERSION, PRODUCTION, check_alias, check_name
from registry.adapters import (
    WEIGHTS_DELETED_TAG,
    AdapterArchived,
    AdapterInUse,
    AdapterNotFound,
    AdapterRegistry,
    AdapterVersion,
    CanaryConflict,
    CanaryNotFound,
    RegistryError,
)
from registry.canary import CHALLENGER, Canary
from registry.tenants import TenantDirectory, VersionUsage
from serve.errors import APIError, InvalidField, registry_unavailable
from serve.io_pools import BlockingPool
from serve.protocol import STRICT_BODY
from serve.request_context import request_logger

log = request_logger(__name__)


class CanaryPromoteRequest(BaseModel):
    model_config = STRICT_BODY
    force: bool = Field(
        False,
        description="Promote the challenger even past a failing promotion gate (recorded on "
        "the version and its MLflow run).",
    )


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


class CanaryRequest(BaseModel):
    model_config = STRICT_BODY
    version: int = Field(
        ge=1, le=MAX_VERSION, description="The challenger: a version other than production's."
    )
    share: float = Field(
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="The challenger's share of the renders that name the production alias "
        "(`acme`, `acme@production`), from 0 to 1: 0.1 sends about 10% to the challenger.",
    )


def version_object(v: AdapterVersion, usage: VersionUsage | None = None) -> dict:
    """A version as the API shows it; `usage` adds its render counts (every ingress)."""
    out = {
        "object": "adapter.version",
        "brand": v.brand,
        "version": v.version,
        "aliases": sorted(v.aliases),
        "tags": v.tags,
        "metrics": v.metrics,
        "created_at": int(v.created_at.timestamp()) if v.created_at else None,
        "archived_at": int(v.archived_at.timestamp()) if v.archived_at else None,
    }
    if usage is not None:
        out["renders"], out["images"] = usage.renders, usage.images
    return out


def canary_object(
    brand: str, canary: Canary, status: str, usage: dict[tuple[str, int], VersionUsage]
) -> dict:
    """A canary as the API shows it, with each side's renders since the challenger started."""
    none = VersionUsage(0, 0)

    def side(version: int | None) -> dict | None:
        if version is None:
            return None
        counts = usage.get((brand, version), none)
        return {"version": version, "renders": counts.renders, "images": counts.images}

    return {
        "object": "adapter.canary",
        "brand": brand,
        "status": status,
        "share": canary.share,
        "started_at": int(_started(canary).timestamp()) if canary.started_at else None,
        "champion": side(canary.champion),
        "challenger": side(canary.challenger),
    }


def _started(canary: Canary) -> dt.datetime | None:
    if not canary.started_at:
        return None
    try:
        when = dt.datetime.fromisoformat(canary.started_at)
    except ValueError:  # a hand-set tag: no start to count from
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


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
        tenants: TenantDirectory | None = None,
        db_pool: BlockingPool | None = None,
        on_alias_moved: Callable[[str, str, str], Awaitable[None]] | None = None,
        default_policy: promotion.PromotionPolicy | None = None,
    ) -> None:
        self.registry = registry
        self.pool = pool or BlockingPool("registry", 4)
        #: Render counts per version come from the farm database's usage rows (none: no counts).
        self.tenants = tenants
        self.db_pool = db_pool or BlockingPool("db", 2)
        # (tenant, brand, source): drops cached alias answers on every ingress (serve.alias_events)
        self.on_alias_moved = on_alias_moved
        self.default_policy = default_policy or promotion.PromotionPolicy()

    def _list(
        self,
        tenant_id: str,
        include_archived: bool,
        usage: dict[tuple[str, int], VersionUsage] | None,
    ) -> dict:
        none = VersionUsage(0, 0)
        data = []
        for brand in self.registry.brands(tenant_id):
            versions = self.registry.versions(tenant_id, brand, include_archived)
            data.append(
                {
                    "object": "adapter",
                    "brand": brand,
                    "versions": [
                        version_object(
                            v, None if usage is None else usage.get((brand, v.version), none)
                        )
                        for v in versions
                    ],
                }
            )
        return {"object": "list", "data": data}

    async def _usage(
        self, tenant_id: str, since: dt.datetime | None = None
    ) -> dict[tuple[str, int], VersionUsage] | None:
        if self.tenants is None:
            return None
        return await self.db_pool.run(self.tenants.adapter_usage, tenant_id, since)

    async def list(self, tenant_id: str, include_archived: bool = False) -> dict:
        usage = await self._usage(tenant_id)
        return await self._call("listing adapters", self._list, tenant_id, include_archived, usage)

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
        except CanaryConflict as e:
            raise APIError(409, str(e), param="version", code="canary_conflict") from None
        except CanaryNotFound as e:
            raise APIError(404, str(e), param="brand", code="canary_not_found") from None
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
        if alias == CHALLENGER:
            raise InvalidField(
                "alias",
                f"alias {CHALLENGER!r} is the canary's challenger: set it with "
                f"PUT /v1/adapters/{brand}/canary",
            )
        version = await self._call(
            f"setting alias {alias} of {brand}",
            self._promote,
            tenant_id,
            brand,
            alias,
            req.version,
            req.force,
        )
        await self._moved(tenant_id, brand)
        return version_object(version)

    async def _moved(self, tenant_id: str, brand: str) -> None:
        """An alias or the canary moved: drop cached answers on every ingress before answering,
        so the next render sees it (a canary's share is a model tag, which MLflow's alias
        webhook does not report)."""
        if self.on_alias_moved is not None:
            await self.on_alias_moved(tenant_id, brand, "api")

    # --- canary ------------------------------------------------------------------------------

    async def _canary_usage(self, tenant_id: str, canary: Canary) -> dict:
        return await self._usage(tenant_id, _started(canary)) or {}

    async def get_canary(self, tenant_id: str, brand: str) -> dict:
        _check_brand(brand)
        running = await self._call(
            f"reading the canary of {brand}", self._running, tenant_id, brand
        )
        usage = await self._canary_usage(tenant_id, running)
        return canary_object(brand, running, "running", usage)

    async def start_canary(self, tenant_id: str, brand: str, req: CanaryRequest) -> dict:
        _check_brand(brand)
        started = await self._call(
            f"starting a canary of {brand}",
            self.registry.start_canary,
            tenant_id,
            brand,
            req.version,
            req.share,
        )
        await self._moved(tenant_id, brand)
        usage = await self._canary_usage(tenant_id, started)
        return canary_object(brand, started, "running", usage)

    async def promote_canary(self, tenant_id: str, brand: str, force: bool = False) -> dict:
        """Point `production` at the challenger (the same call as any promotion, with its
        checks), then end the canary. A refused promotion leaves the canary running."""
        _check_brand(brand)
        running = await self._call(
            f"reading the canary of {brand}", self._running, tenant_id, brand
        )
        await self.set_alias(
            tenant_id, brand, PRODUCTION, AliasRequest(version=running.challenger, force=force)
        )
        await self._call(
            f"ending the canary of {brand}", self.registry.end_canary, tenant_id, brand
        )
        await self._moved(tenant_id, brand)
        usage = await self._canary_usage(tenant_id, running)
        return canary_object(brand, running, "promoted", usage)

    async def drop_canary(self, tenant_id: str, brand: str) -> dict:
        """End the canary; the champion keeps `production` and every render."""
        _check_brand(brand)
        ended = await self._call(
            f"ending the canary of {brand}", self.registry.end_canary, tenant_id, brand
        )
        await self._moved(tenant_id, brand)
        usage = await self._canary_usage(tenant_id, ended)
        return canary_object(brand, ended, "dropped", usage)

    def _running(self, tenant_id: str, brand: str) -> Canary:
        running = self.registry.canary(tenant_id, brand)
        if running is None:
            raise CanaryNotFound(f"adapter {brand!r} has no canary running")
        return running

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
