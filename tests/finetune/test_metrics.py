"""Tests of the pixel metrics: near perfect on generator images, near chance on noise."""

from __future__ import annotations

import numpy as np
import pytest

from finetune import metrics, world


@pytest.mark.parametrize("size", [32, 64])
def test_prompt_adherence_is_perfect_on_generator_images(size: int) -> None:
    pairs = list(world.generate(210, seed=11, combos=world.all_combos(), size=size))
    result = metrics.prompt_adherence([i for i, _ in pairs], [t for _, t in pairs])
    assert (result.bg, result.fg, result.shape) == (1.0, 1.0, 1.0)


def test_prompt_adherence_is_near_chance_on_noise() -> None:
    rng = np.random.default_rng(0)
    prompts = [world.caption(c) for c in world.all_combos()]
    noise = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in prompts]
    result = metrics.prompt_adherence(noise, prompts)
    chance_color, chance_shape = 1 / len(world.COLORS), 1 / len(world.SHAPES)
    assert result.bg <= chance_color + 0.1
    assert result.fg <= chance_color + 0.1
    assert result.shape <= chance_shape + 0.15


def test_prompt_adherence_notices_the_wrong_prompt() -> None:
    pairs = list(world.generate(60, seed=2, combos=world.all_combos(), size=32))
    swapped = [
        world.caption(world.Combo(c.fg, c.shape, c.bg))
        for c in (world.parse_caption(t) for _, t in pairs)
    ]
    result = metrics.prompt_adherence([i for i, _ in pairs], swapped)
    assert result.bg == 0.0 and result.fg == 0.0 and result.shape == 1.0


def test_prompt_adherence_needs_one_prompt_per_image() -> None:
    with pytest.raises(ValueError, match="prompts"):
        metrics.prompt_adherence([np.zeros((32, 32, 3), np.uint8)], [])


@pytest.mark.parametrize("size", [32, 64])
def test_brand_score_reads_palette_and_mark(size: int) -> None:
    acme = [i for i, _ in world.generate_brand("acme", 30, seed=0, size=size)]
    globex = [i for i, _ in world.generate_brand("globex", 30, seed=0, size=size)]
    plain = [
        i for i, _ in world.generate(30, seed=0, combos=world.BRANDS["acme"].combos(), size=size)
    ]
    assert metrics.brand_score(acme, "acme") == metrics.BrandScore(palette=1.0, mark=1.0)
    assert metrics.brand_score(globex, "acme").score == 0.0
    # Right palette, no mark: half the score.
    assert metrics.brand_score(plain, "acme") == metrics.BrandScore(palette=1.0, mark=0.0)


def test_brand_score_is_low_on_noise() -> None:
    rng = np.random.default_rng(1)
    noise = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(40)]
    for brand in world.BRANDS:
        result = metrics.brand_score(noise, brand)
        assert result.mark == 0.0
        assert result.score <= 0.3
