"""Render retention: renders older than a tenant's retention (its override, else the farm's
`render_retention_days`) lose their stored images; their usage row stays, marked expired. The
same sweeper prunes the render queue's and the webhook outbox's finished rows
(`registry.queue_retention`).

Each render's objects live under `tenants/<tenant>/renders/<render id>/`, a prefix built from the
row's own tenant, so a sweep never touches another tenant's objects. Objects go first, then the
row is marked: a sweep interrupted in between deletes the rest next time. Sweeps are idempotent,
so several ingress replicas may run them at once.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from registry.limits import EffectiveLimits
from registry.queue_retention import PruneReport, prune_queue_rows
from registry.settings import Settings
from registry.sql_base import utcnow
from registry.storage import ObjectStore, tenant_prefix
from registry.tenants import RenderRow, TenantDirectory

log = logging.getLogger(__name__)
_BATCH = 500

#: Told (tenant, bytes deleted) after each render expires: the ingress's stored-bytes cache.
DeletedObserver = Callable[[str, int], None]


@dataclass
class SweepReport:
    renders: int = 0
    objects: int = 0
    bytes: int = 0
    per_tenant: dict[str, int] = field(default_factory=dict)


def render_prefix(tenant_id: str, render_id: str) -> str:
    return f"{tenant_prefix(tenant_id)}renders/{render_id}/"


def expire_renders(
    settings: Settings,
    tenants: TenantDirectory,
    store: ObjectStore,
    now: dt.datetime | None = None,
    dry_run: bool = False,
    on_deleted: DeletedObserver | None = None,
) -> SweepReport:
    """Delete every render past its tenant's retention; returns what went (or, with
    `dry_run`, what would go). A store failure stops the sweep (`StorageError`)."""
    now = now or utcnow()
    report = SweepReport()
    for tenant in tenants.list_tenants():
        days = EffectiveLimits.of(settings, tenant.limits).render_retention_days
        if days is None:
            continue
        cutoff = now - dt.timedelta(days=days)
        last = ""  # keyset paging by id: a dry run marks nothing, so it cannot re-query
        while True:
            with Session(tenants.engine) as s:
                ids = list(
                    s.scalars(
                        select(RenderRow.id)
                        .where(
                            RenderRow.tenant_id == tenant.id,
                            RenderRow.expired_at.is_(None),
                            RenderRow.created_at < cutoff,
                            RenderRow.id > last,
                        )
                        .order_by(RenderRow.id)
                        .limit(_BATCH)
                    )
                )
            if not ids:
                break
            last = ids[-1]
            for render_id in ids:
                objects = store.list(render_prefix(tenant.id, render_id))
                nbytes = sum(o.size for o in objects)
                if not dry_run:
                    for o in objects:
                        store.delete(o.key)
                    with Session(tenants.engine) as s, s.begin():
                        s.execute(
                            update(RenderRow)
                            .where(
                                RenderRow.id == render_id,
                                RenderRow.tenant_id == tenant.id,
                                RenderRow.expired_at.is_(None),
                            )
                            .values(expired_at=now)
                        )
                    if on_deleted is not None:
                        on_deleted(tenant.id, nbytes)
                report.renders += 1
                report.objects += len(objects)
                report.bytes += nbytes
                report.per_tenant[tenant.id] = report.per_tenant.get(tenant.id, 0) + 1
    return report


class RetentionSweeper:
    """Runs `expire_renders` every `render_retention_sweep_interval_s` on a daemon thread
    (the ingress starts one); a failed sweep is logged and retried at the next interval."""

    def __init__(
        self,
        settings: Settings,
        tenants: TenantDirectory,
        store: ObjectStore,
        on_deleted: DeletedObserver | None = None,
    ) -> None:
        self.settings = settings
        self.tenants = tenants
        self.store = store
        self.on_deleted = on_deleted
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="render-retention", daemon=True)
        #: What the latest sweep did (None if it failed), and an event set after each sweep.
        self.last_report: SweepReport | None = None
        self.last_pruned: PruneReport | None = None
        self.swept = threading.Event()

    def start(self) -> RetentionSweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            report = None
            try:
                report = expire_renders(
                    self.settings, self.tenants, self.store, on_deleted=self.on_deleted
                )
                if report.renders:
                    log.info(
                        "render retention: expired %d renders (%d objects, %d bytes)",
                        report.renders,
                        report.objects,
                        report.bytes,
                    )
            except Exception as e:  # noqa: BLE001 - a sweep that failed runs again next time
                log.warning("render retention sweep failed: %s", e)
            self.last_report = report
            self.last_pruned = self._prune()
            self.swept.set()
            self._stop.wait(self.settings.render_retention_sweep_interval_s)

    def _prune(self) -> PruneReport | None:
        s = self.settings
        try:
            pruned = prune_queue_rows(
                self.tenants.engine,
                s.render_task_retention_days,
                s.webhook_delivery_retention_days,
                s.retention_batch_rows,
            )
        except Exception as e:  # noqa: BLE001 - e.g. the database briefly down: next time
            log.warning("render queue / webhook retention failed: %s", e)
            return None
        if pruned.render_tasks or pruned.deliveries:
            log.info(
                "retention: deleted %d finished render tasks, %d webhook deliveries",
                pruned.render_tasks,
                pruned.deliveries,
            )
        return pruned
