"""Async renders in-process, without Ray: `/v1/renders` over the real engine, SQLite and the object
store, with a dispatcher running in its own thread as in an ingress replica; bad input, plans,
cancellation and fairness (the last two with a renderer the test controls)."""

from __future__ import annotations

import asyncio
import io
import json
import threading

import pytest
from PIL import Image

from registry.render_queue import RenderQueueStore
from serve.errors import ServiceUnavailable
from serve.protocol import RenderedImage, RenderJob
from serve.render_queue import RenderDispatcher
from tests.polling import wait_for
from tests.registry.conftest import sql_engine  # noqa: F401 - the SQLite / Postgres fixture
from tests.serve.conftest import client

RENDERS = "/v1/renders"
TINY = {"prompt": "a red circle", "steps": 2, "size": "64x64"}


def run(coro):
    return asyncio.run(coro)


class Recorder:
    """An event sink that keeps what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict, str | None]] = []

    def __call__(self, tenant: str, event_type: str, data: dict, url: str | None) -> None:
        self.events.append((tenant, event_type, data, url))

    def of(self, render_id: str) -> list[str]:
        return [e[1] for e in self.events if e[2]["id"] == render_id]


def _tiny_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


TINY_PNG = _tiny_png()


class GatedRenderer:
    """Renders a tiny PNG per seed when the test opens the gate; records the order."""

    def __init__(self, open_gate: bool = True) -> None:
        self.gate = threading.Event()
        if open_gate:
            self.gate.set()
        self.started: list[str] = []
        self.cancelled = 0

    async def render(self, job: RenderJob) -> list[RenderedImage]:
        self.started.append(job.prompt)
        try:
            while not self.gate.is_set():
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return [RenderedImage(png=TINY_PNG, seed=s) for s in job.seeds]


@pytest.fixture
def farm_parts(local_parts):
    """Fresh services with an event recorder; `start(renderer)` runs a dispatcher."""
    services = local_parts.services()
    recorder = Recorder()
    services.renders.emit = recorder
    stops = []

    def start(renderer=None, concurrency: int = 2, lease_s: float = 30) -> RenderDispatcher:
        dispatcher = RenderDispatcher(
            services.renders.queue,
            services.images,
            renderer or services.images.renderer,
            services.renders,
            concurrency=concurrency,
            lease_s=lease_s,
            max_attempts=3,
            poll_s=0.05,
            progress_every_s=0.05,
        )
        stops.append(dispatcher.start())
        services.images.scheduler = dispatcher  # sync renders take turns, as in the farm
        return dispatcher

    yield services, recorder, start
    for stop in stops:
        stop()


def status_of(services, render_id: str) -> str:
    return services.renders.queue.get_any(render_id).status


def test_async_render_end_to_end_on_the_engine(farm_parts) -> None:
    services, recorder, start = farm_parts
    key = services.tenants.create_tenant("async-co").key
    start()

    async def go():
        async with client(services, key) as c:
            created = await c.post(RENDERS, json={**TINY, "n": 2, "seed": 7})
            assert created.status_code == 202, created.text
            render = created.json()
            assert render["object"] == "render" and render["status"] == "queued"
            assert render["queue_position"] == 0 and render["progress"]["total"] == 4
            # The event stream follows it to the end (sse: `event: render`, JSON data).
            events = await c.get(f"{RENDERS}/{render['id']}/events")
            assert events.status_code == 200
            assert events.headers["content-type"].startswith("text/event-stream")
            return render, events.text, (await c.get(f"{RENDERS}/{render['id']}")).json()

    render, stream, done = run(go())
    bodies = [json.loads(line[5:]) for line in stream.splitlines() if line.startswith("data:")]
    assert bodies[-1]["status"] == "succeeded" and bodies[-1]["progress"]["step"] == 4
    assert [b["status"] for b in bodies][0] in ("queued", "in_progress")
    assert done["status"] == "succeeded" and done["progress"] == {"step": 4, "total": 4}
    assert [d["seed"] for d in done["data"]] == [7, 8]
    assert all(d["url"].startswith("http") for d in done["data"])
    assert services.tenants.count_renders("async-co") == 1  # charged once
    assert recorder.of(render["id"]) == ["render.succeeded"]
    stored = services.store.list(f"tenants/async-co/renders/{render['id']}")
    assert len(stored) == 2


def test_b64_renders_come_back_inline(farm_parts) -> None:
    services, _, start = farm_parts
    key = services.tenants.create_tenant("inline-co").key
    start()

    async def go():
        async with client(services, key) as c:
            r = await c.post(RENDERS, json={**TINY, "response_format": "b64_json"})
            render_id = r.json()["id"]
            await asyncio.to_thread(
                wait_for,
                lambda: status_of(services, render_id) == "succeeded",
                120,
                "the render succeeds",
            )
            return (await c.get(f"{RENDERS}/{render_id}")).json()

    done = run(go())
    assert done["data"][0]["b64_json"].startswith("iVBOR")  # a PNG


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**TINY, "priority": "turbo"}, "priority"),
        ({**TINY, "webhook_url": "http://example.com/hook"}, "webhook_url"),
        ({**TINY, "webhook_url": "https://127.0.0.1/hook"}, "webhook_url"),
        ({**TINY, "webhook_url": "https://10.1.2.3/hook"}, "webhook_url"),
        ({**TINY, "webhook_url": "not a url"}, "webhook_url"),
        ({**TINY, "webhook_url": "https://x.example/" + "a" * 3000}, "webhook_url"),
        ({**TINY, "steps": 0}, "steps"),
        ({**TINY, "n": 99}, "n"),
        ({**TINY, "unknown": 1}, "unknown"),
    ],
)
def test_bad_render_bodies_are_400_naming_the_field(farm_parts, body, param) -> None:
    services, _, _ = farm_parts
    key = services.tenants.create_tenant("bad-co").key

    async def go():
        async with client(services, key) as c:
            return await c.post(RENDERS, json=body)

    r = run(go())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert services.renders.queue.counts()["queued"] == 0


def test_plan_queue_cap_404_and_409(farm_parts) -> None:
    services, recorder, _ = farm_parts  # no dispatcher: renders stay queued
    key = services.tenants.create_tenant("relax-co").key
    other = services.tenants.create_tenant("other-co").key
    services.renders.queue.set_plan("relax-co", "relax", max_queued=2)

    async def go():
        async with client(services, key) as c, client(services, other) as o:
            fast = await c.post(RENDERS, json={**TINY, "priority": "fast"})
            assert fast.status_code == 403, fast.text
            assert "'relax'" in fast.json()["error"]["message"]
            assert fast.json()["error"]["param"] == "priority"
            first = await c.post(RENDERS, json=TINY)  # the plan's tier by default
            assert first.status_code == 202 and first.json()["priority"] == "relax"
            second = await c.post(RENDERS, json={**TINY, "webhook_url": "https://93.184.216.34/r"})
            assert second.status_code == 202
            full = await c.post(RENDERS, json=TINY)
            assert full.status_code == 429 and full.headers["Retry-After"]
            assert "max_queued_renders=2" in full.json()["error"]["message"]
            rid = first.json()["id"]
            for path in (f"{RENDERS}/{rid}", f"{RENDERS}/{rid}/events"):
                theirs, missing = await o.get(path), await o.get(f"{RENDERS}/render-nope")
                assert theirs.status_code == missing.status_code == 404
                assert theirs.json()["error"]["code"] == missing.json()["error"]["code"]
            assert (await o.post(f"{RENDERS}/{rid}/cancel")).status_code == 404
            assert (await o.get(RENDERS)).json()["data"] == []
            cancelled = await c.post(f"{RENDERS}/{rid}/cancel")
            assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
            again = await c.post(f"{RENDERS}/{rid}/cancel")
            assert again.status_code == 409 and again.json()["error"]["code"] == "render_finished"
            listed = (await c.get(RENDERS, params={"limit": 1})).json()
            assert listed["has_more"] and len(listed["data"]) == 1
            page2 = (await c.get(RENDERS, params={"after": listed["data"][0]["id"]})).json()
            assert {r["id"] for r in listed["data"] + page2["data"]} == {
                rid,
                second.json()["id"],
            }
            return rid, second.json()

    rid, second = run(go())
    assert recorder.of(rid) == ["render.cancelled"]
    assert recorder.events[0][3] is None and second["webhook_url"] == "https://93.184.216.34/r"
    assert services.tenants.count_renders("relax-co") == 0


def test_cancelling_a_running_render_stops_it_and_records_nothing(farm_parts) -> None:
    services, recorder, start = farm_parts
    key = services.tenants.create_tenant("cancel-co").key
    renderer = GatedRenderer(open_gate=False)
    start(renderer)

    async def go():
        async with client(services, key) as c:
            rid = (await c.post(RENDERS, json=TINY)).json()["id"]
            await asyncio.to_thread(
                wait_for,
                lambda: status_of(services, rid) == "in_progress",
                30,
                "the dispatcher claims it",
            )
            r = await c.post(f"{RENDERS}/{rid}/cancel")
            assert r.status_code == 200 and r.json()["status"] == "cancelled"
            await asyncio.to_thread(
                wait_for, lambda: renderer.cancelled == 1, 30, "the render is stopped"
            )
            renderer.gate.set()
            return rid

    rid = run(go())
    assert status_of(services, rid) == "cancelled"
    assert recorder.of(rid) == ["render.cancelled"]
    assert services.tenants.count_renders("cancel-co") == 0
    assert services.store.list(f"tenants/cancel-co/renders/{rid}") == []


def test_a_late_tenant_is_not_starved_by_a_burst(farm_parts) -> None:
    """Tenant A queues 40 renders, then B queues 5: B's finish within 2 x (5 + concurrency)
    renders, not after A's forty (counted in completions, not time)."""
    services, _, start = farm_parts
    a = services.tenants.create_tenant("burst-a").key
    b = services.tenants.create_tenant("burst-b").key
    queue: RenderQueueStore = services.renders.queue
    concurrency = 2

    async def go():
        async with client(services, a) as ca, client(services, b) as cb:
            for i in range(40):
                assert (await ca.post(RENDERS, json={**TINY, "prompt": f"a{i}"})).status_code == 202
            return [
                (await cb.post(RENDERS, json={**TINY, "prompt": f"b{i}"})).json()["id"]
                for i in range(5)
            ]

    b_ids = run(go())
    start(GatedRenderer(), concurrency=concurrency)
    wait_for(lambda: queue.counts()["succeeded"] == 45, 120, "all 45 renders finish")
    done = sorted(
        (queue.get_any(t.id) for t in queue.list("burst-a", None, 100)[0]),
        key=lambda t: t.finished_at,
    )
    b_done = [queue.get_any(i).finished_at for i in b_ids]
    finished_before_last_b = sum(1 for t in done if t.finished_at < max(b_done)) + 5
    assert finished_before_last_b <= 2 * (5 + concurrency)


def test_the_engine_reports_progress_per_step(local_parts) -> None:
    seen: list[tuple[int, int]] = []
    job = RenderJob("a red circle", None, 64, 64, 3, 1.0, (1, 2))
    local_parts.engine.submit(job, on_progress=lambda d, t: seen.append((d, t))).result()
    # In image-steps: one call per denoising step of the batch (one image per step here).
    assert [done for done, _ in seen] == list(range(1, 7)) and {t for _, t in seen} == {6}


class ProgressRenderer(GatedRenderer):
    """Reports half the work done, then waits for the gate."""

    async def render_progress(self, job: RenderJob, on_progress) -> list[RenderedImage]:
        on_progress(job.steps * len(job.seeds) // 2, job.steps * len(job.seeds))
        return await self.render(job)


def test_progress_reaches_the_render_object_while_it_runs(farm_parts) -> None:
    services, _, start = farm_parts
    key = services.tenants.create_tenant("progress-co").key
    renderer = ProgressRenderer(open_gate=False)
    start(renderer)

    async def go():
        async with client(services, key) as c:
            rid = (await c.post(RENDERS, json={**TINY, "steps": 10})).json()["id"]

            def halfway() -> bool:
                task = services.renders.queue.get_any(rid)
                return task.status == "in_progress" and task.progress_step == 5

            await asyncio.to_thread(wait_for, halfway, 30, "progress 5/10 is recorded")
            during = (await c.get(f"{RENDERS}/{rid}")).json()
            renderer.gate.set()
            return during

    during = run(go())
    assert during["status"] == "in_progress"
    assert during["progress"] == {"step": 5, "total": 10} and during["data"] is None


class LosesItsReplicaOnce(GatedRenderer):
    """The first render's replica dies under it (what `ServeRenderer` answers then)."""

    async def render(self, job: RenderJob) -> list[RenderedImage]:
        if not self.started:
            self.started.append(job.prompt)
            raise ServiceUnavailable("the replica rendering this request was lost", "replica_lost")
        return await super().render(job)


def test_a_render_whose_replica_died_is_queued_again_and_rendered_once(farm_parts) -> None:
    services, recorder, start = farm_parts
    key = services.tenants.create_tenant("lost-replica-co").key
    start(LosesItsReplicaOnce())

    async def go():
        async with client(services, key) as c:
            return (await c.post(RENDERS, json=TINY)).json()["id"]

    rid = run(go())
    wait_for(lambda: status_of(services, rid) == "succeeded", 30, "the render succeeds")
    assert services.renders.queue.get_any(rid).attempts == 2
    assert recorder.of(rid) == ["render.succeeded"]
    assert services.tenants.count_renders("lost-replica-co") == 1


def test_a_render_outlives_its_dispatcher(farm_parts) -> None:
    """An ingress replica dies mid-render: its lease expires, another dispatcher renders it."""
    services, recorder, start = farm_parts
    key = services.tenants.create_tenant("takeover-co").key
    stuck = GatedRenderer(open_gate=False)
    first = start(stuck, concurrency=1, lease_s=1)  # it cannot take the render back

    async def go():
        async with client(services, key) as c:
            return (await c.post(RENDERS, json=TINY)).json()["id"]

    rid = run(go())
    wait_for(lambda: status_of(services, rid) == "in_progress", 30, "the first dispatcher has it")
    first.renew_every_s = float("inf")  # it hangs: its lease is no longer renewed
    second = start(GatedRenderer(), lease_s=1)
    wait_for(lambda: status_of(services, rid) == "succeeded", 60, "the second one renders it")
    task = services.renders.queue.get_any(rid)
    assert task.attempts == 2 and second.owner != first.owner
    stuck.gate.set()  # the first one wakes up: it holds no lease, so it records nothing
    wait_for(lambda: rid not in first.inflight, 30, "the first one gives it up")
    assert recorder.of(rid) == ["render.succeeded"]
    assert services.tenants.count_renders("takeover-co") == 1


def test_two_dispatchers_share_the_queue_and_record_each_render_once(
    local_parts,
    sql_engine,  # noqa: F811 - the fixture imported above
) -> None:
    """Two ingress replicas' dispatchers on one database (SQLite, and Postgres where it
    answers): every render runs and is charged once, and gets exactly one event."""
    url = sql_engine.url.render_as_string(hide_password=False)
    services = local_parts.services(database_url=url)
    recorder = Recorder()
    services.renders.emit = recorder
    key = services.tenants.create_tenant("two-ingress-co").key

    async def go():
        async with client(services, key) as c:
            return [(await c.post(RENDERS, json=TINY)).json()["id"] for _ in range(20)]

    ids = run(go())
    dispatchers = [
        RenderDispatcher(
            services.renders.queue,
            services.images,
            GatedRenderer(),
            services.renders,
            concurrency=2,
            lease_s=30,
            max_attempts=3,
            poll_s=0.05,
        )
        for _ in range(2)
    ]
    stops = [d.start() for d in dispatchers]
    try:
        wait_for(
            lambda: services.renders.queue.counts()["succeeded"] == 20,
            60,
            "all 20 renders succeed",
        )
    finally:
        for stop in stops:
            stop()
    assert sorted(e[2]["id"] for e in recorder.events) == sorted(ids)
    assert services.tenants.count_renders("two-ingress-co") == 20


def test_render_events_reach_the_webhook_outbox_with_the_renders_own_url(local_parts) -> None:
    """As the farm wires it (no recorder): a finished async render's `render.succeeded` is a
    webhook delivery to the URL the render named, checked by the farm's SSRF rules."""
    services = local_parts.services(webhook_allow_hosts=["127.0.0.1"])
    key = services.tenants.create_tenant("hooked-co").key
    dispatcher = RenderDispatcher(
        services.renders.queue,
        services.images,
        GatedRenderer(),
        services.renders,
        concurrency=1,
        lease_s=30,
        max_attempts=3,
        poll_s=0.05,
        progress_every_s=0.05,
    )
    stop = dispatcher.start()
    try:

        async def go():
            async with client(services, key) as c:
                refused = await c.post(
                    RENDERS, json={**TINY, "webhook_url": "https://10.0.0.7/hook"}
                )
                created = await c.post(
                    RENDERS, json={**TINY, "webhook_url": "http://127.0.0.1:9/hook"}
                )
                return refused, created.json()

        refused, render = run(go())
        assert refused.status_code == 400 and "private" in refused.json()["error"]["message"]
        wait_for(
            lambda: services.webhooks.store.list("hooked-co", None, 10)[0],
            60,
            "the render's webhook delivery",
        )
        [delivery] = services.webhooks.store.list("hooked-co", None, 10)[0]
        assert delivery.event_type == "render.succeeded"
        assert delivery.url == "http://127.0.0.1:9/hook"
        assert delivery.payload["data"]["id"] == render["id"]
    finally:
        stop()


def test_async_render_outputs_carry_a_valid_trusted_c2pa_manifest(farm_parts) -> None:
    """The queue's images are the farm's outputs like any other: webp here, signed by the farm
    CA, with the render id in the manifest."""
    from serve.provenance import RENDER_ASSERTION, verify_image

    services, _, start = farm_parts
    key = services.tenants.create_tenant("signed-co").key
    start()

    async def go():
        async with client(services, key) as c:
            created = (await c.post(RENDERS, json={**TINY, "output_format": "webp"})).json()
            await c.get(f"{RENDERS}/{created['id']}/events")  # follows it to the end
            return (await c.get(f"{RENDERS}/{created['id']}")).json()

    done = run(go())
    assert done["status"] == "succeeded", done
    [stored] = services.store.list(f"tenants/signed-co/renders/{done['id']}")
    assert stored.key.endswith(".webp")
    report = verify_image(
        services.store.get_bytes(stored.key), services.images.outputs.trust_anchors
    )
    assert report["valid"] and report["trusted"], report["manifest"]
    assert RENDER_ASSERTION in json.dumps(report["manifest"])
    assert done["id"] in json.dumps(report["manifest"])
