"""Edits with a brand adapter show the brand: a LoRA of the built-in model trained on the
built-in `acme` brand (teal backgrounds, orange shapes, a white mark top-right) is applied to
img2img edits through the engine, and the edits' brand score (``finetune.metrics``) is compared
with the same edits on the base model."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from finetune import metrics, world
from finetune.train import LORA_WEIGHT_NAME
from registry.base_models import SHAPES, ensure_base_model
from serve.adapter_cache import parse_weights
from serve.protocol import AdapterSpec, RenderJob, SourceImage

# Trains a LoRA: 400 steps, about a minute on two idle cores, but it ran past the default 900 s
# timeout on this session's overloaded box (load average 16 on 2 cores).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

BRAND = "acme"
EDITS = 12
#: The adapter must raise the edits' brand score (0..1) by this much over the base model's.
MIN_MARGIN = 0.3


@pytest.fixture(scope="module")
def brand_adapter(brand_lora) -> bytes:
    return (brand_lora(BRAND, steps=400) / LORA_WEIGHT_NAME).read_bytes()


def test_edits_with_the_brand_adapter_show_the_brand(brand_adapter, tmp_path):
    from serve.engine import DiffusionEngine

    model = ensure_base_model(SHAPES, tmp_path, 1024)
    engine = DiffusionEngine.load(model, "cpu", max_batch_images=4)
    spec = AdapterSpec(
        "t1", BRAND, 1, 1.0, hashlib.sha256(brand_adapter).hexdigest(), "s3://x", BRAND
    )
    weights = parse_weights(spec, brand_adapter)
    brand = world.get_brand(BRAND)
    combos = brand.combos()
    # Sources: plain renders of other colours; the edits ask for the brand in its own words.
    sources = [
        engine.generate(
            RenderJob("a red circle on a blue background", None, 32, 32, 20, 4.0, (s,))
        )[0].png
        for s in range(EDITS)
    ]
    prompts = [world.caption(combos[i % len(combos)], brand.trigger) for i in range(EDITS)]

    def edits(adapter: AdapterSpec | None) -> list[np.ndarray]:
        out = []
        for source, prompt in zip(sources, prompts, strict=True):
            job = RenderJob(
                prompt, None, 32, 32, 20, 4.0, (7,), adapter, source=SourceImage(source, None, 0.9)
            )
            png = engine.generate(job, weights if adapter else None)[0].png
            out.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
        return out

    base = metrics.brand_score(edits(None), brand)
    branded = metrics.brand_score(edits(spec), brand)
    engine.close()
    print(f"edits, brand_score {BRAND}: base {base} -> adapter {branded}")
    assert branded.score >= base.score + MIN_MARGIN
    assert branded.palette >= 0.7
