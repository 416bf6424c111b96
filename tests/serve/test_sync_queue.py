"""`POST /v1/images/generations` on the render queue's scheduler, in-process (real engine,
SQLite, and Postgres where it answers): a synchronous render waits for its turn in the same fair
order as async renders, a flood from one tenant does not starve another, and sync and async
requests together cannot overshoot an hourly quota."""

from __future__ import annotations

import asyncio
import threading

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from registry.render_queue import RenderTaskRow
from serve.protocol import RenderedImage, RenderJob
from serve.render_queue import RenderDispatcher
from tests.polling import async_wait_for, wait_for
from tests.registry.conftest import sql_engine  # noqa: F401 - the SQLite / Postgres fixture
from tests.serve import test_renders_api
from tests.serve.conftest import client
from tests.serve.test_renders_api import TINY, TINY_PNG, run

farm_parts = test_renders_api.farm_parts  # the fixture: services, event recorder, dispatchers

GENERATIONS = "/v1/images/generations"
RENDERS = "/v1/renders"


def tickets(services, tenant: str, *statuses: str) -> int:
    """The tenant's sync tickets (in those statuses, or all)."""
    c = RenderTaskRow
    q = select(func.count()).where(c.tenant_id == tenant, c.sync.is_(True))
    if statuses:
        q = q.where(c.status.in_(statuses))
    with Session(services.tenants.engine) as s:
        return int(s.scalar(q))


class OrderedRenderer:
    """Holds every render until the gate opens; records how many ran at once and the order
    (by prompt) in which they finished."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.running = 0
        self.most = 0
        self.finished: list[str] = []

    async def render(self, job: RenderJob) -> list[RenderedImage]:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            while not self.gate.is_set():
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.01)  # long enough that the scheduler, not a race, orders them
        finally:
            self.running -= 1
        self.finished.append(job.prompt)
        return [RenderedImage(png=TINY_PNG, seed=s) for s in job.seeds]


def test_a_sync_render_takes_its_turn_and_answers_as_before(farm_parts) -> None:
    services, recorder, start = farm_parts
    key = services.tenants.create_tenant("sync-co").key
    start()

    async def go():
        async with client(services, key) as c:
            r = await c.post(GENERATIONS, json={**TINY, "n": 2, "seed": 3})
            return r, (await c.get(RENDERS)).json()

    r, listed = run(go())
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["seed"] for d in body["data"]] == [3, 4] and body["data"][0]["url"]
    assert body["model"] == services.images.limits.model.id
    # Its ticket went through the queue and ended with the request; it is no async render.
    assert tickets(services, "sync-co") == 1
    wait_for(lambda: tickets(services, "sync-co", "succeeded") == 1, 30, "its ticket closes")
    assert listed["data"] == [] and recorder.events == []
    assert services.tenants.count_renders("sync-co") == 1  # charged once, by the request


def test_a_sync_flood_does_not_starve_another_tenants_sync_renders(farm_parts) -> None:
    """Tenant A floods 30 synchronous requests; then B sends 5. B's finish within
    2 x (5 + concurrency) renders (issue 12, point 3), not after A's thirty."""
    services, _, start = farm_parts
    a = services.tenants.create_tenant("flood-a").key
    b = services.tenants.create_tenant("flood-b").key
    services.tenants.set_limits("flood-a", max_inflight_renders=40)
    renderer = OrderedRenderer()
    services.images.renderer = renderer
    concurrency = 2
    start(renderer, concurrency=concurrency)

    async def go():
        async with client(services, a) as ca, client(services, b) as cb:
            flood = [
                asyncio.create_task(ca.post(GENERATIONS, json={**TINY, "prompt": f"a{i}"}))
                for i in range(30)
            ]
            await async_wait_for(lambda: tickets(services, "flood-a") == 30, 60, "A's 30 wait")
            late = [
                asyncio.create_task(cb.post(GENERATIONS, json={**TINY, "prompt": f"b{i}"}))
                for i in range(5)
            ]
            await async_wait_for(lambda: tickets(services, "flood-b") == 5, 60, "B's 5 wait")
            renderer.gate.set()
            return await asyncio.gather(*flood, *late)

    answers = run(go())
    assert [r.status_code for r in answers] == [200] * 35
    assert renderer.most == concurrency  # the scheduler, not the clients, decided the order
    last_b = max(i for i, prompt in enumerate(renderer.finished) if prompt.startswith("b"))
    assert last_b + 1 <= 2 * (5 + concurrency), renderer.finished


def test_sync_and_async_requests_share_one_fair_order(farm_parts) -> None:
    """A's 20 async renders are queued; B's 5 synchronous requests still run among the first
    few, since both kinds are claimed in one virtual-time order."""
    services, _, start = farm_parts
    a = services.tenants.create_tenant("mixed-a").key
    b = services.tenants.create_tenant("mixed-b").key
    renderer = OrderedRenderer()
    services.images.renderer = renderer
    concurrency = 2

    async def go():
        async with client(services, a) as ca, client(services, b) as cb:
            for i in range(20):
                r = await ca.post(RENDERS, json={**TINY, "prompt": f"a{i}"})
                assert r.status_code == 202, r.text
            dispatcher = start(renderer, concurrency=concurrency)
            late = [
                asyncio.create_task(cb.post(GENERATIONS, json={**TINY, "prompt": f"b{i}"}))
                for i in range(5)
            ]
            await async_wait_for(lambda: tickets(services, "mixed-b") == 5, 60, "B's 5 wait")
            renderer.gate.set()
            answers = await asyncio.gather(*late)
            return dispatcher, answers

    _, answers = run(go())
    assert [r.status_code for r in answers] == [200] * 5
    wait_for(lambda: len(renderer.finished) == 25, 60, "A's renders finish too")
    last_b = max(i for i, prompt in enumerate(renderer.finished) if prompt.startswith("b"))
    assert last_b + 1 <= 2 * (5 + concurrency), renderer.finished


def test_a_sync_request_whose_client_left_gives_its_turn_up(farm_parts) -> None:
    services, _, start = farm_parts
    key = services.tenants.create_tenant("gone-co").key
    renderer = OrderedRenderer()
    services.images.renderer = renderer
    start(renderer, concurrency=1)

    async def go():
        async with client(services, key) as c:
            first = asyncio.create_task(c.post(GENERATIONS, json={**TINY, "prompt": "first"}))
            await async_wait_for(lambda: renderer.running == 1, 60, "the first one renders")
            waiting = asyncio.create_task(c.post(GENERATIONS, json={**TINY, "prompt": "left"}))
            await async_wait_for(
                lambda: tickets(services, "gone-co", "queued") == 1, 60, "the second waits"
            )
            waiting.cancel()  # the client goes away (Serve cancels the request the same way)
            await asyncio.gather(waiting, return_exceptions=True)
            await async_wait_for(
                lambda: tickets(services, "gone-co", "cancelled") == 1, 60, "its ticket ends"
            )
            renderer.gate.set()
            return await first

    assert run(go()).status_code == 200
    assert renderer.finished == ["first"]  # the cancelled one never reached a replica
    assert services.images.limiter.inflight("gone-co") == 0
    assert services.tenants.count_renders("gone-co") == 1


def test_twenty_mixed_sync_and_async_requests_against_a_quota_of_ten_give_ten_images(
    local_parts,
    sql_engine,  # noqa: F811 - the fixture imported above
) -> None:
    """Issue 12 point 4, with both paths at once: 10 synchronous and 10 async requests of one
    image each, all concurrent, against images_per_hour=10 (the in-flight cap out of the way):
    exactly 10 are accepted and exactly 10 images are rendered and charged."""
    url = sql_engine.url.render_as_string(hide_password=False)
    services = local_parts.services(database_url=url)
    key = services.tenants.create_tenant("quota-mix", images_per_hour=10).key
    services.tenants.set_limits("quota-mix", max_inflight_renders=40)
    renderer = OrderedRenderer()
    renderer.gate.set()
    services.images.renderer = renderer
    dispatcher = RenderDispatcher(
        services.renders.queue,
        services.images,
        renderer,
        services.renders,
        concurrency=4,
        lease_s=30,
        max_attempts=3,
        poll_s=0.05,
    )
    stop = dispatcher.start()
    services.images.scheduler = dispatcher
    try:

        async def go():
            async with client(services, key) as c:
                calls = [
                    c.post(GENERATIONS if i % 2 else RENDERS, json={**TINY, "prompt": f"p{i}"})
                    for i in range(20)
                ]
                return await asyncio.gather(*calls)

        answers = run(go())
        codes = [r.status_code for r in answers]
        assert codes.count(200) + codes.count(202) == 10, codes
        assert codes.count(429) == 10, codes
        assert {r.json()["error"]["code"] for r in answers if r.status_code == 429} == {
            "quota_exceeded"
        }
        queue = services.renders.queue
        wait_for(
            lambda: queue.counts()["queued"] == queue.counts()["in_progress"] == 0,
            60,
            "the accepted async renders finish",
        )
    finally:
        stop()
    assert services.tenants.images_in_last_hour("quota-mix") == 10
    assert len(renderer.finished) == 10
    assert services.images.limiter.quota_used("quota-mix") == 10  # nothing still reserved


def test_async_renders_count_against_the_inflight_cap(farm_parts) -> None:
    """A tenant capped at 2 renders in flight: the dispatcher starts only 2 of its async
    renders, and its synchronous request meanwhile gets the usual 429."""
    services, _, start = farm_parts
    key = services.tenants.create_tenant("capped-co").key
    services.tenants.set_limits("capped-co", max_inflight_renders=2)
    renderer = OrderedRenderer()
    services.images.renderer = renderer
    start(renderer, concurrency=4)

    async def go():
        async with client(services, key) as c:
            for i in range(4):
                assert (await c.post(RENDERS, json={**TINY, "prompt": f"q{i}"})).status_code == 202
            await async_wait_for(lambda: renderer.running == 2, 60, "two renders start")
            refused = await c.post(GENERATIONS, json=TINY)
            running = renderer.running
            renderer.gate.set()
            return refused, running

    refused, running = run(go())
    assert running == 2
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    queue = services.renders.queue
    wait_for(lambda: queue.counts()["succeeded"] == 4, 60, "all four finish, two at a time")
    assert renderer.most == 2
