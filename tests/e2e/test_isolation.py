"""Tenant isolation: no route returns or lists another tenant's objects or ids."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def test_no_route_returns_another_tenants_objects(farm):
    key_a, key_b = farm.new_tenant("iso-a"), farm.new_tenant("iso-b")
    with farm.http(key_a) as a:
        ra = a.post("/images/generations", json={"prompt": "a red circle", "n": 2})
    assert ra.status_code == 200, ra.text
    render_a = ra.json()["id"]
    assert all("/tenants/iso-a/" in d["url"] for d in ra.json()["data"])

    # Every route of the API, called as tenant B, must never mention A's render or prefix.
    spec = farm.http(None).get(f"{farm.settings.api_url}/openapi.json").json()
    with farm.http(key_b) as b:
        rb = b.post("/images/generations", json={"prompt": "a red circle"})
        assert rb.status_code == 200
        assert "/tenants/iso-b/" in rb.json()["data"][0]["url"]
        for path, methods in spec["paths"].items():
            for method in methods:
                url = farm.settings.api_url + path.replace("{", "").replace("}", "")
                body = {"prompt": "a red circle"} if method == "post" else None
                resp = b.request(method.upper(), url, json=body)
                assert render_a not in resp.text and "iso-a" not in resp.text, (method, path)

    # The store itself keeps them apart: each render lives only under its tenant's prefix.
    a_objects = [k for k in farm.all_objects() if render_a in k]
    assert a_objects and all(k.startswith("tenants/iso-a/") for k in a_objects)
    assert not [o for o in farm.store.list("tenants/iso-b/") if render_a in o.key]
