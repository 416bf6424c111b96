"""The diffusion engine: owns one diffusers pipeline and turns `RenderJob`s into PNG bytes,
many at a time, in one denoising loop (continuous batching).

Plain Python: no Ray, no FastAPI. The Ray Serve replica wraps it; tests, benchmarks and GPU
boxes without Ray use it directly. The parts: `scheduler` (which rows run at the next step),
`denoise` (one step over a batch of rows), `adapters` (slots and per-row LoRA routing).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial

from PIL import Image

from registry.base_models import BaseModelInfo, load_pipeline, select_device
from serve.adapter_cache import AdapterWeights
from serve.engine import denoise
from serve.engine.adapters import AdapterSlots
from serve.engine.scheduler import BatchScheduler, Row
from serve.engine.sources import edit_metadata, overlay
from serve.image_formats import encode_image
from serve.protocol import AdapterSpec, RenderedImage, RenderJob

__all__ = ["DiffusionEngine", "RenderDeadlineExceeded", "encode_png"]

log = logging.getLogger(__name__)


def encode_png(image: Image.Image, metadata: dict[str, str | int | float | None]) -> bytes:
    """PNG bytes with each metadata item as a tEXt chunk, plus all of it as JSON `parameters`."""
    return encode_image(image, "png", metadata)


class _Left(Exception):
    """A row's request ended (cancelled or failed) before the row could start."""


class RenderDeadlineExceeded(TimeoutError):
    """The render's deadline passed before all its images were done; its rows left the batch."""


@dataclass(eq=False)
class _Request:
    job: RenderJob
    weights: list[AdapterWeights]  # one per adapter of the job (`RenderJob.adapters`)
    future: Future
    deadline: float | None  # time.monotonic() seconds
    images: list[RenderedImage | None] = field(default_factory=list)
    on_progress: Callable[[int, int], None] | None = None  # (image-steps done, total)
    stepped: int = 0

    @property
    def over(self) -> bool:
        """Cancelled by its caller, or failed: its rows have nothing left to do."""
        return self.future.done()


@dataclass
class EngineStats:
    """Counters for tests and benchmarks (the replica exports the same as Prometheus metrics)."""

    steps: int = 0
    rows_stepped: int = 0
    joined_mid_batch: int = 0
    largest_batch: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # the last 1000 steps

    def record_step(self, size: int) -> None:
        self.steps += 1
        self.rows_stepped += size
        self.largest_batch = max(self.largest_batch, size)
        self.batch_sizes.append(size)
        del self.batch_sizes[:-1000]


class DiffusionEngine:
    """Renders jobs on one pipeline, many images per denoising step.

    `submit` queues a job's images as rows; one engine thread runs the loop: admit waiting rows
    (they join at the next step), run one step for the batch, finish rows whose steps are done
    (decode, PNG; a request's future resolves when its own images are done, not its
    batch-mates'), and drop rows of requests that were cancelled, failed or ran past their
    deadline. Each row keeps its own prompt, seed, steps, guidance and adapter with its scale,
    so an image's pixels never depend on its batch-mates, when it joined, or which adapters the
    pipeline held (docs/architecture.md says where that holds bit for bit).

    Brand adapters live in at most `max_adapters` pipeline slots (`adapters.AdapterSlots`); an
    adapter used by a running row is pinned, never evicted or swapped under it.
    `release_adapter` (the Serve multiplexer's eviction) only queues a removal.

    `max_batch_images=1` (the default here; the replica takes it from settings) renders one
    image at a time, as the engine did before batching.
    `exact_pixels` computes each UNet call batch-invariantly (`invariant.batch_invariant`),
    because CPU BLAS kernels pick their blocking by a product's shape and that changes the last
    bits of a row's result, which a random or strong adapter can amplify into visible pixels
    (docs/architecture.md, "Pixel identity"). On a CPU the engine also sets torch to
    `cpu_threads` threads (1 by default): how BLAS splits a product over threads changes those
    bits too.
    """

    def __init__(
        self,
        pipeline,  # noqa: ANN001 - a diffusers StableDiffusionPipeline
        model: BaseModelInfo,
        device: str,
        max_adapters: int = 8,
        *,
        max_batch_images: int = 1,
        batch_wait_s: float = 0.0,
        exact_pixels: bool = True,
        cpu_threads: int | None = 1,
        on_step: Callable[[int], None] | None = None,
        on_admit: Callable[[float, bool], None] | None = None,
    ) -> None:
        if batch_wait_s < 0:
            raise ValueError(f"batch_wait_s must not be negative, got {batch_wait_s}")
        if device == "cpu" and cpu_threads is not None:
            import torch

            torch.set_num_threads(cpu_threads)
        self.pipeline = pipeline
        self.model = model
        self.device = device
        self.max_adapters = max_adapters
        self.max_batch_images = max_batch_images
        self.batch_wait_s = batch_wait_s
        # Batch-invariant UNet calls when batching (one image at a time needs none).
        self.invariant = exact_pixels and max_batch_images > 1
        self.slots = AdapterSlots(pipeline, max_adapters)
        self.stats = EngineStats()
        self._on_step = on_step
        self._on_admit = on_admit
        # `_queue` guards the scheduler and wakes the loop; `_lock` guards the pipeline and its
        # slots (a step, an adapter load, pins). `_queue` may be taken inside `_lock`, never
        # the other way round.
        self._queue = threading.Condition()
        self._lock = threading.Lock()
        self._scheduler = BatchScheduler(max_batch_images, max_adapters)
        self._thread: threading.Thread | None = None
        self._closed = False

    @classmethod
    def load(
        cls, model: BaseModelInfo, device: str = "auto", max_adapters: int = 8, **options
    ) -> DiffusionEngine:
        resolved = select_device(device)
        return cls(load_pipeline(model, resolved), model, resolved, max_adapters, **options)

    @property
    def hotswaps(self) -> int:
        """Adapter loads done in place (for tests and benchmarks)."""
        return self.slots.hotswaps

    # --- adapters ----------------------------------------------------------------------------

    def has_adapter(self, model_id: str) -> bool:
        """Whether the adapter is loaded in the pipeline now."""
        return self.slots.has(model_id)

    def loaded_adapters(self) -> list[str]:
        """Loaded adapter ids, least recently used first."""
        return self.slots.loaded()

    def slot_names(self) -> list[str]:
        """The pipeline's adapter names, as diffusers lists them."""
        return sorted(self.slots.pipeline_names())

    def load_adapter(self, weights: AdapterWeights, spec: AdapterSpec) -> None:
        """Load the adapter into the pipeline if it is not there yet. One that does not fit the
        pipeline raises the `adapter_incompatible` `AdapterLoadError` and evicts nothing. While
        every slot is pinned by running rows this loads nothing: the job's rows load it when
        they join the batch."""
        with self._lock:
            self.slots.drain_releases(keep=[spec.model_id])
            if self.slots.can_load_without_evicting_pinned(spec.model_id):
                self.slots.ensure_loaded(weights, spec)

    def unload_adapter(self, model_id: str) -> None:
        """Remove the adapter from the pipeline now; one in use is removed once unused."""
        with self._lock:
            if self.slots.pinned(model_id):
                self.slots.release(model_id)
            elif self.slots.has(model_id):
                self.slots.remove(model_id)

    def release_adapter(self, model_id: str) -> None:
        """Queue the adapter's removal from the pipeline; safe from any thread (and from a
        finalizer): the removal happens at the loop's next step, once no row uses it."""
        self.slots.release(model_id)

    # --- rendering -----------------------------------------------------------------------------

    def submit(
        self,
        job: RenderJob,
        weights: AdapterWeights | Sequence[AdapterWeights] | None = None,
        deadline: float | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> Future:
        """Queue every image of the job; the future resolves to its `RenderedImage`s in seed
        order. Cancelling the future makes its rows leave the batch at the next step; past
        `deadline` (a `time.monotonic()` value) they leave too and the future fails with
        `RenderDeadlineExceeded`. A job with adapters needs their `weights`, one per adapter
        in `job.adapters` order (a job with one adapter may pass them bare). A job combining
        more adapters than the pipeline has slots raises ValueError. `on_progress` is called
        from the engine thread after each step with (image-steps done, total)."""
        if isinstance(weights, AdapterWeights):
            weights = [weights]
        weights = list(weights or ())
        specs = job.adapters
        if len(weights) != len(specs):
            raise ValueError(
                f"job names {len(specs)} adapters ({', '.join(s.model_id for s in specs)}) but "
                f"{len(weights) or 'no'} weights were given"
            )
        for spec, given in zip(specs, weights, strict=True):
            if given.model_id != spec.model_id:
                raise ValueError(f"weights of {given.model_id} given for {spec.model_id}")
        if len({spec.model_id for spec in specs}) != len(specs):
            raise ValueError("job names an adapter version twice")
        request = _Request(job, weights, Future(), deadline, [None] * len(job.seeds), on_progress)
        now = time.monotonic()
        group = (self.model.id, job.height, job.width, type(self.pipeline.scheduler).__name__)
        adapters = tuple(spec.model_id for spec in specs)
        rows = [Row(request, i, group, adapters, now) for i in range(len(job.seeds))]
        with self._queue:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._scheduler.add(rows)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
                self._thread.start()
            self._queue.notify()
        return request.future

    def generate(
        self, job: RenderJob, weights: AdapterWeights | Sequence[AdapterWeights] | None = None
    ) -> list[RenderedImage]:
        """Render every image of the job and wait for them (`submit(...).result()`)."""
        return self.submit(job, weights).result()

    def close(self) -> None:
        """Stop the loop after the rows already queued are done."""
        with self._queue:
            self._closed = True
            self._queue.notify()
        if self._thread is not None:
            self._thread.join()

    def rows(self) -> tuple[int, int]:
        """(waiting, running) images now: for metrics and tests."""
        with self._queue:
            return len(self._scheduler.waiting), len(self._scheduler.running)

    # --- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        import torch

        while True:
            with self._queue:
                if not self._wait_for_work():
                    return
                left = self._scheduler.drop(partial(self._leaves, now=time.monotonic()))
                was_running = bool(self._scheduler.running)
                admitted = self._scheduler.admit()
                running = list(self._scheduler.running)
            try:
                with self._lock:
                    for row in left:
                        self._release_row(row)
                    self._start(admitted, was_running)  # loads adapters: not in inference mode
                    batch = [row for row in running if row.state is not None]
                    if batch:
                        with torch.inference_mode():
                            self._step(batch)
            except Exception as e:  # noqa: BLE001 - a bug here must not hang every caller
                log.exception("engine loop failed; failing the requests it held")
                self._fail_everything(e)

    def _fail_everything(self, error: BaseException) -> None:
        with self._queue:
            rows = list(self._scheduler.waiting) + list(self._scheduler.running)
            self._scheduler.drop(lambda row: True)
        with self._lock:
            for row in rows:
                self._fail(row.request, error)
                self._release_row(row)

    def _wait_for_work(self) -> bool:
        """Under `_queue`: block until there are rows; when a batch is about to start from
        idle, give others up to `batch_wait_s` to arrive. False when closed and idle."""
        scheduler = self._scheduler
        while not len(scheduler):
            if self._closed:
                return False
            self._queue.wait()
        if not scheduler.running and self.batch_wait_s > 0:
            until = scheduler.waiting[0].enqueued_at + self.batch_wait_s
            while len(scheduler.waiting) < self.max_batch_images:
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._queue.wait(left)
        return True

    def _leaves(self, row: Row, now: float) -> bool:
        request: _Request = row.request
        if request.over:
            return True
        if request.deadline is not None and now >= request.deadline:
            self._fail(request, RenderDeadlineExceeded("the render's deadline passed"))
            return True
        return False

    def _start(self, admitted: list[Row], joined: bool) -> None:
        """Under `_lock`: load and pin the admitted rows' adapters, then set up their rows."""
        import torch

        now = time.monotonic()
        # Pin what is loaded first, so that loading another adapter cannot evict it.
        pinned: dict[int, list[str]] = {id(row): [] for row in admitted}
        for row in admitted:
            for adapter in row.adapters:
                if self.slots.has(adapter):
                    self.slots.pin(adapter)
                    pinned[id(row)].append(adapter)
        with self._queue:
            in_use = self._scheduler.adapters_running()
        self.slots.drain_releases(keep=in_use)
        for row in admitted:
            request: _Request = row.request
            held = pinned[id(row)]
            try:
                if request.over:
                    raise _Left
                for spec, weights in zip(request.job.adapters, request.weights, strict=True):
                    if spec.model_id not in held:
                        self.slots.ensure_loaded(weights, spec)
                        self.slots.pin(spec.model_id)
                        held.append(spec.model_id)
                with torch.inference_mode():
                    row.state = self._row_state(request.job, row.index)
            except Exception as e:  # noqa: BLE001 - fails this request only
                for adapter in held:
                    self.slots.unpin(adapter)
                if not isinstance(e, _Left):
                    self._fail(request, e)
                continue
            if self._on_admit is not None:
                self._on_admit(now - row.enqueued_at, joined)
            if joined:
                self.stats.joined_mid_batch += 1
        with self._queue:
            self._scheduler.finish([row for row in admitted if row.state is None])
            # A failed request's other rows, waiting or running, leave too.
            left = self._scheduler.drop(lambda r: r.request.over)
        for row in left:
            self._release_row(row)

    def _row_state(self, job: RenderJob, index: int) -> denoise.RowState:
        mix = job.mixes[index] if job.mixes else None
        scales = {spec.model_id: spec.scale for spec in job.adapters}
        if job.adapter and mix is not None and mix.adapter_scale is not None:
            scales[job.adapter.model_id] = mix.adapter_scale
        # The deltas add up in model-id order, whatever order the request listed them in, so
        # the pixels do not depend on it (floating-point sums are not associative).
        ordered = sorted(scales)
        return denoise.start_row(
            self.pipeline,
            self.slots.router,
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            width=job.width,
            height=job.height,
            steps=job.steps,
            guidance_scale=job.guidance_scale,
            seed=job.seeds[index],
            slots=tuple(self.slots.slot_name(model_id) for model_id in ordered),
            scales=tuple(scales[model_id] for model_id in ordered),
            source=job.source,
            mix=mix,
        )

    def _step(self, batch: list[Row]) -> None:
        # An edit at strength 0 has no step to run: it is done as soon as it starts.
        stepping = [row for row in batch if not row.state.done]
        try:
            if stepping:
                denoise.step(
                    self.pipeline,
                    self.slots.router,
                    [row.state for row in stepping],
                    self.invariant,
                )
        except Exception as e:  # noqa: BLE001 - the whole batch failed: fail its requests
            for row in batch:
                self._fail(row.request, e)
            done = batch
        else:
            if stepping:
                self.stats.record_step(len(stepping))
                if self._on_step is not None:
                    self._on_step(len(stepping))
                self._report_progress(stepping)
            done = [row for row in batch if row.state.done]
            for row in done:
                self._finish(row)
        for row in done:
            self._release_row(row)
        with self._queue:
            self._scheduler.finish(done)

    @staticmethod
    def _report_progress(batch: list[Row]) -> None:
        stepped: dict[int, _Request] = {}
        for row in batch:
            request: _Request = row.request
            request.stepped += 1
            if request.on_progress is not None:
                stepped[id(request)] = request
        for request in stepped.values():
            try:
                request.on_progress(request.stepped, request.job.steps * len(request.job.seeds))
            except Exception:  # noqa: BLE001 - a progress listener never fails a render
                log.exception("a progress callback failed")

    def _finish(self, row: Row) -> None:
        request: _Request = row.request
        if request.over:
            return
        try:
            image = denoise.decode(self.pipeline, row.state)
            if row.state.keep is not None:  # inpainting: the source's pixels outside the mask
                image = overlay(self.pipeline, row.state.keep, image)
            request.images[row.index] = self._rendered(request.job, row.index, image)
        except Exception as e:  # noqa: BLE001 - fails this request only
            self._fail(request, e)
            return
        if all(im is not None for im in request.images):
            with suppress(InvalidStateError):  # cancelled meanwhile
                request.future.set_result(list(request.images))

    def _release_row(self, row: Row) -> None:
        """A row left the batch: unpin its adapters and drop its state."""
        if isinstance(row.state, denoise.RowState):
            for adapter in row.adapters:
                self.slots.unpin(adapter)
        row.state = None

    @staticmethod
    def _fail(request: _Request, error: BaseException) -> None:
        with suppress(InvalidStateError):  # already cancelled or failed
            request.future.set_exception(error)

    def _rendered(self, job: RenderJob, index: int, image: Image.Image) -> RenderedImage:
        spec = job.adapter
        seed = job.seeds[index]
        meta = {
            "prompt": job.prompt,
            "negative_prompt": job.negative_prompt,
            "seed": seed,
            "steps": job.steps,
            "guidance_scale": job.guidance_scale,
            "width": job.width,
            "height": job.height,
            "base_model": self.model.id,
            "base_model_revision": self.model.revision,
            "adapter": f"{spec.brand}:{spec.version}" if spec else None,
            "adapter_scale": spec.scale if spec else None,
            # Every adapter of a render that combines several: version and scale of each.
            "adapters": json.dumps(
                [{"adapter": f"{a.brand}:{a.version}", "scale": a.scale} for a in job.adapters]
            )
            if job.extra_adapters
            else None,
        }
        meta.update(edit_metadata(job, index))
        return RenderedImage(png=encode_png(image, meta), seed=seed)
