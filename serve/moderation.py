"""Content policy at the API: the check the feature services call before any work, and the
routes a tenant uses to set its policy and read its audit trail (`registry.content_policy`).

A refusal answers 400 `content_policy_violation` naming the field and the rule; the only thing
it leaves behind is a moderation event (nothing rendered, stored or charged).
"""

# No `from __future__ import annotations`: FastAPI must see the route parameters' real types,
# which name values imported inside `moderation_router` (serve.api imports this module).
from typing import Annotated

from cachetools import TTLCache
from fastapi import APIRouter, Body, Depends, Query

from registry.content_policy import (
    ContentPolicy,
    Moderation,
    PolicyError,
    PolicyStore,
    find_violation,
    parse_policy,
    stricter,
)
from serve import request_context
from serve.errors import APIError
from serve.io_pools import BlockingPool


class ModerationService:
    """Checks texts against the farm's policy and the tenant's, and records refusals."""

    def __init__(
        self,
        store: PolicyStore,
        farm: ContentPolicy,
        pool: BlockingPool,
        cache_ttl_s: float = 2.0,
    ) -> None:
        self.store = store
        self.farm = farm
        self.pool = pool
        # Another ingress replica's policy change shows here within `cache_ttl_s`.
        self._policies: TTLCache[str, ContentPolicy] = TTLCache(maxsize=4096, ttl=cache_ttl_s)

    async def policy(self, tenant_id: str) -> ContentPolicy:
        cached = self._policies.get(tenant_id)
        if cached is None:
            cached = await self.pool.run(self.store.get, tenant_id)
            self._policies[tenant_id] = cached
        return cached

    async def check(
        self,
        tenant_id: str,
        source: str,
        texts: dict[str, str | None],
        moderation: Moderation | None = None,
    ) -> None:
        """Refuse (400) the first text that breaks the farm's or the tenant's policy, after
        recording the refusal. `texts` maps the field a client would fix to its text."""
        tenant = await self.policy(tenant_id)
        level = stricter(tenant.moderation, moderation)
        for field, text in texts.items():
            if not text:
                continue
            for scope, policy in (("farm", self.farm), ("tenant", tenant)):
                violation = find_violation(policy, text, scope, level)
                if violation is None:
                    continue
                await self.pool.run(
                    self.store.record,
                    tenant_id,
                    source,
                    field,
                    violation,
                    request_context.request_id.get(),
                )
                raise APIError(
                    400,
                    violation.describe(field),
                    param=field,
                    code="content_policy_violation",
                )

    async def set_policy(self, tenant_id: str, document: object) -> dict:
        try:
            policy = parse_policy(document)
        except PolicyError as e:
            raise APIError(400, str(e), param=e.rule, code="invalid_policy") from None
        await self.pool.run(self.store.put, tenant_id, policy)
        self._policies[tenant_id] = policy
        return policy_object(policy)

    async def events(self, tenant_id: str, after: int, limit: int) -> dict:
        rows = await self.pool.run(self.store.events, tenant_id, after, limit + 1)
        return {"object": "list", "data": rows[:limit], "has_more": len(rows) > limit}


def policy_object(policy: ContentPolicy) -> dict:
    return {"object": "moderation.policy", **policy.model_dump()}


def moderation_router(service: ModerationService) -> APIRouter:
    """The tenant's policy and audit routes."""
    from serve.api import MAX_EVENT_ID, authenticated_tenant, documented  # api imports this

    router = APIRouter()
    tenant_of = Depends(authenticated_tenant)

    @router.get("/v1/moderation/policy", responses=documented(503))
    async def get_policy(tenant: str = tenant_of) -> dict:
        return policy_object(await service.policy(tenant))

    @router.put("/v1/moderation/policy", responses=documented(503))
    async def put_policy(
        tenant: str = tenant_of,
        *,
        document: Annotated[
            dict,
            Body(
                description="The whole policy: blocked_terms, blocked_patterns, "
                "protected_marks, sensitive_terms, moderation (auto|low)."
            ),
        ],
    ) -> dict:
        return await service.set_policy(tenant, document)

    @router.get("/v1/moderation/events", responses=documented(503))
    async def moderation_events(
        tenant: str = tenant_of,
        *,
        after: Annotated[
            int, Query(ge=0, le=MAX_EVENT_ID, description="An event id: list the events after it.")
        ] = 0,
        limit: Annotated[int, Query(ge=1, le=1000, description="Events per page.")] = 100,
    ) -> dict:
        return await service.events(tenant, after, limit)

    return router
