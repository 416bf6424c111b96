"""Render admission through the API in-process (real engine, SQLite): the hourly quota is
reserved before rendering, so a request arriving while another renders sees its images as used,
and a failed render gives its reservation back."""

from __future__ import annotations

import asyncio
import datetime as dt

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.render_limits import QuotaReservationRow, RenderSlotRow
from serve.errors import APIError
from tests.polling import async_wait_for
from tests.serve.conftest import client

RENDER = "/v1/images/generations"
TINY = {"prompt": "a red circle", "steps": 1, "size": "64x64"}


def test_a_render_in_flight_holds_its_quota_reservation(local_parts):
    services = local_parts.services(max_inflight_per_tenant=4)
    key = services.tenants.create_tenant("reserve-co", images_per_hour=2).key
    limiter = services.images.limiter
    engine_lock = local_parts.engine._lock  # held: the first render waits in the engine

    async def go():
        async with client(services, key) as c:
            engine_lock.acquire()
            try:
                first = asyncio.create_task(c.post(RENDER, json={**TINY, "n": 2}))
                await async_wait_for(lambda: limiter.quota_used("reserve-co") == 2, 60, "reserved")
                # Nothing is recorded as usage yet: only the reservation refuses this one.
                assert services.tenants.images_in_last_hour("reserve-co") == 0
                second = await c.post(RENDER, json=TINY)
            finally:
                engine_lock.release()
            return await first, second

    first, second = asyncio.run(go())
    assert first.status_code == 200, first.text
    assert second.status_code == 429 and second.json()["error"]["code"] == "quota_exceeded"
    assert "2 of 2 images used or reserved" in second.json()["error"]["message"]
    assert second.headers["retry-after"] == "60"
    assert services.tenants.images_in_last_hour("reserve-co") == 2  # committed once, as usage
    assert limiter.quota_used("reserve-co") == 2 and limiter.inflight("reserve-co") == 0


def test_a_failed_render_releases_its_reservation(local_parts):
    services = local_parts.services()
    key = services.tenants.create_tenant("fail-co", images_per_hour=1).key
    renderer = services.images.renderer

    class Unavailable:
        async def render(self, job):  # noqa: ANN001, ANN202
            raise APIError(503, "no replica has room", code="overloaded")

    async def go():
        async with client(services, key) as c:
            services.images.renderer = Unavailable()
            failed = await c.post(RENDER, json=TINY)
            services.images.renderer = renderer
            return failed, await c.post(RENDER, json=TINY)

    failed, again = asyncio.run(go())
    assert failed.status_code == 503
    assert again.status_code == 200, again.text  # the failed one charged nothing
    assert services.tenants.images_in_last_hour("fail-co") == 1
    assert services.images.limiter.quota_used("fail-co") == 1


def test_an_inflight_cap_of_zero_is_403_naming_the_limit(local_parts):
    services = local_parts.services()
    key = services.tenants.create_tenant("nothing-co").key
    services.tenants.set_limits("nothing-co", max_inflight_renders=0)

    async def go():
        async with client(services, key) as c:
            return await c.post(RENDER, json=TINY)

    resp = asyncio.run(go())
    assert resp.status_code == 403, resp.text
    error = resp.json()["error"]
    assert error["code"] == "max_inflight_renders_exceeded"
    assert "max_inflight_renders=0" in error["message"]
    assert services.tenants.count_renders("nothing-co") == 0


def test_a_long_render_keeps_renewing_its_lease(local_parts):
    """The ingress renews a render's slot and reservation while it runs, so a render longer
    than one lease keeps what it holds (a crashed ingress stops renewing: its rows lapse)."""
    services = local_parts.services(render_lease_s=3.0)  # renewed every second
    key = services.tenants.create_tenant("lease-co", images_per_hour=5).key
    engine_lock = local_parts.engine._lock

    def leases() -> set[dt.datetime]:
        with Session(services.tenants.engine) as s:
            return set(s.scalars(select(RenderSlotRow.expires_at))) | set(
                s.scalars(select(QuotaReservationRow.expires_at))
            )

    async def go():
        async with client(services, key) as c:
            engine_lock.acquire()
            try:
                render = asyncio.create_task(c.post(RENDER, json=TINY))
                await async_wait_for(lambda: len(leases()) == 1, 60, "admitted")
                [first] = leases()  # slot and reservation expire together
                await async_wait_for(lambda: min(leases()) > first, 60, "lease renewed")
            finally:
                engine_lock.release()
            return await render

    assert asyncio.run(go()).status_code == 200
    assert leases() == set()  # committed: nothing held any more
