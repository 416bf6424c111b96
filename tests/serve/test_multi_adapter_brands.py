"""Two brand adapters combined in one render change the pixels in both brands' directions: LoRAs
of the built-in model trained on the built-in `acme` and `globex` brands (`brand_lora`), each
alone and both together, through the engine, on the same prompts and seeds as the base model.

The direction is measured in pixel space: per image, the cosine between what both adapters
together change (both - base) and what each adapter alone changes (brand - base). The brand
scores (`finetune.metrics.brand_score`) are printed, not asserted: with 400-step LoRAs they do
not show both brands at once (docs/benchmarks.md, "Several adapters per render")."""

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
#: Mean cosine (over images) between the combined change and each adapter's own change.
MIN_MEAN_COSINE = 0.2


def test_two_adapters_together_change_the_pixels_in_both_brands_directions(brand_lora, tmp_path):
    from serve.engine import DiffusionEngine

    model = ensure_base_model(SHAPES, tmp_path, 1024)
    engine = DiffusionEngine.load(model, "cpu", max_adapters=2, max_batch_images=8)
    adapters = {}
    for brand in BRANDS:
        data = (brand_lora(brand, steps=400) / LORA_WEIGHT_NAME).read_bytes()
        spec = AdapterSpec("t1", brand, 1, 1.0, hashlib.sha256(data).hexdigest(), "s3://x", brand)
        adapters[brand] = (spec, parse_weights(spec, data))
    # Scenes of every colour and shape, with neither brand's trigger word: what changes is
    # the adapters' doing, and neither brand's prompt favours it.
    rng = random.Random(0)
    prompts = [world.caption(rng.choice(world.all_combos())) for _ in range(RENDERS)]

    def render(brands: tuple[str, ...]) -> np.ndarray:
        specs = tuple(adapters[b][0] for b in brands)
        futures = [
            engine.submit(
                RenderJob(prompt, None, 32, 32, 20, 4.0, (100 + i,)).with_adapters(specs),
                [adapters[b][1] for b in brands],
            )
            for i, prompt in enumerate(prompts)
        ]
        return np.stack(
            [np.asarray(Image.open(io.BytesIO(f.result()[0].png)).convert("RGB")) for f in futures]
        )

    runs = {"base": render(()), "both": render(BRANDS)}
    runs.update({brand: render((brand,)) for brand in BRANDS})
    engine.close()
    both = (runs["both"].astype(float) - runs["base"]).reshape(RENDERS, -1)
    for brand in BRANDS:
        alone = (runs[brand].astype(float) - runs["base"]).reshape(RENDERS, -1)
        cosine = (alone * both).sum(1) / (
            np.linalg.norm(alone, axis=1) * np.linalg.norm(both, axis=1)
        )
        scores = {
            name: metrics.brand_score(list(images), brand).score for name, images in runs.items()
        }
        print(
            f"{brand}: cosine(both - base, {brand} - base) mean {cosine.mean():.2f} "
            f"min {cosine.min():.2f}; brand_score "
            + ", ".join(f"{n} {s:.2f}" for n, s in scores.items())
        )
        assert cosine.mean() >= MIN_MEAN_COSINE, brand
        assert not np.array_equal(runs["both"], runs[brand])  # not one of them alone
