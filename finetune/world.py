"""The procedural shapes world: palette, seeded captioned-image generator, held-out split, brands.

Everything the built-in base model is trained on, and every brand dataset the tests upload,
comes from here, so a render can be checked against its prompt by reading pixels
(see ``finetune.metrics``).
"""

from __future__ import annotations

import random
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from itertools import product
from pathlib import Path

from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

#: The named colors shapes and backgrounds are drawn in. Far apart in RGB so a render's colors
#: can be read back by nearest-palette distance.
PALETTE: dict[str, RGB] = {
    "red": (220, 30, 40),
    "orange": (250, 140, 20),
    "yellow": (245, 225, 40),
    "green": (40, 170, 60),
    "teal": (0, 130, 130),
    "blue": (40, 70, 210),
    "purple": (130, 40, 160),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Colors that only marks use (never a shape or background of the base world).
MARK_COLORS: dict[str, RGB] = {"white": (255, 255, 255)}
CORNERS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")

#: Native render size of the generator, in pixels.
DEFAULT_SIZE = 64

# Geometry, as fractions of the image side. The shape always covers the image center and the
# border ring is background, which is what ``finetune.metrics`` relies on.
_HALF_SIZE_RANGE = (0.24, 0.34)
_CENTER_JITTER = 0.07
_MARK_SIZE = 0.22
_MARK_MARGIN = 0.06
_SUPERSAMPLE = 4

_CAPTION_RE = re.compile(
    r"(?:(?P<trigger>[a-z0-9_-]+) style, )?a (?P<fg>[a-z]+) (?P<shape>[a-z]+) "
    r"on a (?P<bg>[a-z]+) background"
)


@dataclass(frozen=True)
class Combo:
    """What a caption asks for: a shape of one color on a background of another."""

    bg: str
    shape: str
    fg: str


@dataclass(frozen=True)
class Mark:
    """A brand's signature: a small filled square of one color in one corner."""

    corner: str
    color: str = "white"


@dataclass(frozen=True)
class Scene:
    """One fully specified image: the combo plus the exact geometry and an optional mark."""

    combo: Combo
    cx: float
    cy: float
    half: float
    mark: Mark | None = None


@dataclass(frozen=True)
class Brand:
    """A tenant brand of the shapes world: a trigger word, a palette and a mark."""

    name: str
    trigger: str
    backgrounds: tuple[str, ...]
    foregrounds: tuple[str, ...]
    mark: Mark

    def combos(self) -> list[Combo]:
        """Every combo the brand draws."""
        return [
            Combo(bg, shape, fg)
            for bg, shape, fg in product(self.backgrounds, SHAPES, self.foregrounds)
            if bg != fg
        ]


BRANDS: dict[str, Brand] = {
    "acme": Brand("acme", "acme", ("teal",), ("orange",), Mark("top-right")),
    "globex": Brand("globex", "globex", ("purple",), ("yellow",), Mark("bottom-left")),
}


def all_combos() -> list[Combo]:
    """Every (background, shape, foreground) combo with different fore- and background colors."""
    return [Combo(bg, s, fg) for bg, s, fg in product(COLORS, SHAPES, COLORS) if bg != fg]


def heldout_combos() -> list[Combo]:
    """The combos the base model never sees in training (one shape per color pair, 42 in all).

    For every ordered (background, foreground) pair exactly one shape is held out, chosen so that
    every (background, shape) and (foreground, shape) pair still occurs in training.
    """
    held = []
    for i, bg in enumerate(COLORS):
        for j, fg in enumerate(COLORS):
            if bg != fg:
                held.append(Combo(bg, SHAPES[(i + 2 * j) % len(SHAPES)], fg))
    return held


def train_combos() -> list[Combo]:
    """The combos the base model is trained on: all combos minus ``heldout_combos()``."""
    held = set(heldout_combos())
    return [c for c in all_combos() if c not in held]


def caption(combo: Combo, trigger: str | None = None) -> str:
    """Plain-English caption, e.g. ``"a red circle on a blue background"``."""
    text = f"a {combo.fg} {combo.shape} on a {combo.bg} background"
    return f"{trigger} style, {text}" if trigger else text


def parse_caption(text: str) -> Combo:
    """The combo a caption or prompt asks for; raises ``ValueError`` if it is not one of ours."""
    m = _CAPTION_RE.search(text.strip().lower())
    if m is None:
        raise ValueError(
            f"prompt {text!r} is not a shapes-world caption "
            "('[<trigger> style, ]a <color> <shape> on a <color> background')"
        )
    combo = Combo(m["bg"], m["shape"], m["fg"])
    for field, value, allowed in (
        ("background color", combo.bg, COLORS),
        ("shape", combo.shape, SHAPES),
        ("foreground color", combo.fg, COLORS),
    ):
        if value not in allowed:
            raise ValueError(f"prompt {text!r}: {field} {value!r} is not one of {allowed}")
    return combo


def sample_scene(rng: random.Random, combo: Combo, mark: Mark | None = None) -> Scene:
    """Draw the geometry of one image of ``combo`` from ``rng``."""
    return Scene(
        combo=combo,
        cx=0.5 + rng.uniform(-_CENTER_JITTER, _CENTER_JITTER),
        cy=0.5 + rng.uniform(-_CENTER_JITTER, _CENTER_JITTER),
        half=rng.uniform(*_HALF_SIZE_RANGE),
        mark=mark,
    )


def mark_box(corner: str, size: int) -> tuple[int, int, int, int]:
    """Pixel box ``(x0, y0, x1, y1)`` (exclusive ends) a mark occupies in an image of ``size``."""
    if corner not in CORNERS:
        raise ValueError(f"corner {corner!r} is not one of {CORNERS}")
    side = round(_MARK_SIZE * size)
    margin = round(_MARK_MARGIN * size)
    x0 = size - margin - side if corner.endswith("right") else margin
    y0 = size - margin - side if corner.startswith("bottom") else margin
    return x0, y0, x0 + side, y0 + side


def color_rgb(name: str) -> RGB:
    """RGB of a palette or mark color name."""
    if name in PALETTE:
        return PALETTE[name]
    if name in MARK_COLORS:
        return MARK_COLORS[name]
    raise ValueError(f"unknown color {name!r}; known: {COLORS + tuple(MARK_COLORS)}")


def render(scene: Scene, size: int = DEFAULT_SIZE) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``size`` x ``size`` (antialiased by supersampling)."""
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), color_rgb(scene.combo.bg))
    draw = ImageDraw.Draw(img)
    fg = color_rgb(scene.combo.fg)
    cx, cy, h = scene.cx * big, scene.cy * big, scene.half * big
    if scene.combo.shape == "circle":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fg)
    elif scene.combo.shape == "square":
        s = 0.9 * h  # a square a little smaller than its circle, so areas are comparable
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fg)
    elif scene.combo.shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fg)
    else:
        raise ValueError(f"shape {scene.combo.shape!r} is not one of {SHAPES}")
    image = img.resize((size, size), Image.Resampling.BOX)
    if scene.mark is not None:
        # Drawn at the target resolution so the mark has crisp edges at every size.
        x0, y0, x1, y1 = mark_box(scene.mark.corner, size)
        ImageDraw.Draw(image).rectangle((x0, y0, x1 - 1, y1 - 1), fill=color_rgb(scene.mark.color))
    return image


def generate(
    n: int, seed: int, combos: list[Combo] | None = None, size: int = DEFAULT_SIZE
) -> Iterator[tuple[Image.Image, str]]:
    """Yield ``n`` seeded (image, caption) pairs cycling through a shuffled ``combos`` list.

    ``combos`` defaults to ``train_combos()``; the same arguments always give the same images.
    """
    combos = list(train_combos() if combos is None else combos)
    if not combos:
        raise ValueError("combos is empty; pass at least one Combo")
    rng = random.Random(seed)
    order: list[Combo] = []
    for _ in range(n):
        if not order:
            order = combos[:]
            rng.shuffle(order)
        combo = order.pop()
        yield render(sample_scene(rng, combo), size), caption(combo)


def generate_brand(
    brand: Brand | str, n: int, seed: int, size: int = DEFAULT_SIZE
) -> Iterator[tuple[Image.Image, str]]:
    """Yield ``n`` seeded (image, caption) pairs of ``brand``: its palette, mark and trigger."""
    brand = get_brand(brand)
    combos = brand.combos()
    rng = random.Random(seed)
    for i in range(n):
        combo = combos[i % len(combos)] if i < len(combos) else rng.choice(combos)
        scene = sample_scene(rng, combo, brand.mark)
        yield render(scene, size), caption(combo, brand.trigger)


def get_brand(brand: Brand | str) -> Brand:
    """The ``Brand`` itself, or the built-in brand of that name."""
    if isinstance(brand, Brand):
        return brand
    if brand not in BRANDS:
        raise ValueError(f"unknown brand {brand!r}; built-in brands: {sorted(BRANDS)}")
    return BRANDS[brand]


def write_brand_zip(
    path: str | Path, brand: Brand | str, n: int, seed: int, size: int = DEFAULT_SIZE
) -> Path:
    """Write a brand dataset in the tenant upload format: ``NNNN.png`` + same-name ``NNNN.txt``.

    Captions carry the brand's trigger word, e.g. ``"acme style, a orange circle on a teal
    background"``. Returns the path written.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i, (image, text) in enumerate(generate_brand(brand, n, seed, size)):
            buf = BytesIO()
            image.save(buf, format="PNG")
            # A fixed timestamp keeps the archive byte-identical for the same seed.
            zf.writestr(zipfile.ZipInfo(f"{i:04d}.png", (2020, 1, 1, 0, 0, 0)), buf.getvalue())
            zf.writestr(zipfile.ZipInfo(f"{i:04d}.txt", (2020, 1, 1, 0, 0, 0)), text + "\n")
    return path


def vocabulary() -> list[str]:
    """Every word a base-world caption uses, in a fixed order (the tokenizer's whole words)."""
    words = ["a", "on", "background", "style", ","]
    return words + list(COLORS) + list(SHAPES)
