"""When the object store is down: a retryable 503 in OpenAI's shape, nothing recorded; up heals."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.e2e


def test_storage_outage_is_503_and_up_restores(farm):
    key = farm.new_tenant("outage-co")
    renders = farm.tenants.count_renders()
    farm.stack.component("s3").stop()
    try:
        assert httpx.get(f"{farm.settings.api_url}/healthz").status_code == 503
        with farm.http(key) as c:
            resp = c.post("/images/generations", json={"prompt": "a red circle"})
        assert resp.status_code == 503, resp.text
        err = resp.json()["error"]
        assert err["code"] == "storage_unavailable" and "retry" in err["message"]
        assert farm.tenants.count_renders() == renders  # the failed render left no usage row
    finally:
        farm.settings = farm.stack.up()
    with farm.http(key) as c:
        assert c.post("/images/generations", json={"prompt": "a red circle"}).status_code == 200
    assert httpx.get(f"{farm.settings.api_url}/healthz").status_code == 200
