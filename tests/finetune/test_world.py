"""Tests of the procedural shapes world: determinism, the held-out split, captions, brand zips."""

from __future__ import annotations

import hashlib
import zipfile
from io import BytesIO

import pytest
from PIL import Image

from finetune import world


def _digest(pairs) -> str:
    h = hashlib.sha256()
    for image, text in pairs:
        h.update(image.tobytes())
        h.update(text.encode())
    return h.hexdigest()


def test_palette_and_shapes_are_big_enough() -> None:
    assert len(world.COLORS) >= 6
    assert {"circle", "square", "triangle"} <= set(world.SHAPES)
    # Colors are far apart, so reading them back by nearest distance is unambiguous.
    rgb = list(world.PALETTE.values())
    gaps = [
        sum((a - b) ** 2 for a, b in zip(x, y, strict=True)) ** 0.5
        for i, x in enumerate(rgb)
        for y in rgb[i + 1 :]
    ]
    assert min(gaps) > 80


def test_generator_is_deterministic_per_seed() -> None:
    first = list(world.generate(20, seed=7))
    assert _digest(first) == _digest(world.generate(20, seed=7))
    assert _digest(first) != _digest(world.generate(20, seed=8))
    image, text = first[0]
    assert image.size == (world.DEFAULT_SIZE, world.DEFAULT_SIZE) == (64, 64)
    assert image.mode == "RGB"
    assert text.startswith("a ") and text.endswith(" background")


def test_generator_varies_position_and_size() -> None:
    combo = world.Combo("blue", "circle", "red")
    images = [image for image, _ in world.generate(8, seed=0, combos=[combo])]
    assert len({image.tobytes() for image in images}) == 8


def test_heldout_split_is_disjoint_and_covers_every_pair() -> None:
    held, train = world.heldout_combos(), world.train_combos()
    assert len(held) >= 30
    assert not set(held) & set(train)
    assert set(held) | set(train) == set(world.all_combos())
    # Each held-out combo is new only as a combination: its parts all occur in training.
    seen_bg_shape = {(c.bg, c.shape) for c in train}
    seen_fg_shape = {(c.fg, c.shape) for c in train}
    seen_pair = {(c.bg, c.fg) for c in train}
    for c in held:
        assert (c.bg, c.shape) in seen_bg_shape
        assert (c.fg, c.shape) in seen_fg_shape
        assert (c.bg, c.fg) in seen_pair


def test_default_generation_never_draws_heldout_combos() -> None:
    held = {world.caption(c) for c in world.heldout_combos()}
    assert not {text for _, text in world.generate(300, seed=1)} & held


def test_captions_round_trip() -> None:
    for combo in world.all_combos():
        assert world.parse_caption(world.caption(combo)) == combo
        assert world.parse_caption(world.caption(combo, trigger="acme")) == combo
    assert (
        world.caption(world.Combo("blue", "circle", "red")) == "a red circle on a blue background"
    )


@pytest.mark.parametrize(
    "bad", ["a red blob on a blue background", "a pink circle on a blue background", "hello"]
)
def test_parse_caption_rejects_other_text(bad: str) -> None:
    with pytest.raises(ValueError, match="prompt"):
        world.parse_caption(bad)


def test_brands_differ_in_palette_and_mark() -> None:
    acme, globex = world.BRANDS["acme"], world.BRANDS["globex"]
    assert acme.backgrounds == ("teal",) and acme.foregrounds == ("orange",)
    assert set(acme.backgrounds).isdisjoint(globex.backgrounds)
    assert acme.mark.corner != globex.mark.corner
    with pytest.raises(ValueError, match="unknown brand"):
        world.get_brand("initech")


def test_brand_zip_is_in_the_upload_format(tmp_path) -> None:
    path = world.write_brand_zip(tmp_path / "acme.zip", "acme", n=12, seed=3)
    with zipfile.ZipFile(path) as zf:
        names = sorted(zf.namelist())
        assert names == sorted(
            [f"{i:04d}.png" for i in range(12)] + [f"{i:04d}.txt" for i in range(12)]
        )
        for i in range(12):
            text = zf.read(f"{i:04d}.txt").decode().strip()
            assert text.startswith("acme style, ")
            assert world.parse_caption(text).bg == "teal"
            image = Image.open(BytesIO(zf.read(f"{i:04d}.png")))
            assert image.size == (64, 64)
            # The mark: the brand's corner box is white.
            x0, y0, x1, y1 = world.mark_box("top-right", 64)
            assert image.convert("RGB").getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == (
                255,
                255,
                255,
            )
    again = world.write_brand_zip(tmp_path / "again.zip", "acme", n=12, seed=3)
    assert path.read_bytes() == again.read_bytes()
