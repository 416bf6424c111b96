"""Edits on the built-in shapes model, read from pixels with `finetune.metrics`: inpainting by
masked latent blending, img2img at strength 0, variations, upscale, zoom out, pan and latent
interpolation, all through the batching engine (the canvases from `serve.canvas`, as the
service builds them). The figures these tests print are in docs/benchmarks.md ("Editing")."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from finetune import metrics, world
from registry.base_models import SHAPES, ensure_base_model
from serve import canvas
from serve.edits import UPSCALE_STRENGTH, VARIATION_STRENGTH
from serve.protocol import RenderJob, RowMix, SourceImage

SIZE, STEPS, GUIDANCE = 32, 20, 4.0
RED_ON_BLUE = "a red circle on a blue background"
pytestmark = pytest.mark.slow  # about 100 s of CPU (minutes on a shared 2-core box)
GREEN_SQUARE = "a green square on a blue background"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from serve.engine import DiffusionEngine

    model = ensure_base_model(SHAPES, tmp_path_factory.mktemp("models"), 1024)
    engine = DiffusionEngine.load(model, "cpu", max_batch_images=8)
    yield engine
    engine.close()


def png(image: Image.Image) -> bytes:
    return canvas.png_bytes(image)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def job(prompt: str, seeds, size: int = SIZE, **extra) -> RenderJob:
    return RenderJob(prompt, None, size, size, STEPS, GUIDANCE, tuple(seeds), **extra)


def red_circle_on_blue() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), world.PALETTE["blue"])
    ImageDraw.Draw(image).ellipse((8, 8, 23, 23), fill=world.PALETTE["red"])
    return image


def center_mask() -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle((8, 8, 23, 23), fill=255)
    return mask


def rgb_error(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """Mean absolute difference per channel (0..255) over the pixels `where` is true."""
    return float(np.abs(a - b)[where].mean())


def test_inpaint_repaints_the_mask_and_keeps_the_rest(engine):
    source, mask = red_circle_on_blue(), center_mask()
    seeds = range(8)
    edit = SourceImage(png(source), png(mask), 1.0)
    out = engine.generate(job(GREEN_SQUARE, seeds, source=edit))
    original = np.asarray(source, dtype=np.float32)
    inside = np.asarray(mask) > 0
    greens, outside_errors = 0, []
    for image in out:
        arr = pixels(image.png)
        greens += metrics.nearest_color(np.median(arr[inside], axis=0)) == "green"
        outside_errors.append(float(np.abs(arr - original)[~inside].max()))
    print(f"inpaint: center green {greens}/8, outside max error {max(outside_errors)}")
    assert greens >= 6
    # Outside the mask: the source's latents are kept through the last step, and its pixels
    # pasted back after decoding (the decoder mixes every latent into every pixel), so the
    # source comes back exactly.
    assert max(outside_errors) == 0.0


def test_strength_zero_returns_the_input_within_the_vae_round_trip(engine):
    source = red_circle_on_blue()
    out = engine.generate(job(GREEN_SQUARE, [1, 2], source=SourceImage(png(source), None, 0.0)))
    original = np.asarray(source, dtype=np.float32)
    everywhere = np.ones(original.shape[:2], dtype=bool)
    errors = [rgb_error(pixels(im.png), original, everywhere) for im in out]
    print(f"strength 0: mean error {errors} (of 255)")
    # No denoising step ran (the prompt asked for green; nothing changed): only the VAE's
    # encode-decode error remains, and the image reads as its source.
    assert max(errors) <= 6.0
    for im in out:
        assert metrics.read_image(pixels(im.png)) == metrics.Reading("blue", "red", "circle")


def _sources(engine, n: int, seed: int = 0) -> tuple[list[bytes], list[str]]:
    rng = random.Random(seed)
    combos = rng.sample(world.train_combos(), n)
    prompts = [world.caption(c) for c in combos]
    images = [engine.generate(job(p, [rng.randint(0, 10_000)]))[0].png for p in prompts]
    return images, prompts


def test_variations_keep_the_background(engine):
    sources, prompts = _sources(engine, 10)
    kept = 0
    for source, prompt in zip(sources, prompts, strict=True):
        before = metrics.read_image(pixels(source)).bg
        varied = engine.generate(
            job(prompt, [1, 2], source=SourceImage(source, None, VARIATION_STRENGTH))
        )
        kept += sum(metrics.read_image(pixels(v.png)).bg == before for v in varied)
    print(f"variations: background kept {kept}/20")
    assert kept / 20 >= 0.8


def test_upscale_keeps_the_colours(engine):
    sources, prompts = _sources(engine, 10, seed=1)
    same = 0
    for source, prompt in zip(sources, prompts, strict=True):
        up = engine.generate(
            job(prompt, [3], size=2 * SIZE, source=SourceImage(source, None, UPSCALE_STRENGTH))
        )[0]
        assert Image.open(io.BytesIO(up.png)).size == (2 * SIZE, 2 * SIZE)
        before, after = metrics.read_image(pixels(source)), metrics.read_image(pixels(up.png))
        same += (before.bg, before.fg) == (after.bg, after.fg)
    print(f"upscale: background and foreground kept {same}/10")
    assert same / 10 >= 0.9


def test_zoom_out_keeps_the_source_in_the_middle(engine):
    sources, prompts = _sources(engine, 5, seed=2)
    errors = []
    for source, prompt in zip(sources, prompts, strict=True):
        zoomed_canvas, mask = canvas.zoom_out(Image.open(io.BytesIO(source)), 2.0)
        out = engine.generate(job(prompt, [4], source=SourceImage(png(zoomed_canvas), png(mask))))
        arr = pixels(out[0].png)
        middle = np.zeros(arr.shape[:2], dtype=bool)
        middle[10:22, 10:22] = True  # inside the kept 16x16 square, 2 pixels in
        errors.append(rgb_error(arr, np.asarray(zoomed_canvas, dtype=np.float32), middle))
        # The shape, now half as large, is still the source's colour at the centre, and the
        # repainted border continues the source's background.
        read = metrics.read_image(pixels(source))
        assert metrics.nearest_color(arr[14:18, 14:18].reshape(-1, 3).mean(0)) == read.fg, prompt
        border = np.asarray(mask) > 0
        assert metrics.nearest_color(np.median(arr[border], axis=0)) == read.bg, prompt
    print(f"zoom out: middle error {errors}")
    assert max(errors) == 0.0


def test_pan_keeps_the_shifted_source(engine):
    sources, prompts = _sources(engine, 3, seed=3)
    for source, prompt in zip(sources, prompts, strict=True):
        panned, mask = canvas.pan(Image.open(io.BytesIO(source)), "left", 0.25)
        out = engine.generate(job(prompt, [5], source=SourceImage(png(panned), png(mask))))
        arr = pixels(out[0].png)
        kept = np.asarray(mask) == 0
        error = rgb_error(arr, np.asarray(panned, dtype=np.float32), kept)
        strip = np.asarray(mask) > 0
        print(f"pan: kept-area error {error:.2f}")
        assert error == 0.0
        # The new strip continues the background.
        bg = metrics.read_image(pixels(source)).bg
        assert metrics.nearest_color(np.median(arr[strip], axis=0)) == bg, prompt


def test_interpolation_moves_monotonically_to_the_to_frame(engine):
    frames = 8
    ends = [(RED_ON_BLUE, 5), ("a yellow triangle on a green background", 99)]
    mixes = tuple(
        RowMix(((ends[0][0], 1 - t), (ends[1][0], t)), ends[1][1], t)
        for t in (i / (frames - 1) for i in range(frames))
    )
    out = engine.generate(job(ends[0][0], [ends[0][1]] * frames, mixes=mixes))
    first, last = (engine.generate(job(p, [s]))[0] for p, s in ends)
    # The ends are the plain renders of `from` and `to`, exactly.
    assert np.array_equal(pixels(out[0].png), pixels(first.png))
    assert np.array_equal(pixels(out[-1].png), pixels(last.png))
    to = pixels(last.png)
    distances = [float(np.abs(pixels(f.png) - to).mean()) for f in out]
    print(f"interpolation: mean distance to `to` per frame {[round(d, 1) for d in distances]}")
    rises = [b - a for a, b in zip(distances, distances[1:], strict=False) if b > a]
    assert max(rises, default=0.0) <= 2.0  # 2/255 of tolerance per frame
    assert distances[0] > 40 and distances[-1] == 0
