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


def test_canary_routes_check_share_version_and_brand_before_the_registry(local_parts):
    services = local_parts.services(local_parts.refused_url())
    key = services.tenants.create_tenant("canary-co").key

    async def go():
        async with client(services, key) as c:
            bad = [
                (await c.put("/v1/adapters/acme/canary", json=body), param)
                for body, param in (
                    ({"version": 2, "share": 1.01}, "share"),
                    ({"version": 2, "share": -1}, "share"),
                    ({"version": 2, "share": None}, "share"),
                    ({"version": 0, "share": 0.1}, "version"),
                    ({"share": 0.1}, "version"),
                )
            ]
            bad += [
                (await c.get("/v1/adapters/Bad_Brand/canary"), "brand"),
                (await c.delete("/v1/adapters/Bad_Brand/canary"), "brand"),
                (await c.post("/v1/adapters/Bad_Brand/canary/promote"), "brand"),
                (
                    await c.post("/v1/adapters/acme/aliases/challenger", json={"version": 1}),
                    "alias",
                ),
            ]
            down = [
                await c.put("/v1/adapters/acme/canary", json={"version": 2, "share": 0.1}),
                await c.get("/v1/adapters/acme/canary"),
                await c.post("/v1/adapters/acme/canary/promote"),
                await c.delete("/v1/adapters/acme/canary"),
            ]
            spec = (await c.get("/openapi.json")).json()
            return bad, down, spec

    bad, down, spec = asyncio.run(go())
    for r, param in bad:
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.text
    for r in down:
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "registry_unavailable"
    canary = spec["paths"]["/v1/adapters/{brand}/canary"]
    assert set(canary) == {"get", "put", "delete"}
    assert {"404", "409"} <= set(canary["put"]["responses"])
    assert "/v1/adapters/{brand}/canary/promote" in spec["paths"]
