"""Two brand adapters combined in one render move the pixels toward both brands: LoRAs of the
built-in model trained on the built-in `acme` (teal background, orange shape, white mark
top-right) and `globex` (purple, yellow, mark bottom-left) brands, rendered through the engine
alone, each alone, and both together, and scored with `finetune.metrics.brand_score`."""

from __future__ import annotations

import hashlib
import io
import random

import numpy as np
import pytest
from PIL import Image

from finetune import metrics, world
from finetune.train import LORA_WEIGHT_NAME
from registry.base_models import SHAPES, ensure_base_model
from serve.adapter_cache import parse_weights
from serve.protocol import AdapterSpec, RenderJob

# Trains two LoRAs (400 steps each, shared with other slow tests through `brand_lora`).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

BRANDS = ("acme", "globex")
RENDERS = 12
#: With both adapters, each brand's score (0..1) must rise this much over the base model's.
MIN_MARGIN = 0.2


def test_two_adapters_together_move_the_pixels_toward_both_brands(brand_lora, tmp_path):
    from serve.engine import DiffusionEngine

    model = ensure_base_model(SHAPES, tmp_path, 1024)
    engine = DiffusionEngine.load(model, "cpu", max_adapters=2, max_batch_images=8)
    adapters = {}
    for brand in BRANDS:
        data = (brand_lora(brand, steps=400) / LORA_WEIGHT_NAME).read_bytes()
        spec = AdapterSpec("t1", brand, 1, 1.0, hashlib.sha256(data).hexdigest(), "s3://x", brand)
        adapters[brand] = (spec, parse_weights(spec, data))
    # Scenes of every colour and shape, with neither brand's trigger word: what moves toward a
    # brand is the adapter's doing.
    rng = random.Random(0)
    prompts = [world.caption(rng.choice(world.all_combos())) for _ in range(RENDERS)]

    def scores(brands: tuple[str, ...]) -> dict[str, metrics.BrandScore]:
        specs = tuple(adapters[b][0] for b in brands)
        futures = [
            engine.submit(
                RenderJob(prompt, None, 32, 32, 20, 4.0, (100 + i,)).with_adapters(specs),
                [adapters[b][1] for b in brands],
            )
            for i, prompt in enumerate(prompts)
        ]
        images = [
            np.asarray(Image.open(io.BytesIO(f.result()[0].png)).convert("RGB")) for f in futures
        ]
        return {b: metrics.brand_score(images, b) for b in BRANDS}

    runs = {
        "base": scores(()),
        "acme": scores(("acme",)),
        "globex": scores(("globex",)),
        "both": scores(BRANDS),
    }
    engine.close()
    for name, found in runs.items():
        print(f"{name:>6}: " + ", ".join(f"{b} {s}" for b, s in found.items()))
    for brand in BRANDS:
        # Each adapter alone draws its brand (the fixture's LoRAs work) ...
        assert runs[brand][brand].score >= runs["base"][brand].score + MIN_MARGIN, brand
        # ... and both together still move the renders toward each brand.
        assert runs["both"][brand].score >= runs["base"][brand].score + MIN_MARGIN, brand
    # Together is not one of them alone: the other brand's mark shows too.
    for brand, other in (BRANDS, BRANDS[::-1]):
        assert runs["both"][other].mark > runs[brand][other].mark, (brand, other)
