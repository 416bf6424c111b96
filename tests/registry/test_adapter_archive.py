"""Adapter version housekeeping against the farm's real MLflow server (artifacts on its S3):
archiving hides a version and refuses it while an alias points at it, the retention sweep
deletes archived weights only after `adapter_archive_retention_days`, and the API shows
lineage and answers another tenant's brand exactly as a missing one."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from pathlib import Path

import mlflow.artifacts
import pytest
from mlflow import MlflowClient

from registry.adapter_retention import expire_archived_adapters
from registry.adapters import (
    WEIGHTS_DELETED_TAG,
    AdapterArchived,
    AdapterInUse,
    AdapterNotFound,
    AdapterRef,
    AdapterRegistry,
    AdapterVersion,
)
from tests.registry import test_adapters as shared
from tests.registry.test_adapters import Adapters, lineage, new_run, not_found_message

# The registry tests' fixtures: two small LoRA folders, the registry and a client of the farm's.
adapters, registry, client = shared.adapters, shared.registry, shared.client

BRAND = "acme"


@dataclass(frozen=True)
class Brand:
    tenant: str  # owns BRAND: v1 (no alias), v2 (production), v3 (staging)
    key: str  # its API key
    other_key: str  # another tenant's API key


@pytest.fixture(scope="module")
def brand(farm, registry: AdapterRegistry, client: MlflowClient, adapters: Adapters) -> Brand:
    tenant, other = f"arch-{uuid.uuid4().hex[:8]}", f"arch-other-{uuid.uuid4().hex[:8]}"
    key, other_key = farm.new_tenant(tenant), farm.new_tenant(other)
    for n, folder in enumerate((adapters.first, adapters.second, adapters.first), start=1):
        run = new_run(client, tenant, loss=0.1 * n)
        registry.register(
            tenant, BRAND, folder, run_id=run, tags=lineage(f"job-{n}", adapters.base)
        )
    registry.set_alias(tenant, BRAND, "production", 2)
    return Brand(tenant, key, other_key)


def stored_files(registry: AdapterRegistry, tenant: str, version: int) -> list[str]:
    uri = registry.client.get_model_version_download_uri(f"{tenant}.{BRAND}", str(version))
    found = mlflow.artifacts.list_artifacts(artifact_uri=uri, tracking_uri=registry.tracking_uri)
    return [f.path for f in found or []]


def test_archive_hides_the_version_and_resolution_refuses_it(
    registry: AdapterRegistry, brand: Brand
) -> None:
    v1 = registry.archive(brand.tenant, BRAND, 1)
    assert v1.archived_at is not None and v1.aliases == ()
    assert registry.archive(brand.tenant, BRAND, 1).archived_at == v1.archived_at  # idempotent
    assert [v.version for v in registry.versions(brand.tenant, BRAND)] == [3, 2]
    everything = registry.versions(brand.tenant, BRAND, include_archived=True)
    assert [(v.version, v.archived_at is not None) for v in everything] == [
        (3, False),
        (2, False),
        (1, True),
    ]
    with pytest.raises(AdapterNotFound, match="archived"):
        registry.resolve(brand.tenant, AdapterRef(BRAND, version=1))
    with pytest.raises(AdapterArchived, match="archived"):
        registry.set_alias(brand.tenant, BRAND, "canary", 1)
    assert "canary" not in registry.get(brand.tenant, BRAND, 1).aliases
    assert stored_files(registry, brand.tenant, 1)  # the weights stay until the retention


def test_archive_refuses_while_an_alias_points_at_the_version(
    registry: AdapterRegistry, brand: Brand
) -> None:
    with pytest.raises(AdapterInUse, match="production") as e:
        registry.archive(brand.tenant, BRAND, 2)
    assert e.value.aliases == ("production",)
    assert registry.get(brand.tenant, BRAND, 2).archived_at is None
    assert registry.resolve(brand.tenant, AdapterRef.parse(BRAND)).version == 2


def test_another_tenant_archives_nothing_and_reads_not_found(
    registry: AdapterRegistry, brand: Brand
) -> None:
    stranger = f"arch-x-{uuid.uuid4().hex[:8]}"
    foreign = not_found_message(lambda: registry.archive(stranger, BRAND, 3))
    missing = not_found_message(lambda: registry.archive(brand.tenant, "no-such-brand", 3))
    assert foreign == missing.replace("no-such-brand", BRAND)
    assert registry.get(brand.tenant, BRAND, 3).archived_at is None


def test_retention_deletes_only_weights_archived_longer_than_the_setting(
    farm, registry: AdapterRegistry, brand: Brand, tmp_path: Path
) -> None:
    registry.archive(brand.tenant, BRAND, 1)  # already archived if the first test ran
    settings = farm.settings.model_copy(update={"adapter_archive_retention_days": 1.0})
    mine = f"{brand.tenant}/{BRAND}:1"
    now = dt.datetime.now(dt.UTC)
    assert mine not in expire_archived_adapters(settings, farm.tenants, registry, now).versions
    later = now + dt.timedelta(days=2)
    dry = expire_archived_adapters(settings, farm.tenants, registry, later, dry_run=True)
    assert mine in dry.versions and stored_files(registry, brand.tenant, 1)

    done = expire_archived_adapters(settings, farm.tenants, registry, later)
    assert mine in done.versions
    assert not any(v.startswith(f"{brand.tenant}/") and v != mine for v in done.versions)
    assert stored_files(registry, brand.tenant, 1) == []
    v1 = registry.get(brand.tenant, BRAND, 1)
    assert v1.tags[WEIGHTS_DELETED_TAG] and v1.tags["job_id"] == "job-1"  # lineage stays
    with pytest.raises(AdapterNotFound, match="weights deleted"):
        registry.download(v1, tmp_path)
    assert stored_files(registry, brand.tenant, 2) and stored_files(registry, brand.tenant, 3)
    again = expire_archived_adapters(settings, farm.tenants, registry, later)
    assert mine not in again.versions
    unset = settings.model_copy(update={"adapter_archive_retention_days": None})
    assert expire_archived_adapters(unset, farm.tenants, registry, later).versions == []


def test_api_archives_shows_lineage_and_hides_foreign_brands(
    farm, brand: Brand, adapters: Adapters
) -> None:
    with farm.http(brand.key) as c, farm.http(brand.other_key) as stranger:
        detail = c.get(f"/adapters/{BRAND}/versions/3")
        assert detail.status_code == 200, detail.text
        body = detail.json()
        assert body["lineage"]["job_id"] == "job-3"
        assert body["lineage"]["dataset_sha256"] == "d" * 64
        assert body["lineage"]["base_model_revision"] == adapters.base.revision
        assert body["lineage"]["base_model"] == adapters.base.id
        assert body["archived_at"] is None and body["weights"] == "stored"

        in_use = c.delete(f"/adapters/{BRAND}/versions/2")
        assert in_use.status_code == 409, in_use.text
        assert in_use.json()["error"]["code"] == "adapter_version_in_use"
        assert "production" in in_use.json()["error"]["message"]

        foreign = stranger.delete(f"/adapters/{BRAND}/versions/3")
        missing = stranger.delete("/adapters/no-such-brand/versions/3")
        assert foreign.status_code == missing.status_code == 404
        assert foreign.json()["error"]["message"] == missing.json()["error"]["message"].replace(
            "no-such-brand", BRAND
        )
        assert c.delete(f"/adapters/{BRAND}/versions/99").status_code == 404

        moved = c.post(f"/adapters/{BRAND}/aliases/staging", json={"version": 2})
        assert moved.status_code == 200, moved.text
        archived = c.delete(f"/adapters/{BRAND}/versions/3")
        assert archived.status_code == 200, archived.text
        assert archived.json()["archived_at"] is not None
        listed = c.get("/adapters").json()["data"]
        mine = next(a for a in listed if a["brand"] == BRAND)
        assert 3 not in [v["version"] for v in mine["versions"]]
        full = c.get(f"/adapters/{BRAND}/versions", params={"include_archived": "true"}).json()
        assert 3 in [v["version"] for v in full["data"]]
        refused = c.post(f"/adapters/{BRAND}/aliases/production", json={"version": 3})
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "adapter_version_archived"
        render = c.post(
            "/images/generations",
            json={"prompt": "a red circle", "steps": 1, "adapter": f"{BRAND}:3"},
        )
        assert render.status_code == 404, render.text


def test_archived_at_reads_the_tag_in_utc_and_tolerates_a_hand_set_one() -> None:
    created = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)

    def version(**tags: str) -> AdapterVersion:
        return AdapterVersion("t1", BRAND, 1, (), tags, {}, "", "", "", created)

    assert version().archived_at is None
    stamp = "2026-03-04T05:06:07+00:00"
    assert version(archived_at=stamp).archived_at == dt.datetime.fromisoformat(stamp)
    naive = version(archived_at="2026-03-04T05:06:07").archived_at
    assert naive == dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
    assert version(archived_at="yes").archived_at == created
