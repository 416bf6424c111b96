"""The batching engine without Ray: pixel identity across batch-mates, join times, adapters and
scales; leaving on cancellation and deadline; adapter failures isolated; no eviction under a
running row."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import time
from collections.abc import Callable
from concurrent.futures import CancelledError

import numpy as np
import pytest
from PIL import Image

from finetune.synthetic_lora import random_lora_bytes
from registry.base_models import SHAPES, TINY_RANDOM, ensure_base_model, load_pipeline
from serve.adapter_cache import AdapterLoadError, AdapterWeights, parse_weights
from serve.engine import DiffusionEngine, RenderDeadlineExceeded
from serve.protocol import AdapterSpec, RenderJob

BRANDS = ("b0", "b1", "b2")


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 300) -> None:
    """Poll a condition (the engine runs on its own thread)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s:.0f}s: {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ensure_base_model(SHAPES, tmp_path_factory.mktemp("models"), 1024)


@pytest.fixture(scope="module")
def adapters(model) -> dict[str, tuple[AdapterSpec, AdapterWeights]]:
    unet = load_pipeline(model, "cpu").unet
    out = {}
    for i, brand in enumerate(BRANDS):
        data = random_lora_bytes(unet, seed=i)
        spec = AdapterSpec("t1", brand, 1, 1.0, hashlib.sha256(data).hexdigest(), "s3://x", brand)
        out[brand] = (spec, parse_weights(spec, data))
    return out


def job(adapters, brand: str | None, seed: int, scale: float = 1.0, steps: int = 6) -> RenderJob:
    spec = None if brand is None else dataclasses.replace(adapters[brand][0], scale=scale)
    prompt = "a red circle on a blue background"
    return RenderJob(prompt, None, 32, 32, steps, 4.0, (seed,), spec)


def weights(adapters, brand: str | None) -> AdapterWeights | None:
    return None if brand is None else adapters[brand][1]


def px(images) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(images[0].png)).convert("RGB"))


#: (brand, seed, scale): three adapters plus the base model, adapters at two scales.
WORK = [(None, s, 1.0) for s in (1, 2)]
WORK += [(b, s, scale) for b in BRANDS for scale in (1.0, 0.5) for s in (1, 2)]


@pytest.mark.slow
def test_pixels_do_not_depend_on_batch_mates_or_when_a_row_joined(model, adapters):
    engine = DiffusionEngine.load(model, "cpu", max_adapters=4, max_batch_images=4)
    solo = {w: px(engine.generate(job(adapters, *w), weights(adapters, w[0]))) for w in WORK}
    assert engine.stats.largest_batch == 1
    assert len({image.tobytes() for image in solo.values()}) == len(WORK)  # all differ

    # All at once: full batches mixing brands, scales and the base model.
    futures = {w: engine.submit(job(adapters, *w), weights(adapters, w[0])) for w in WORK}
    batched = {w: px(f.result()) for w, f in futures.items()}
    assert engine.stats.largest_batch == 4

    # Joined mid-way: a long render runs, the others join it step by step (and leave first).
    steps_before = engine.stats.steps
    long = engine.submit(job(adapters, "b0", seed=7, steps=60), weights(adapters, "b0"))
    wait_until(lambda: engine.stats.steps > steps_before, "the long row runs")
    joined_before = engine.stats.joined_mid_batch
    late = {}
    for w in WORK:
        late[w] = engine.submit(job(adapters, *w), weights(adapters, w[0]))
    joined = {w: px(f.result()) for w, f in late.items()}
    assert engine.stats.joined_mid_batch - joined_before >= len(WORK) - 1
    assert not long.done()  # the short rows returned without waiting for their batch-mate
    long_alone = DiffusionEngine.load(model, "cpu", max_adapters=4, max_batch_images=4)
    expected_long = px(
        long_alone.generate(job(adapters, "b0", seed=7, steps=60), weights(adapters, "b0"))
    )
    assert np.array_equal(px(long.result()), expected_long)

    for w in WORK:
        assert np.array_equal(batched[w], solo[w]), w
        assert np.array_equal(joined[w], solo[w]), w


def test_scale_zero_is_the_base_model_in_a_mixed_batch(model, adapters):
    engine = DiffusionEngine.load(model, "cpu", max_adapters=2, max_batch_images=4)
    base, zero, full = (
        engine.submit(job(adapters, None, 3)),
        engine.submit(job(adapters, "b1", 3, scale=0.0), weights(adapters, "b1")),
        engine.submit(job(adapters, "b1", 3), weights(adapters, "b1")),
    )
    assert np.array_equal(px(base.result()), px(zero.result()))
    assert not np.array_equal(px(base.result()), px(full.result()))


def test_a_cancelled_request_leaves_the_batch_at_the_next_step(model, adapters):
    engine = DiffusionEngine.load(model, "cpu", max_adapters=2, max_batch_images=4)
    reference = px(engine.generate(job(adapters, "b2", 5), weights(adapters, "b2")))
    doomed = engine.submit(job(adapters, "b1", 4, steps=1000), weights(adapters, "b1"))
    wait_until(lambda: engine.stats.steps > 1, "the doomed row runs")
    mate = engine.submit(job(adapters, "b2", 5, steps=6), weights(adapters, "b2"))
    wait_until(lambda: engine.rows() == (0, 2), "both rows run")
    assert doomed.cancel()
    wait_until(lambda: engine.rows() == (0, 1), "the cancelled row left")
    assert np.array_equal(px(mate.result()), reference)
    with pytest.raises(CancelledError):
        doomed.result()
    wait_until(lambda: not engine.slots.pinned("t1/b1:1"), "the cancelled row's pin is gone")


def test_cancelling_the_awaiting_coroutine_makes_the_rows_leave(model, adapters):
    """What the replica does: Serve cancels `render` when the client goes away, and the
    `asyncio.wrap_future` it awaits cancels the engine's future."""
    import asyncio

    engine = DiffusionEngine.load(model, "cpu", max_batch_images=4)

    async def render_then_disconnect() -> None:
        future = engine.submit(job(adapters, None, 4, steps=1000))

        async def render() -> list:  # the replica's `render`, awaiting the engine
            return await asyncio.wrap_future(future)

        task = asyncio.create_task(render())
        await asyncio.to_thread(wait_until, lambda: engine.stats.steps > 0, "the row runs")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert future.cancelled()

    asyncio.run(render_then_disconnect())
    wait_until(lambda: engine.rows() == (0, 0), "the row left")
    assert engine.stats.steps < 1000


def test_a_request_past_its_deadline_leaves_and_fails(model, adapters):
    engine = DiffusionEngine.load(model, "cpu", max_adapters=2, max_batch_images=4)
    slow = engine.submit(job(adapters, None, 4, steps=1000), deadline=time.monotonic() + 1.0)
    with pytest.raises(RenderDeadlineExceeded):
        slow.result(timeout=600)
    wait_until(lambda: engine.rows() == (0, 0), "the late row left")
    assert engine.stats.steps < 1000


def test_an_adapter_that_cannot_load_fails_only_its_own_request(model, adapters, tmp_path):
    other = ensure_base_model(TINY_RANDOM, tmp_path / "models", 1024)
    data = random_lora_bytes(load_pipeline(other, "cpu").unet, seed=9)
    sha = hashlib.sha256(data).hexdigest()
    misfit = AdapterSpec("t1", "misfit", 1, 1.0, sha, "s3://x", "misfit")
    engine = DiffusionEngine.load(model, "cpu", max_adapters=2, max_batch_images=4)
    expected = {
        b: px(engine.generate(job(adapters, b, 8), weights(adapters, b))) for b in (None, "b0")
    }

    base = engine.submit(job(adapters, None, 8))
    bad = engine.submit(
        dataclasses.replace(job(adapters, None, 8), adapter=misfit), parse_weights(misfit, data)
    )
    good = engine.submit(job(adapters, "b0", 8), weights(adapters, "b0"))
    with pytest.raises(AdapterLoadError) as e:
        bad.result()
    assert e.value.code == "adapter_incompatible"
    assert np.array_equal(px(base.result()), expected[None])
    assert np.array_equal(px(good.result()), expected["b0"])
    assert engine.loaded_adapters() == ["t1/b0:1"]


def test_an_adapter_in_use_is_never_evicted_or_swapped_under_its_row(model, adapters):
    engine = DiffusionEngine.load(model, "cpu", max_adapters=1, max_batch_images=4)
    reference = DiffusionEngine.load(model, "cpu", max_adapters=1, max_batch_images=4)
    long_job = job(adapters, "b0", 6, steps=40)
    expected = {
        "b0": px(reference.generate(long_job, weights(adapters, "b0"))),
        "b1": px(reference.generate(job(adapters, "b1", 6), weights(adapters, "b1"))),
    }
    running = engine.submit(long_job, weights(adapters, "b0"))
    wait_until(lambda: engine.stats.steps > 0, "the b0 row runs")  # a fresh engine
    # The multiplexer evicts b0 and warms b1 while b0's row runs: both wait for the row.
    engine.release_adapter("t1/b0:1")
    engine.load_adapter(adapters["b1"][1], adapters["b1"][0])
    waiting = engine.submit(job(adapters, "b1", 6), weights(adapters, "b1"))
    wait_until(lambda: engine.rows() == (1, 1), "the b1 row waits for a slot")
    assert engine.loaded_adapters() == ["t1/b0:1"] and engine.hotswaps == 0
    assert np.array_equal(px(running.result()), expected["b0"])
    assert np.array_equal(px(waiting.result()), expected["b1"])
    assert engine.loaded_adapters() == ["t1/b1:1"]


def test_one_image_at_a_time_renders_todays_pixels(model, adapters):
    """`max_batch_images=1` is the engine before batching: the pipeline's own call, per image."""
    import torch

    engine = DiffusionEngine.load(model, "cpu", max_adapters=2, max_batch_images=1)
    ours = px(engine.generate(job(adapters, "b1", 11, scale=0.5), weights(adapters, "b1")))
    pipe = engine.pipeline
    pipe.set_adapters([engine.slots.slot_name("t1/b1:1")], [0.5])
    out = pipe(
        prompt="a red circle on a blue background",
        width=32,
        height=32,
        num_inference_steps=6,
        guidance_scale=4.0,
        generator=torch.Generator("cpu").manual_seed(11),
    ).images[0]
    assert np.array_equal(ours, np.asarray(out.convert("RGB")))
