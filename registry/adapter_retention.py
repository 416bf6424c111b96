"""Archived adapter versions lose their weights after `adapter_archive_retention_days`.

`AdapterRegistry.archive` only tags a version (``archived_at``); its logged model's artifacts stay
in the object store so that an archive can be looked at, or its weights fetched by an operator,
for a while. This sweep deletes the artifacts of versions archived longer than the retention and
tags them ``weights_deleted_at``; the version itself (its lineage tags, its run) stays in MLflow.
The sweep goes tenant by tenant through the tenant-scoped registry calls, and is idempotent.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from registry.adapters import WEIGHTS_DELETED_TAG, AdapterRegistry
from registry.settings import Settings
from registry.tenants import TenantDirectory


@dataclass
class AdapterSweepReport:
    #: `<tenant>/<brand>:<version>` of every version whose weights went (or would go).
    versions: list[str] = field(default_factory=list)


def expire_archived_adapters(
    settings: Settings,
    tenants: TenantDirectory,
    registry: AdapterRegistry,
    now: dt.datetime | None = None,
    dry_run: bool = False,
) -> AdapterSweepReport:
    """Delete the weights of every version archived more than `adapter_archive_retention_days`
    ago (none when the setting is unset); with `dry_run`, only list them. A registry failure
    stops the sweep (`RegistryError`); what was done stays done."""
    report = AdapterSweepReport()
    days = settings.adapter_archive_retention_days
    if days is None:
        return report
    cutoff = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(days=days)
    for tenant in tenants.list_tenants():
        for brand in registry.brands(tenant.id):
            for version in registry.versions(tenant.id, brand, include_archived=True):
                archived = version.archived_at
                if archived is None or archived >= cutoff or version.tags.get(WEIGHTS_DELETED_TAG):
                    continue
                if not dry_run:
                    registry.delete_weights(version)
                report.versions.append(f"{tenant.id}/{brand}:{version.version}")
    return report
