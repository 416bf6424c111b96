"""The engine without Ray: deterministic pixels per seed, independent of n; PNG metadata."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from registry.base_models import TINY_RANDOM, ensure_base_model
from serve.engine import DiffusionEngine
from serve.protocol import RenderJob


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model = ensure_base_model(TINY_RANDOM, tmp_path_factory.mktemp("models"), 1024)
    return DiffusionEngine.load(model, "cpu")


def job(seeds, prompt="a red circle"):
    return RenderJob(prompt, None, 64, 64, 4, 5.0, tuple(seeds))


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_device_is_cpu_here(engine):
    assert engine.device == "cpu"


def test_same_seed_same_pixels_regardless_of_batch(engine):
    alone = engine.generate(job([42]))[0]
    batch = engine.generate(job([41, 42, 43]))
    assert [im.seed for im in batch] == [41, 42, 43]
    assert np.array_equal(pixels(alone.png), pixels(batch[1].png))
    assert not np.array_equal(pixels(batch[0].png), pixels(batch[1].png))


def test_prompt_changes_the_image(engine):
    a = engine.generate(job([1], "a red circle"))[0]
    b = engine.generate(job([1], "a blue square"))[0]
    assert not np.array_equal(pixels(a.png), pixels(b.png))


def test_png_text_chunks(engine):
    img = Image.open(io.BytesIO(engine.generate(job([9]))[0].png))
    assert img.text["prompt"] == "a red circle" and img.text["seed"] == "9"
    assert img.text["base_model"] == TINY_RANDOM and img.text["width"] == "64"
    assert "negative_prompt" not in img.text  # None values are left out
