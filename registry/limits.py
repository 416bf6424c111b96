"""Per-tenant caps on fine-tune jobs and stored bytes: the limits that apply to a tenant (its
override, else the farm's setting), its current use, and the checks that refuse work over a cap.

Stored bytes are everything the object store holds under `tenants/<tenant>/` (uploads,
checkpoints, renders), summed from a listing of that prefix. A listing, not an SQL ledger,
because training workers write checkpoints straight to the store with no SQL record, and a
listing cannot drift from what is really stored. It costs one LIST per ~1000 objects, so the
total is cached for `stored_bytes_cache_ttl_s` and the ingress adds its own writes to the cached
total in between. Limits of that choice: each ingress replica has its own cache, so writes by
another replica or by a training worker show only at the next listing; a render or a job is
admitted while the total is under the cap, and its size is known only afterwards, so a tenant
can end above its cap by what requests admitted just under it (and its running jobs) write.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass

from cachetools import TTLCache
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from registry.jobs import JobRow
from registry.settings import Settings
from registry.storage import ObjectStore, tenant_prefix
from registry.tenant_lock import tenant_lock
from registry.tenants import LimitOverrides, TenantDirectory

#: Override name (SQL column, CLI flag) → the farm-wide setting it overrides.
SETTING_OF = {
    "max_concurrent_fine_tunes": "max_concurrent_fine_tunes_per_tenant",
    "max_queued_jobs": "max_queued_jobs_per_tenant",
    "max_stored_bytes": "max_stored_bytes_per_tenant",
    "render_retention_days": "render_retention_days",
    "max_inflight_renders": "max_inflight_per_tenant",
}


class LimitExceeded(Exception):
    """A request would take a tenant over one of its caps. `retryable`: it clears by itself as
    jobs end (429); otherwise it is a plan limit that needs the tenant to act (403)."""

    def __init__(self, limit: str, cap: int, used: int, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.limit = limit
        self.cap = cap
        self.used = used
        self.retryable = retryable


@dataclass(frozen=True)
class EffectiveLimits:
    """The caps that apply to one tenant; None means no cap."""

    max_concurrent_fine_tunes: int | None
    max_queued_jobs: int | None
    max_stored_bytes: int | None
    render_retention_days: float | None
    max_inflight_renders: int | None

    @classmethod
    def of(cls, settings: Settings, overrides: LimitOverrides) -> EffectiveLimits:
        def pick(name: str):  # noqa: ANN202 - int or float, as the field
            own = getattr(overrides, name)
            return own if own is not None else getattr(settings, SETTING_OF[name])

        return cls(**{name: pick(name) for name in SETTING_OF})


class TenantLimits:
    """Checks requests against a tenant's caps. Thread-safe; one per ingress replica."""

    def __init__(self, settings: Settings, tenants: TenantDirectory, store: ObjectStore) -> None:
        self.settings = settings
        self.tenants = tenants
        self.store = store
        ttl = settings.stored_bytes_cache_ttl_s
        self._stored: TTLCache | None = TTLCache(maxsize=100_000, ttl=ttl) if ttl > 0 else None
        self._lock = threading.Lock()

    def limits_for(self, tenant_id: str) -> EffectiveLimits:
        tenant = self.tenants.get_tenant(tenant_id)
        return EffectiveLimits.of(self.settings, tenant.limits if tenant else LimitOverrides())

    # --- stored bytes -------------------------------------------------------------------------
    def stored_bytes(self, tenant_id: str) -> int:
        """Bytes under the tenant's prefix: cached listing total plus this replica's writes."""
        if self._stored is not None:
            with self._lock:
                cached = self._stored.get(tenant_id)
            if cached is not None:
                return cached
        total = sum(o.size for o in self.store.list(tenant_prefix(tenant_id)))
        if self._stored is not None:
            with self._lock:
                self._stored[tenant_id] = total
        return total

    def stored(self, tenant_id: str, nbytes: int) -> None:
        """Account bytes this replica just wrote (or, negative, deleted) for the tenant."""
        if self._stored is None:
            return
        with self._lock:
            cached = self._stored.get(tenant_id)
            if cached is not None:
                self._stored[tenant_id] = max(0, cached + nbytes)

    def check_stored_bytes(self, tenant_id: str, adding: int = 0) -> None:
        """Refuse (403) when the tenant is at its storage cap, or would pass it by `adding`
        bytes (0 when the size is not known yet: a render, a job's checkpoints)."""
        cap = self.limits_for(tenant_id).max_stored_bytes
        if cap is None:
            return  # no listing at all for tenants without a cap
        used = self.stored_bytes(tenant_id)
        if used + adding > cap or (adding == 0 and used >= cap):
            wants = f"; this request adds {adding}" if adding else ""
            raise LimitExceeded(
                "max_stored_bytes",
                cap,
                used,
                f"storage limit reached: this tenant stores {used} bytes of its "
                f"max_stored_bytes={cap}{wants}; delete files (DELETE /v1/files/{{id}}) or let "
                "renders expire",
                retryable=False,
            )

    # --- fine-tune jobs -----------------------------------------------------------------------
    def job_counts(self, tenant_id: str) -> dict[str, int]:
        """The tenant's queued and running jobs."""
        with Session(self.tenants.engine) as s:
            rows = s.execute(
                select(JobRow.status, func.count())
                .where(JobRow.tenant_id == tenant_id, JobRow.status.in_(("queued", "running")))
                .group_by(JobRow.status)
            ).all()
        return {"queued": 0, "running": 0, **{status: int(n) for status, n in rows}}

    def job_exists(self, tenant_id: str, idempotency_key: str | None) -> bool:
        """A create with this key returns the job made before: it adds nothing to count."""
        if not idempotency_key:
            return False
        with Session(self.tenants.engine) as s:
            found = s.scalar(
                select(JobRow.id).where(
                    JobRow.tenant_id == tenant_id, JobRow.idempotency_key == idempotency_key
                )
            )
        return found is not None

    def check_job_slots(self, tenant_id: str) -> None:
        """Refuse (429) a new job when the tenant is at its unfinished-job or queued-job cap
        (403 when a cap is 0: the tenant's plan has no fine-tuning).

        Every accepted job goes to the Ray cluster at once and starts when Ray has room, so
        each unfinished job (queued or running) counts as a concurrent fine-tune; the queued
        cap bounds those still waiting for the cluster."""
        limits = self.limits_for(tenant_id)
        if limits.max_concurrent_fine_tunes is None and limits.max_queued_jobs is None:
            return
        for name in ("max_concurrent_fine_tunes", "max_queued_jobs"):
            if getattr(limits, name) == 0:  # no waiting helps: a plan without fine-tuning
                raise LimitExceeded(
                    name,
                    0,
                    0,
                    f"this tenant's plan allows no fine-tune jobs ({name}=0)",
                    retryable=False,
                )
        n = self.job_counts(tenant_id)
        unfinished = n["queued"] + n["running"]
        cap = limits.max_concurrent_fine_tunes
        if cap is not None and unfinished >= cap:
            raise LimitExceeded(
                "max_concurrent_fine_tunes",
                cap,
                unfinished,
                f"too many fine-tune jobs: this tenant has {unfinished} unfinished "
                f"({n['running']} running, {n['queued']} queued) of its "
                f"max_concurrent_fine_tunes={cap}; retry when one ends",
                retryable=True,
            )
        cap = limits.max_queued_jobs
        if cap is not None and n["queued"] >= cap:
            raise LimitExceeded(
                "max_queued_jobs",
                cap,
                n["queued"],
                f"too many queued fine-tune jobs: this tenant has {n['queued']} queued of its "
                f"max_queued_jobs={cap}; retry when one starts",
                retryable=True,
            )

    def check_new_job(self, tenant_id: str, idempotency_key: str | None) -> None:
        """The job caps and the storage cap, for a create; a retried create (same key) returns
        the job made before, so it is never refused."""
        if not self.job_exists(tenant_id, idempotency_key):
            self.check_job_slots(tenant_id)
            self.check_stored_bytes(tenant_id)

    def admission(self, tenant_id: str) -> AbstractContextManager[None]:
        """Hold while checking and recording a new job, so that two creates of one tenant
        cannot both take its last slot, on any ingress replica (`registry.tenant_lock`)."""
        return tenant_lock(self.tenants.engine, tenant_id, "job-admission")
