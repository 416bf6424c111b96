"""The adapter-version routes in-process (MLflow refusing): bad input is a 400 naming the field,
an unreachable registry a 503, before anything is archived."""

from __future__ import annotations

import asyncio

from registry.adapter_refs import MAX_VERSION
from tests.serve.conftest import client


def test_version_routes_check_brand_and_version_then_answer_503_without_mlflow(local_parts):
    services = local_parts.services(local_parts.refused_url())
    key = services.tenants.create_tenant("versions-co").key

    async def go():
        async with client(services, key) as c:
            bad = [
                (await c.delete(f"/v1/adapters/acme/versions/{v}"), "version")
                for v in ("0", "x", str(MAX_VERSION + 1), "1.5")
            ]
            bad += [
                (await c.get("/v1/adapters/acme/versions/x"), "version"),
                (await c.delete("/v1/adapters/Bad_Brand/versions/1"), "brand"),
                (await c.get("/v1/adapters/Bad_Brand/versions/1"), "brand"),
                (await c.get("/v1/adapters/Bad_Brand/versions"), "brand"),
                (
                    await c.get("/v1/adapters/acme/versions?include_archived=maybe"),
                    "include_archived",
                ),
            ]
            down = [
                await c.delete("/v1/adapters/acme/versions/1"),
                await c.get("/v1/adapters/acme/versions/1"),
                await c.get("/v1/adapters/acme/versions?include_archived=true"),
                await c.get("/v1/adapters?include_archived=true"),
            ]
            return bad, down

    bad, down = asyncio.run(go())
    for r, param in bad:
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.text
    for r in down:
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "registry_unavailable"
