"""Tenant limits and render retention against a real object store and SQL (SQLite, Postgres):
effective limits, stored bytes from the tenant's prefix, job caps, and the retention sweep."""

from __future__ import annotations

import datetime as dt
import secrets

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.jobs import JobStore
from registry.limits import EffectiveLimits, LimitExceeded, TenantLimits
from registry.retention import RetentionSweeper, expire_renders, render_prefix
from registry.settings import Settings
from registry.sql_base import utcnow
from registry.storage import ObjectStore, render_key, tenant_prefix
from registry.tenants import LimitOverrides, RenderRow, TenantDirectory, TenantError
from tests.object_store import s3_settings  # noqa: F401 - fixture


def name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


@pytest.fixture
def store(s3_settings: Settings) -> ObjectStore:  # noqa: F811
    return ObjectStore.from_settings(s3_settings)


def test_a_tenant_override_wins_over_the_farm_setting() -> None:
    settings = Settings(max_queued_jobs_per_tenant=5, render_retention_days=30)
    limits = EffectiveLimits.of(settings, LimitOverrides(max_queued_jobs=1, max_stored_bytes=9))
    assert limits.max_queued_jobs == 1 and limits.max_stored_bytes == 9
    assert limits.render_retention_days == 30 and limits.max_concurrent_fine_tunes is None


def test_set_limits_validates_and_resets(sql_engine) -> None:
    tenants = TenantDirectory(sql_engine)
    tenants.create_tenant("acme")
    assert tenants.set_limits("acme", max_stored_bytes=10**12).limits.max_stored_bytes == 10**12
    with pytest.raises(TenantError, match=r"max_queued_jobs must be a whole number in \[0, "):
        tenants.set_limits("acme", max_queued_jobs=-1)
    with pytest.raises(TenantError, match="got True"):
        tenants.set_limits("acme", max_concurrent_fine_tunes=True)
    with pytest.raises(TenantError, match="render_retention_days must be > 0"):
        tenants.set_limits("acme", render_retention_days=0)
    with pytest.raises(TenantError, match="no tenant"):
        tenants.set_limits("nobody", max_queued_jobs=1)
    assert tenants.set_limits("acme", max_stored_bytes=None).limits == LimitOverrides()


def test_stored_bytes_are_the_tenant_prefix_only(sql_engine, store: ObjectStore) -> None:
    tenants = TenantDirectory(sql_engine)
    acme, other = name("acme"), name("acme")  # `other` shares acme's name as a prefix
    for t in (acme, other):
        tenants.create_tenant(t)
    store.put_bytes(f"{tenant_prefix(acme)}files/a.zip", b"a" * 1000)
    store.put_bytes(render_key(acme, "r1", 0), b"p" * 200)
    store.put_bytes(f"{tenant_prefix(acme)}checkpoints/j/step-4/lora.bin", b"c" * 30)
    store.put_bytes(f"{tenant_prefix(other)}files/b.zip", b"b" * 5000)
    tenants.set_limits(acme, max_stored_bytes=1230)
    limits = TenantLimits(Settings(stored_bytes_cache_ttl_s=0), tenants, store)
    assert limits.stored_bytes(acme) == 1230
    with pytest.raises(LimitExceeded) as refused:
        limits.check_stored_bytes(acme)  # at the cap: nothing more of unknown size
    assert (refused.value.limit, refused.value.cap, refused.value.used) == (
        "max_stored_bytes",
        1230,
        1230,
    )
    assert not refused.value.retryable and "1230 bytes" in str(refused.value)
    tenants.set_limits(acme, max_stored_bytes=2000)
    limits.check_stored_bytes(acme, adding=770)  # exactly to the cap is allowed
    with pytest.raises(LimitExceeded, match="this request adds 771"):
        limits.check_stored_bytes(acme, adding=771)


def test_the_cached_total_counts_this_replicas_writes(sql_engine, store: ObjectStore) -> None:
    tenants = TenantDirectory(sql_engine)
    acme = name("acme")
    tenants.create_tenant(acme)
    limits = TenantLimits(Settings(stored_bytes_cache_ttl_s=3600), tenants, store)
    assert limits.stored_bytes(acme) == 0
    store.put_bytes(render_key(acme, "r2", 0), b"x" * 300)
    assert limits.stored_bytes(acme) == 0  # cached: the listing is not repeated
    limits.stored(acme, 300)
    assert limits.stored_bytes(acme) == 300
    limits.stored(acme, -1000)
    assert limits.stored_bytes(acme) == 0  # never below zero


def test_job_caps_count_queued_and_running(sql_engine, store: ObjectStore) -> None:
    tenants, jobs = TenantDirectory(sql_engine), JobStore(sql_engine)
    for t in ("acme", "globex"):
        tenants.create_tenant(t)
    settings = Settings(max_concurrent_fine_tunes_per_tenant=3, max_queued_jobs_per_tenant=2)
    limits = TenantLimits(settings, tenants, store)

    def new_job(tenant: str, key: str | None = None) -> str:
        return jobs.create(tenant, "logo", "file-1", "m", {"seed": 1}, key)[0].id

    first = new_job("acme", "k1")
    new_job("acme")
    with pytest.raises(LimitExceeded) as queued:
        limits.check_new_job("acme", None)
    assert (queued.value.limit, queued.value.used, queued.value.retryable) == (
        "max_queued_jobs",
        2,
        True,
    )
    limits.check_new_job("acme", "k1")  # a retried create returns its job: never refused
    limits.check_new_job("globex", None)  # another tenant's jobs do not count
    jobs.mark_running(first, worker_pid=1)
    new_job("acme")  # 1 running + 2 queued = 3 unfinished
    with pytest.raises(LimitExceeded, match=r"3 unfinished \(1 running, 2 queued\)") as conc:
        limits.check_new_job("acme", None)
    assert conc.value.limit == "max_concurrent_fine_tunes"
    jobs.finish(first, "succeeded", adapter_version=1)
    tenants.set_limits("acme", max_queued_jobs=3)
    limits.check_new_job("acme", None)  # 2 unfinished, 2 queued: room under both caps
    tenants.set_limits("acme", max_queued_jobs=0)
    with pytest.raises(LimitExceeded, match="plan allows no fine-tune jobs") as plan:
        limits.check_new_job("acme", None)
    assert not plan.value.retryable  # 403: waiting does not help


def test_retention_expires_only_old_renders_of_tenants_with_retention(
    sql_engine, store: ObjectStore
) -> None:
    tenants = TenantDirectory(sql_engine)
    acme, globex = name("acme"), name("globex")
    for t in (acme, globex):
        tenants.create_tenant(t)
    tenants.set_limits(acme, render_retention_days=1)  # globex: farm default, keep forever
    now = utcnow()
    renders = {  # (tenant, render id) -> age
        (acme, "old" + secrets.token_hex(4)): dt.timedelta(days=2),
        (acme, "new" + secrets.token_hex(4)): dt.timedelta(hours=2),
        (globex, "old" + secrets.token_hex(4)): dt.timedelta(days=30),
    }
    for (tenant, render_id), age in renders.items():
        for i in range(2):
            store.put_bytes(render_key(tenant, render_id, i), b"png" * 10)
        tenants.record_render(render_id, tenant, 2, "m")
        with Session(sql_engine) as s, s.begin():
            s.get(RenderRow, render_id).created_at = now - age
    (old, new, kept) = renders

    dry = expire_renders(Settings(), tenants, store, now=now, dry_run=True)
    assert (dry.renders, dry.objects, dry.bytes) == (1, 2, 60)
    assert len(store.list(render_prefix(*old))) == 2  # a dry run deletes nothing

    deleted: list[tuple[str, int]] = []
    report = expire_renders(
        Settings(), tenants, store, now=now, on_deleted=lambda t, n: deleted.append((t, n))
    )
    assert (report.renders, report.objects, report.per_tenant) == (1, 2, {acme: 1})
    assert deleted == [(acme, 60)]
    assert store.list(render_prefix(*old)) == []
    assert len(store.list(render_prefix(*new))) == 2
    assert len(store.list(render_prefix(*kept))) == 2
    with Session(sql_engine) as s:
        expired = dict(s.execute(select(RenderRow.id, RenderRow.expired_at)).all())
    assert expired[old[1]] is not None and expired[new[1]] is None and expired[kept[1]] is None
    assert tenants.count_renders(acme) == 2  # usage rows stay

    again = expire_renders(Settings(), tenants, store, now=now)
    assert again.renders == 0  # idempotent
    farm_wide = expire_renders(Settings(render_retention_days=7), tenants, store, now=now)
    assert farm_wide.per_tenant == {globex: 1}  # the farm's setting reaches globex too
    assert store.list(render_prefix(*kept)) == []


def test_the_ingress_sweeper_expires_renders_on_its_own(sql_engine, store: ObjectStore) -> None:
    tenants = TenantDirectory(sql_engine)
    acme = name("acme")
    tenants.create_tenant(acme)
    render_id = "old" + secrets.token_hex(4)
    store.put_bytes(render_key(acme, render_id, 0), b"png")
    tenants.record_render(render_id, acme, 1, "m")
    with Session(sql_engine) as s, s.begin():
        s.get(RenderRow, render_id).created_at = utcnow() - dt.timedelta(hours=3)
    freed: list[int] = []
    settings = Settings(render_retention_days=0.1)  # 2.4 hours
    sweeper = RetentionSweeper(settings, tenants, store, on_deleted=lambda _t, n: freed.append(n))
    sweeper.start()
    try:
        assert sweeper.swept.wait(timeout=120)  # the first sweep runs at start
    finally:
        sweeper.stop()
    assert sweeper.last_report is not None and sweeper.last_report.per_tenant.get(acme) == 1
    assert store.list(render_prefix(acme, render_id)) == [] and freed == [3]
