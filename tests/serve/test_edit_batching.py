"""Edit rows batch with generation rows in one engine (one pipeline, one copy of the weights):
an edit's pixels do not depend on its batch-mates, whatever they are (a generation, a brand
adapter, another edit at another strength), and a strength-0 edit leaves without a step."""

from __future__ import annotations

import dataclasses
import hashlib
import io
from concurrent.futures import Future

import numpy as np
import pytest
from PIL import Image, ImageDraw

from finetune import world
from finetune.synthetic_lora import random_lora_bytes
from registry.base_models import SHAPES, ensure_base_model, load_pipeline
from serve import canvas
from serve.adapter_cache import parse_weights
from serve.protocol import AdapterSpec, RenderJob, RowMix, SourceImage

PROMPT = "a green square on a blue background"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from serve.engine import DiffusionEngine

    model = ensure_base_model(SHAPES, tmp_path_factory.mktemp("models"), 1024)
    data = random_lora_bytes(load_pipeline(model, "cpu").unet, seed=0)
    spec = AdapterSpec("t1", "b0", 1, 1.0, hashlib.sha256(data).hexdigest(), "s3://x", "b0")
    engine = DiffusionEngine.load(model, "cpu", max_batch_images=4, batch_wait_s=2.0)
    yield engine, spec, parse_weights(spec, data)
    engine.close()


def source() -> SourceImage:
    image = Image.new("RGB", (32, 32), world.PALETTE["blue"])
    ImageDraw.Draw(image).ellipse((8, 8, 23, 23), fill=world.PALETTE["red"])
    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).rectangle((8, 8, 23, 23), fill=255)
    return SourceImage(canvas.png_bytes(image), canvas.png_bytes(mask), 0.8)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_edit_pixels_do_not_depend_on_batch_mates(parts):
    engine, spec, weights = parts
    edit = RenderJob(PROMPT, None, 32, 32, 5, 4.0, (7,), source=source())
    plain = RenderJob(PROMPT, None, 32, 32, 5, 4.0, (1,))
    branded = dataclasses.replace(plain, seeds=(2,), adapter=spec)
    img2img = dataclasses.replace(edit, seeds=(3,), source=SourceImage(source().png, None, 0.5))
    mixed = dataclasses.replace(
        plain, seeds=(4,), mixes=(RowMix(((PROMPT, 0.5), ("a red circle", 0.5)), 9, 0.5),)
    )
    solo = {
        name: engine.generate(j, weights if j.adapter else None)[0].png
        for name, j in [("edit", edit), ("img2img", img2img), ("mixed", mixed)]
    }
    largest = engine.stats.largest_batch
    futures: dict[str, Future] = {
        "edit": engine.submit(edit),
        "plain": engine.submit(plain),
        "branded": engine.submit(branded, weights),
        "img2img": engine.submit(img2img),
    }
    together = {name: f.result()[0].png for name, f in futures.items()}
    assert engine.stats.largest_batch == 4 > largest
    for name in ("edit", "img2img"):
        assert np.array_equal(pixels(solo[name]), pixels(together[name])), name
    with_mix = engine.submit(mixed), engine.submit(edit)
    assert np.array_equal(pixels(with_mix[0].result()[0].png), pixels(solo["mixed"]))
    assert np.array_equal(pixels(with_mix[1].result()[0].png), pixels(solo["edit"]))


def test_strength_zero_leaves_without_a_step(parts):
    engine, _, _ = parts
    steps = engine.stats.steps
    job = RenderJob(
        PROMPT, None, 32, 32, 5, 4.0, (1, 2), source=SourceImage(source().png, None, 0.0)
    )
    out = engine.generate(job)
    assert engine.stats.steps == steps and len(out) == 2
    assert Image.open(io.BytesIO(out[0].png)).text["strength"] == "0.0"


def parameter_bytes() -> int:
    """Bytes of every live torch Parameter in the process (a second pipeline or an inpainting
    UNet would add its weights here)."""
    import gc

    import torch

    params = {id(o): o for o in gc.get_objects() if isinstance(o, torch.nn.Parameter)}
    return sum(p.numel() * p.element_size() for p in params.values())


def test_edits_load_no_second_copy_of_the_weights(parts):
    engine, _, _ = parts
    components = {
        name: id(getattr(engine.pipeline, name)) for name in ("unet", "vae", "text_encoder")
    }
    before = parameter_bytes()
    engine.generate(RenderJob(PROMPT, None, 32, 32, 3, 4.0, (1, 2), source=source()))
    # An upscale: the 32x32 source's latents enlarged for a 64x64 row.
    engine.generate(RenderJob(PROMPT, None, 64, 64, 3, 4.0, (3,), source=SourceImage(source().png)))
    assert parameter_bytes() == before
    assert {name: id(getattr(engine.pipeline, name)) for name in components} == components
