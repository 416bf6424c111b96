"""Async renders: the API's side of the durable render queue (`registry.render_queue`), and the
dispatcher that feeds queued renders to the render replicas.

`RenderService` checks a request exactly as the synchronous path does (limits, storage cap,
adapter resolution: the version is pinned when the render is accepted), then the tenant's plan
(403 for a tier beyond it) and queue length (429), and records it. Every ingress replica runs a
`RenderDispatcher`: it claims queued renders in fair order under a lease, renders them through
the same `Renderer` as `POST /v1/images/generations` (the replica handle, multiplexed by adapter
version, so adapter affinity holds), stores the images and records the result with one
compare-and-set. A render whose dispatcher dies is queued again when its lease expires.

Each terminal change calls the event sink once, by the caller that won it: `render.succeeded`,
`render.failed` or `render.cancelled`.

The synchronous path rides the same scheduler (`RenderDispatcher.turn`): an admitted
`POST /v1/images/generations` request writes a sync ticket, leased to this replica's dispatcher,
and wakes it; the dispatcher claims tickets and async renders in one fair order, and for a
ticket it hands the turn to the waiting request, which renders in its own coroutine exactly as
before and gives the slot back when the replica is done.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Literal, Protocol

from pydantic import Field

from registry.render_limits import AdmissionRefused
from registry.render_queue import (
    TERMINAL,
    QueueFull,
    RenderPlan,
    RenderQueueStore,
    RenderTask,
    RoomCheck,
)
from registry.storage import StorageError
from serve.adapter_cache import AdapterLoadError
from serve.errors import APIError, InvalidField, ServiceUnavailable, StorageUnavailable
from serve.images import ImageService, refusal, used_version
from serve.io_pools import BlockingPool
from serve.protocol import (
    STRICT_BODY,
    AdapterSpec,
    ImageGenerationRequest,
    RenderedImage,
    RenderJob,
    Text,
)
from serve.request_context import request_logger

log = request_logger(__name__)
_plain_log = logging.getLogger(__name__)

#: `emit(tenant_id, event_type, data, webhook_url)`: called once per terminal change.
EventSink = Callable[[str, str, dict, str | None], None]
MAX_WEBHOOK_URL = 2048
#: How long a dispatcher reuses a tenant's render plan for its synchronous renders.
PLAN_TTL_S = 5.0


def log_event(tenant_id: str, event_type: str, data: dict, webhook_url: str | None) -> None:
    """The default event sink: a log line (the farm wires the webhook outbox in its place)."""
    _plain_log.info("event %s for tenant %s: render %s", event_type, tenant_id, data.get("id"))


class RenderRequest(ImageGenerationRequest):
    """Body of `POST /v1/renders`: the generations body plus where and how fast."""

    model_config = STRICT_BODY
    webhook_url: Text | None = Field(
        None, max_length=MAX_WEBHOOK_URL, description="https URL told when the render ends."
    )
    priority: Literal["fast", "relax"] | None = Field(
        None,
        description="`fast`, or `relax` (runs on capacity fast renders leave idle). Default: "
        "`fast` where the tenant's plan allows it, else `relax`.",
    )


def job_to_dict(job: RenderJob) -> dict:
    return dataclasses.asdict(job)


def job_of(data: dict) -> RenderJob:
    adapter = data.get("adapter")
    return RenderJob(
        **{
            **data,
            "seeds": tuple(data["seeds"]),
            "adapter": AdapterSpec(**adapter) if adapter else None,
            "extra_adapters": tuple(AdapterSpec(**a) for a in data.get("extra_adapters", ())),
        }
    )


def _settle(future: asyncio.Future, error: Exception | None) -> None:
    """Resolve a waiting request's turn on its own loop (unless it was cancelled)."""
    if not future.done():
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


def _ts(value) -> int | None:  # noqa: ANN001 - a datetime or None
    return int(value.timestamp()) if value is not None else None


class RenderService:
    """The routes' feature code: create, get, list, cancel, and the event stream."""

    def __init__(
        self,
        queue: RenderQueueStore,
        images: ImageService,
        *,
        default_plan: str,
        max_queued: int,
        db_pool: BlockingPool,
        webhook_check: Callable[[str], str],
        emit: EventSink = log_event,
        events_poll_s: float = 0.25,
    ) -> None:
        self.queue = queue
        self.images = images
        self.default_plan = default_plan
        self.max_queued = max_queued
        self.db = db_pool
        self.emit = emit
        self.webhook_check = webhook_check
        self.events_poll_s = events_poll_s

    # --- create ---------------------------------------------------------------------------------
    async def create(self, tenant_id: str, body: RenderRequest) -> dict:
        webhook_url = None
        if body.webhook_url is not None:  # resolves the host: off the event loop
            webhook_url = await asyncio.to_thread(self.webhook_check, body.webhook_url)
        plan = await self.db.run(self.queue.plan, tenant_id, self.default_plan)
        priority = body.priority or plan.tiers[0]
        if priority not in plan.tiers:
            raise APIError(
                403,
                f"priority {priority!r} is not in this tenant's render plan {plan.plan!r} "
                f"(it allows: {', '.join(plan.tiers)})",
                param="priority",
                code="priority_not_in_plan",
            )
        req = ImageGenerationRequest(
            **body.model_dump(exclude={"webhook_url", "priority"}, exclude_unset=True)
        )
        # The render id is drawn before the adapter is resolved: a canary assigns by it.
        render_id = f"render-{secrets.token_hex(12)}"
        job = await self.images.prepare(tenant_id, req, render_id)
        cap = plan.max_queued if plan.max_queued is not None else self.max_queued
        request = {
            "job": job_to_dict(job),
            "response_format": req.response_format,
            "output_format": req.output_format,
            "output_compression": req.output_compression,
        }
        try:
            task = await self.db.run(
                self.queue.enqueue,
                tenant_id,
                priority,
                request,
                len(job.seeds),
                job.steps,
                plan.weight,
                cap,
                webhook_url,
                # The hourly quota, reserved by the row itself in the same transaction.
                check=self.images.limiter.check_quota,
                render_id=render_id,
            )
        except AdmissionRefused as e:
            raise refusal(e) from None
        except QueueFull as e:
            raise APIError(
                429,
                f"too many queued renders: this tenant has {e.used} unfinished of its "
                f"max_queued_renders={e.cap}; retry when some finish",
                code="queue_length_exceeded",
                headers={"Retry-After": "5"},
            ) from None
        log.info("render %s queued (%s, %d images)", task.id, priority, task.images)
        position = await self.db.run(self.queue.queue_position, task)
        return self.render_object(task, position)

    # --- reads ----------------------------------------------------------------------------------
    def _task(self, tenant_id: str, render_id: str) -> RenderTask:
        task = self.queue.get(tenant_id, render_id)
        if task is None:
            raise APIError(
                404, f"no render {render_id!r}", param="render_id", code="render_not_found"
            )
        return task

    def render_object(self, task: RenderTask, position: int | None, with_data: bool = True) -> dict:
        result = task.result or {}
        adapter = task.request["job"].get("adapter")
        extra = task.request["job"].get("extra_adapters", [])
        return {
            "id": task.id,
            "object": "render",
            "status": task.status,
            "priority": task.priority,
            "created": _ts(task.created_at),
            "created_at": _ts(task.created_at),
            "started_at": _ts(task.started_at),
            "finished_at": _ts(task.finished_at),
            "queue_position": position,
            "progress": {"step": task.progress_step, "total": task.progress_total},
            "attempts": task.attempts,
            "model": self.images.limits.model.id,
            "adapter": AdapterSpec(**adapter).describe() if adapter else None,
            "adapters": [
                AdapterSpec(**a).describe() for a in ([adapter] if adapter else []) + extra
            ],
            "webhook_url": task.webhook_url,
            "error": {"message": task.error, "code": task.error_code, "param": None}
            if task.error
            else None,
            "data": self._data(task, result) if with_data and task.status == "succeeded" else None,
        }

    def _data(self, task: RenderTask, result: dict) -> list[dict]:
        """The images in the generations response's shape (presigned URL or inline PNG)."""
        data = []
        for image in result.get("images", []):
            if task.request.get("response_format") == "b64_json":
                try:
                    png = self.images.store.get_bytes(image["key"])
                except StorageError as e:
                    raise StorageUnavailable() from e
                item = {"seed": image["seed"], "b64_json": base64.b64encode(png).decode()}
            else:
                url = self.images.store.presigned_get(image["key"], self.images.presign_expiry_s)
                item = {"seed": image["seed"], "url": url}
            if image.get("near_duplicate"):
                item["near_duplicate"] = image["near_duplicate"]
            data.append(item)
        return data

    def get(self, tenant_id: str, render_id: str) -> dict:
        task = self._task(tenant_id, render_id)
        return self.render_object(task, self.queue.queue_position(task))

    def list(self, tenant_id: str, after: str | None, limit: int) -> dict:
        try:
            tasks, more = self.queue.list(tenant_id, after, limit)
        except KeyError:
            raise InvalidField("after", f"no render {after!r} to page after") from None
        return {
            "object": "list",
            "data": [self.render_object(t, None, with_data=False) for t in tasks],
            "has_more": more,
        }

    def cancel(self, tenant_id: str, render_id: str) -> dict:
        task = self._task(tenant_id, render_id)
        if task.status in TERMINAL:
            raise APIError(
                409,
                f"render {render_id} already {task.status}; nothing to cancel",
                code="render_finished",
            )
        task, won = self.queue.cancel(tenant_id, render_id)
        if task is not None and task.status != "cancelled":  # it finished first
            raise APIError(
                409,
                f"render {render_id} already {task.status}; nothing to cancel",
                code="render_finished",
            )
        if won:
            log.info("render %s cancelled", render_id)
            self.announce(task)
        return self.render_object(task, None)

    def announce(self, task: RenderTask, claimed: bool = False) -> None:
        """Hand a terminal change to the event sink (`render.<status>`), then mark it sent.
        `claimed`: a recovery pass already took it (`RenderQueueStore.unsent_events`)."""
        render = self.render_object(task, None, with_data=False)
        try:
            self.emit(task.tenant_id, f"render.{task.status}", render, task.webhook_url)
        except Exception:  # noqa: BLE001 - the change is recorded; the sink is not its owner
            _plain_log.exception("the event sink failed for render %s", task.id)
            return  # still pending: a later recovery pass retries it
        if not claimed:
            self.queue.event_sent(task.id)

    async def events(self, tenant_id: str, render_id: str) -> AsyncIterator[dict]:
        """Server-sent events: the render object (event `render`) whenever its status, queue
        position or progress changes, the last one once it is terminal."""
        task = await self.db.run(self._task, tenant_id, render_id)  # 404 before the stream
        return self._stream(tenant_id, task)

    async def _stream(self, tenant_id: str, task: RenderTask) -> AsyncIterator[dict]:
        seen = None
        sent = 0
        while True:
            position = await self.db.run(self.queue.queue_position, task)
            state = (task.status, position, task.progress_step)
            if state != seen:
                seen = state
                body = await self.db.run(self.render_object, task, position)
                sent += 1
                yield {"event": "render", "id": str(sent), "data": json.dumps(body)}
            if task.status in TERMINAL:
                return
            await asyncio.sleep(self.events_poll_s)
            task = await self.db.run(self.queue.get_any, task.id)


class ProgressRenderer(Protocol):
    """A `serve.images.Renderer` that also reports progress (`ServeRenderer`, `EngineRenderer`)."""

    async def render(self, job: RenderJob) -> list[RenderedImage]: ...

    async def render_progress(
        self, job: RenderJob, on_progress: Callable[[int, int], None]
    ) -> list[RenderedImage]: ...


class RenderDispatcher:
    """Claims queued renders (up to `concurrency` in flight) and runs them to a recorded end.

    One per ingress replica, each under its own `owner` id; the database decides which replica
    runs which render. Leases are renewed every third of `lease_s`; one found lost (the render
    was cancelled, or another replica took it over after an expiry) stops its render. Progress
    is written at most every `progress_every_s` per render.
    """

    def __init__(
        self,
        queue: RenderQueueStore,
        images: ImageService,
        renderer: ProgressRenderer,
        service: RenderService,
        *,
        concurrency: int,
        lease_s: float,
        max_attempts: int,
        poll_s: float,
        progress_every_s: float = 0.5,
    ) -> None:
        self.queue = queue
        self.images = images
        self.renderer = renderer
        self.service = service
        self.concurrency = concurrency
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.poll_s = poll_s
        self.progress_every_s = progress_every_s
        self.owner = f"dispatcher-{secrets.token_hex(8)}"
        self.renew_every_s = lease_s / 3
        self.inflight: dict[str, asyncio.Task] = {}  # claimed, until recorded
        self._rendering: set[str] = set()  # on a replica now: what `concurrency` bounds
        self._progress: dict[str, int] = {}
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: threading.Event | None = None
        # An async render is claimed only while its tenant is under its in-flight cap.
        limiter, cap = images.limiter, images.max_inflight
        self.room: RoomCheck = lambda s, tenant_id: limiter.room(s, tenant_id, cap)
        # Sync tickets: waiting for their turn (the request's loop and future), and granted
        # (their request renders now). `_lock` guards `_waiting` across the two loops.
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._granted: set[str] = set()
        self._closing: set[asyncio.Future] = set()  # tickets being closed (kept referenced)
        self._plans: dict[str, tuple[float, RenderPlan]] = {}

    # --- running --------------------------------------------------------------------------------
    def start(self) -> Callable[[], None]:
        """Run in a thread of its own (its own event loop); returns a stop."""
        stop = threading.Event()
        self._running = threading.Event()
        thread = threading.Thread(
            target=lambda: asyncio.run(self.run(stop)), name="render-dispatcher", daemon=True
        )
        thread.start()
        self._running.wait(10)  # its loop takes sync tickets from here on

        def stopper() -> None:
            stop.set()
            thread.join(timeout=10)

        return stopper

    async def run(self, stop: threading.Event) -> None:
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        if self._running is not None:
            self._running.set()
        last_renew = last_expire = last_progress = 0.0
        while not stop.is_set():
            try:
                now = time.monotonic()
                if now - last_expire >= self.lease_s / 2:
                    last_expire = now
                    for task in await asyncio.to_thread(
                        self.queue.expire_leases, self.max_attempts
                    ):
                        await self._emit(task)
                    # Events a crash kept from the sink (another replica's, or ours).
                    for task in await asyncio.to_thread(self.queue.unsent_events, self.lease_s):
                        await asyncio.to_thread(self.service.announce, task, True)
                if now - last_renew >= self.renew_every_s:
                    last_renew = now
                    await self._renew()
                if now - last_progress >= self.progress_every_s:
                    last_progress = now
                    await self._write_progress()
                free = self.concurrency - len(self._rendering)
                if free > 0:
                    self._wake.clear()  # a wake from here on means: look again
                    for task in await asyncio.to_thread(
                        self.queue.claim, self.owner, self.lease_s, free, self.room
                    ):
                        if task.sync:
                            await self._grant(task)
                        else:
                            self._rendering.add(task.id)
                            self.inflight[task.id] = asyncio.create_task(self._run_one(task))
            except Exception:  # noqa: BLE001 - the database is down: try again next round
                _plain_log.exception("render dispatcher round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            self._wake.clear()
        self._loop = None
        with self._lock:
            waiting, self._waiting = list(self._waiting.values()), {}
        stopping = ServiceUnavailable("the ingress is stopping", "overloaded")
        for loop, granted in waiting:  # their requests answer 503 rather than wait forever
            with contextlib.suppress(RuntimeError):  # that loop closed meanwhile
                loop.call_soon_threadsafe(_settle, granted, stopping)
        for running in list(self.inflight.values()):
            running.cancel()  # their leases expire and another replica takes them over
        await asyncio.gather(*self.inflight.values(), return_exceptions=True)

    # --- the synchronous path's turns -----------------------------------------------------------
    @asynccontextmanager
    async def turn(self, tenant_id: str, job: RenderJob) -> AsyncIterator[None]:
        """Wait for the render's turn in the fair order, then hold one of the dispatcher's
        slots until the block ends. Called on the request's own event loop, after its
        admission; a cancelled request (the client went away) gives its ticket up."""
        if self._loop is None:
            raise ServiceUnavailable("the render dispatcher is not running", "overloaded")
        render_id = f"render-{secrets.token_hex(12)}"
        granted = asyncio.get_running_loop().create_future()
        with self._lock:  # before the row exists: the claim may come at once
            self._waiting[render_id] = (asyncio.get_running_loop(), granted)
        outcome, code = "failed", None
        try:
            db = self.service.db
            plan = await self._plan(tenant_id)
            await db.run(
                partial(
                    self.queue.enqueue,
                    sync_owner=self.owner,
                    lease_s=self.lease_s,
                    render_id=render_id,
                ),
                tenant_id,
                plan.tiers[0],  # the best tier the plan allows, as for an async render
                {"job": {"adapter": dataclasses.asdict(job.adapter) if job.adapter else None}},
                len(job.seeds),
                job.steps,
                plan.weight,
                None,  # the in-flight cap bounds a tenant's waiting requests
            )
            self._poke()
            await granted
            yield
            outcome = "succeeded"
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except APIError as e:
            code = e.code
            raise
        finally:
            with self._lock:
                self._waiting.pop(render_id, None)
            self._call(self._turn_done, render_id)
            # Off the answer's path: the request does not wait for its ticket's end (its
            # lease would end it, should this write fail).
            closing = asyncio.ensure_future(
                self.service.db.run(self.queue.finish_sync, render_id, self.owner, outcome, code)
            )
            self._closing.add(closing)
            closing.add_done_callback(self._closed)

    def _closed(self, closing: asyncio.Future) -> None:
        self._closing.discard(closing)
        if not closing.cancelled() and closing.exception() is not None:
            _plain_log.warning("closing a sync ticket failed: %s", closing.exception())

    async def _plan(self, tenant_id: str) -> RenderPlan:
        """The tenant's render plan, reused for `PLAN_TTL_S` (plans change by hand, rarely):
        a synchronous render does not pay a read for it each time."""
        cached = self._plans.get(tenant_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        plan = await self.service.db.run(self.queue.plan, tenant_id, self.service.default_plan)
        self._plans[tenant_id] = (time.monotonic() + PLAN_TTL_S, plan)
        return plan

    def _call(self, fn: Callable[..., object], *args: object) -> None:
        """Run `fn(*args)` on the dispatcher's loop (from any thread)."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(fn, *args)

    def _poke(self) -> None:
        """Wake the dispatcher now: a ticket is waiting (no poll delay)."""
        self._call(lambda: self._wake.set())

    async def _grant(self, task: RenderTask) -> None:
        """A sync ticket's turn came: hand it to its request, whose slot this is now."""
        with self._lock:
            waiter = self._waiting.get(task.id)
            if waiter is not None:
                self._rendering.add(task.id)
                self._granted.add(task.id)
        if waiter is None:  # its request ended before its turn
            await asyncio.to_thread(self.queue.finish_sync, task.id, self.owner, "cancelled")
            return
        loop, granted = waiter
        with contextlib.suppress(RuntimeError):  # its loop closed: `_turn_done` never comes
            loop.call_soon_threadsafe(_settle, granted, None)

    def _turn_done(self, render_id: str) -> None:
        self._granted.discard(render_id)
        self._rendered(render_id)

    async def _renew(self) -> None:
        with self._lock:
            tickets = list(self._waiting)
        held = await asyncio.to_thread(
            self.queue.renew,
            self.owner,
            [*self.inflight, *self._granted, *tickets],
            self.lease_s,
        )
        for render_id in set(self._rendering) - held:
            self._stop(render_id)

    async def _write_progress(self) -> None:
        pending, self._progress = self._progress, {}
        for render_id, step in pending.items():
            held = await asyncio.to_thread(self.queue.progress, render_id, self.owner, step)
            if not held:
                self._stop(render_id)  # cancelled by its tenant: stop rendering

    async def _emit(self, task: RenderTask) -> None:
        await asyncio.to_thread(self.service.announce, task)

    # --- one render -----------------------------------------------------------------------------
    async def _run_one(self, task: RenderTask) -> None:
        try:
            await self._render_and_record(task)
        except asyncio.CancelledError:
            _plain_log.info("render %s stopped (cancelled or taken over)", task.id)
        except Exception:  # noqa: BLE001 - a bug must not stop the dispatcher
            _plain_log.exception("render %s failed unexpectedly", task.id)
            await self._fail(task, "the render failed", "render_failed")
        finally:
            self.inflight.pop(task.id, None)
            self._progress.pop(task.id, None)
            self._rendered(task.id)

    def _stop(self, render_id: str) -> None:
        """Stop a render still on a replica (one being recorded finishes: its compare-and-set
        decides whether anything is kept)."""
        if render_id in self._rendering and render_id in self.inflight:
            self.inflight[render_id].cancel()

    def _rendered(self, render_id: str) -> None:
        """The replica is done with the render: its slot goes to the next one while this one
        is stored and recorded."""
        self._progress.pop(render_id, None)
        if render_id in self._rendering:
            self._rendering.discard(render_id)
            if self._wake is not None:
                self._wake.set()

    def _on_progress(self, render_id: str) -> Callable[[int, int], None]:
        def record(done: int, total: int) -> None:
            self._progress[render_id] = done

        return record

    async def _render(self, render_id: str, job: RenderJob) -> list[RenderedImage]:
        try:
            if hasattr(self.renderer, "render_progress"):
                return await self.renderer.render_progress(job, self._on_progress(render_id))
            return await self.renderer.render(job)
        finally:
            self._rendered(render_id)

    async def _render_and_record(self, task: RenderTask) -> None:
        job = job_of(task.request["job"])
        try:
            images = await self._render(task.id, job)
        except AdapterLoadError as e:
            await self._fail(task, e.message, e.code)
            return
        except APIError as e:  # 503s: no capacity, the replica was lost, the render timed out
            if e.code == "render_timeout" or task.attempts >= self.max_attempts:
                await self._fail(task, e.message, e.code or "render_failed")
            else:
                await asyncio.to_thread(self.queue.release, task.id, self.owner)
            return
        try:
            keys, near = await self.images.store_images(
                task.tenant_id,
                task.id,
                images,
                job.adapter,
                task.request.get("output_format", "png"),
                task.request.get("output_compression"),
            )
        except APIError as e:
            if e.status < 500:  # the tenant's policy refused the images (near_duplicate): final
                await self._fail(task, e.message, e.code or "render_failed")
            else:
                await asyncio.to_thread(self.queue.release, task.id, self.owner)
            return
        result = {
            "images": [
                {"key": key, "seed": image.seed, "near_duplicate": match}
                for key, image, match in zip(keys, images, near, strict=True)
            ]
        }
        model = self.images.limits.model.id
        won = await asyncio.to_thread(
            self.queue.succeed, task.id, self.owner, result, model, used_version(job.adapter)
        )
        if not won:  # cancelled meanwhile, or taken over: its images are no one's
            await asyncio.to_thread(self._discard, keys)
            return
        if self.images.on_rendered is not None:
            self.images.on_rendered(task.tenant_id, len(images), job.adapter)
        await self._emit(await asyncio.to_thread(self.queue.get_any, task.id))

    def _discard(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.images.store.delete(key)
            except StorageError:
                _plain_log.warning("could not remove %s of a render that was not kept", key)

    async def _fail(self, task: RenderTask, error: str, code: str) -> None:
        if await asyncio.to_thread(self.queue.fail, task.id, self.owner, error, code):
            await self._emit(await asyncio.to_thread(self.queue.get_any, task.id))
