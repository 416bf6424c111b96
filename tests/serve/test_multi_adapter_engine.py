"""Several adapters in one render, through the batching engine without Ray: a combined row's
pixels do not depend on its batch-mates or on the order the adapters were listed in; the
combination is the standard LoRA sum (diffusers' `set_adapters` with several adapters); an
adapter at scale 0 adds nothing; slots bound what one row may combine."""

from __future__ import annotations

import dataclasses
import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from finetune.synthetic_lora import random_lora_bytes
from registry.base_models import SHAPES, ensure_base_model, load_pipeline
from serve.adapter_cache import AdapterWeights, parse_weights
from serve.engine import DiffusionEngine
from serve.protocol import AdapterSpec, RenderJob

BRANDS = ("b0", "b1", "b2")
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ensure_base_model(SHAPES, tmp_path_factory.mktemp("models"), 1024)


@pytest.fixture(scope="module")
def adapters(model) -> dict[str, tuple[AdapterSpec, AdapterWeights]]:
    unet = load_pipeline(model, "cpu").unet
    out = {}
    for i, brand in enumerate(BRANDS):
        data = random_lora_bytes(unet, seed=10 + i)
        spec = AdapterSpec("t1", brand, 1, 1.0, hashlib.sha256(data).hexdigest(), "s3://x", brand)
        out[brand] = (spec, parse_weights(spec, data))
    return out


def job(adapters, mix: tuple[tuple[str, float], ...], seed: int, steps: int = 6) -> RenderJob:
    """A render combining `mix`: (brand, scale) pairs, in the order a request lists them."""
    specs = tuple(dataclasses.replace(adapters[b][0], scale=s) for b, s in mix)
    return RenderJob(PROMPT, None, 32, 32, steps, 4.0, (seed,)).with_adapters(specs)


def weights(adapters, mix) -> list[AdapterWeights]:
    return [adapters[b][1] for b, _ in mix]


def px(images) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(images[0].png)).convert("RGB")).astype(int)


def render(engine: DiffusionEngine, adapters, mix, seed: int = 1) -> np.ndarray:
    return px(engine.generate(job(adapters, mix, seed), weights(adapters, mix)))


#: Rows with two or three adapters, one, and none, at different scales.
WORK = [
    ((("b0", 1.0), ("b1", 0.5)), 1),
    ((("b1", 0.8), ("b2", 1.0)), 2),
    ((("b0", 0.7), ("b1", 0.7), ("b2", 0.7)), 3),
    ((("b1", 0.5),), 1),
    ((), 1),
    ((("b0", 1.0), ("b1", 0.5)), 4),
]


def test_a_combined_row_does_not_depend_on_its_batch_mates(model, adapters):
    engine = DiffusionEngine.load(model, "cpu", max_adapters=3, max_batch_images=4)
    solo = [render(engine, adapters, mix, seed) for mix, seed in WORK]
    assert engine.stats.largest_batch == 1
    futures = [
        engine.submit(job(adapters, mix, seed), weights(adapters, mix)) for mix, seed in WORK
    ]
    batched = [px(f.result()) for f in futures]
    assert engine.stats.largest_batch == 4
    assert len({image.tobytes() for image in solo}) == len(WORK)  # all differ
    worst = max(int(np.abs(b - s).max()) for b, s in zip(batched, solo, strict=True))
    print(f"combined rows, solo vs batched: max difference {worst}/255")
    assert worst == 0


@pytest.mark.parametrize("batch", [1, 4])
def test_the_order_adapters_are_listed_in_does_not_change_the_pixels(model, adapters, batch):
    engine = DiffusionEngine.load(model, "cpu", max_adapters=3, max_batch_images=batch)
    mix = (("b2", 0.6), ("b0", 1.0), ("b1", 1.3))
    orders = [mix, mix[::-1], (mix[1], mix[2], mix[0])]
    images = [render(engine, adapters, order, seed=5) for order in orders]
    worst = max(int(np.abs(image - images[0]).max()) for image in images)
    print(f"adapters listed in 3 orders, batch {batch}: max difference {worst}/255")
    assert worst == 0  # the deltas add up in model-id order, whatever the request's order


def test_combining_is_diffusers_multi_adapter_sum(model, adapters):
    """One image at a time, a combined row renders what diffusers renders with the same
    adapters active at the same scales (`set_adapters`): the standard sum of LoRA deltas."""
    import torch

    engine = DiffusionEngine.load(model, "cpu", max_adapters=3, max_batch_images=1)
    mix = (("b1", 0.5), ("b0", 1.2))
    ours = render(engine, adapters, mix, seed=11)
    pipe = engine.pipeline
    ordered = sorted(mix, key=lambda m: adapters[m[0]][0].model_id)
    pipe.set_adapters(
        [engine.slots.slot_name(adapters[b][0].model_id) for b, _ in ordered],
        [s for _, s in ordered],
    )
    out = pipe(
        prompt=PROMPT,
        width=32,
        height=32,
        num_inference_steps=6,
        guidance_scale=4.0,
        generator=torch.Generator("cpu").manual_seed(11),
    ).images[0]
    assert np.array_equal(ours, np.asarray(out.convert("RGB")).astype(int))
    alone = [render(engine, adapters, (m,), seed=11) for m in mix]
    assert all(not np.array_equal(ours, a) for a in alone)


def test_an_adapter_at_scale_zero_adds_nothing(model, adapters):
    engine = DiffusionEngine.load(model, "cpu", max_adapters=2, max_batch_images=4)
    alone = engine.submit(job(adapters, (("b0", 1.0),), 9), weights(adapters, (("b0", 1.0),)))
    mix = (("b0", 1.0), ("b2", 0.0))
    with_zero = engine.submit(job(adapters, mix, 9), weights(adapters, mix))
    assert np.array_equal(px(alone.result()), px(with_zero.result()))


def test_more_adapters_than_slots_is_refused_and_weights_must_match(model, adapters):
    engine = DiffusionEngine.load(model, "cpu", max_adapters=2, max_batch_images=4)
    three = (("b0", 1.0), ("b1", 1.0), ("b2", 1.0))
    with pytest.raises(ValueError, match="3 adapters"):
        engine.submit(job(adapters, three, 1), weights(adapters, three))
    two = three[:2]
    with pytest.raises(ValueError, match="2 adapters"):
        engine.submit(job(adapters, two, 1), weights(adapters, two)[:1])
    with pytest.raises(ValueError, match="given for"):
        engine.submit(job(adapters, two, 1), weights(adapters, two)[::-1])
    assert engine.rows() == (0, 0)
    # Rows pinning both slots leave nothing pinned behind them.
    engine.generate(job(adapters, two, 1), weights(adapters, two))
    assert not any(engine.slots.pinned(adapters[b][0].model_id) for b in BRANDS)
