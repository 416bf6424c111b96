"""The request path on the real stack (Serve proxy, ingress, replica): hostile inputs answer 400,
a tenant's burst meets its own in-flight limit (429), and every answer carries a request id."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.e2e

RAW_400 = [
    ('{"prompt": "\\ud800"}', "prompt"),
    ('{"prompt": "a", "negative_prompt": "\\ud800"}', "negative_prompt"),
    ('{"prompt": "a", "n": true}', "n"),
    ('{"prompt": "a", "adapter": "acme:99999999999999999999"}', "adapter"),
]


@pytest.fixture(scope="module")
def key(farm) -> str:
    return farm.new_tenant("request-path-co")


@pytest.mark.parametrize(("raw", "param"), RAW_400)
def test_hostile_bodies_are_400_naming_the_field(farm, key, raw, param):
    renders = farm.tenants.count_renders()
    with farm.http(key) as c:
        resp = c.post(
            "/images/generations", content=raw, headers={"content-type": "application/json"}
        )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    assert resp.headers["x-request-id"]  # Serve's request id, also in the ingress's log lines
    assert farm.tenants.count_renders() == renders


@pytest.mark.parametrize("after", ["1" + "0" * 30, "-1" + "0" * 30])
def test_event_paging_past_any_id_is_400(farm, key, after):
    with farm.http(key) as c:
        resp = c.get(f"/fine_tuning/jobs/ftjob-none/events?after={after}")
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "after"


def test_a_burst_above_the_tenant_limit_gets_429_not_a_queue(farm):
    """More concurrent renders than `max_inflight_per_tenant` from one tenant: the ingress
    admits them all at once (its max_ongoing_requests is above the limit), so the ones over
    the limit get 429 with Retry-After instead of waiting at the proxy."""
    limit = farm.settings.max_inflight_per_tenant
    key = farm.new_tenant("burst-e2e-co")
    body = {"prompt": "a red circle", "steps": 20}

    def render(_: int):
        with farm.http(key) as c:
            return c.post("/images/generations", json=body)

    with ThreadPoolExecutor(max_workers=3 * limit) as pool:
        answers = list(pool.map(render, range(3 * limit)))
    statuses = sorted(r.status_code for r in answers)
    assert set(statuses) <= {200, 429}, statuses
    refused = [r for r in answers if r.status_code == 429]
    assert refused, statuses
    assert statuses.count(200) >= limit
    for r in refused:
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and r.headers["retry-after"]
