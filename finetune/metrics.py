"""Prompt adherence and brand adherence of shapes-world renders, read straight from pixels.

The shapes world (``finetune.world``) keeps the image border background and the image center
inside the shape, so a render can be read back without any model: background color from the
border ring, foreground color from the pixels that differ from it, shape by template matching
of the foreground mask. Only numpy and PIL are used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from finetune import world

_PALETTE_NAMES = list(world.COLORS)
_PALETTE_RGB = np.array([world.PALETTE[c] for c in _PALETTE_NAMES], dtype=np.float32)
_MARK_RGB = np.array(list(world.MARK_COLORS.values()), dtype=np.float32)
#: RGB distance beyond which a pixel no longer counts as the background color.
_FOREGROUND_DISTANCE = 60.0
#: RGB distance within which a pixel counts as a mark's color.
_MARK_DISTANCE = 100.0
#: Fraction of a mark's box that must show the mark color for the mark to count as present.
_MARK_COVERAGE = 0.5


@dataclass(frozen=True)
class Reading:
    """What a render shows, read back from its pixels (``None`` where nothing could be read)."""

    bg: str
    fg: str | None
    shape: str | None


@dataclass(frozen=True)
class Adherence:
    """Fraction of renders whose background color, foreground color and shape match the prompt."""

    bg: float
    fg: float
    shape: float
    readings: tuple[Reading, ...]

    @property
    def all(self) -> float:
        """Mean of the three rates."""
        return (self.bg + self.fg + self.shape) / 3


@dataclass(frozen=True)
class BrandScore:
    """How much renders look like a brand: palette adherence, mark presence, and their mean."""

    palette: float
    mark: float

    @property
    def score(self) -> float:
        return (self.palette + self.mark) / 2


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` float32 RGB in 0..255 from a PIL image or a uint8/float array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
    return arr * 255.0 if arr.max() <= 1.0 else arr


def nearest_color(rgb: np.ndarray) -> str:
    """Name of the palette color nearest to ``rgb``."""
    return _PALETTE_NAMES[int(np.argmin(np.linalg.norm(_PALETTE_RGB - rgb, axis=1)))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (iterative flood fill)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def _template(shape: str, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """Mask of ``shape`` drawn to fill ``box`` (x0, y0, x1, y1 inclusive), as the world draws it."""
    x0, y0, x1, y1 = box
    img = Image.new("L", size, 0)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse(box, fill=1)
    elif shape == "square":
        draw.rectangle(box, fill=1)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=1)
    return np.asarray(img, dtype=bool)


def classify_shape(mask: np.ndarray) -> str | None:
    """The world shape whose template, fitted to the mask's bounding box, overlaps it best."""
    if mask.sum() < 4:
        return None
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    size = (mask.shape[1], mask.shape[0])
    best, best_iou = None, -1.0
    for shape in world.SHAPES:
        template = _template(shape, box, size)
        iou = (template & mask).sum() / max(1, (template | mask).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def read_image(image: Image.Image | np.ndarray) -> Reading:
    """Read background color, foreground color and shape back from one render."""
    arr = _as_array(image)
    h, w, _ = arr.shape
    ring = max(1, round(min(h, w) / 16))
    border = np.concatenate(
        [
            arr[:ring].reshape(-1, 3),
            arr[-ring:].reshape(-1, 3),
            arr[:, :ring].reshape(-1, 3),
            arr[:, -ring:].reshape(-1, 3),
        ]
    )
    bg_rgb = np.median(border, axis=0)
    bg = nearest_color(bg_rgb)

    # Foreground: the largest connected region of pixels far from the background color and
    # nearer a palette color than a mark color (a brand mark is not part of the shape).
    pixels = arr.reshape(-1, 1, 3)
    to_palette = np.linalg.norm(pixels - _PALETTE_RGB, axis=2).min(axis=1)
    to_mark = np.linalg.norm(pixels - _MARK_RGB, axis=2).min(axis=1)
    not_mark = (to_palette <= to_mark).reshape(h, w)
    far = (np.linalg.norm(arr - bg_rgb, axis=2) > _FOREGROUND_DISTANCE) & not_mark
    region = _largest_component(far)
    if region.sum() < 4:
        return Reading(bg, None, None)
    fg = nearest_color(np.median(arr[region], axis=0))
    # The shape is the part of the image nearer to the foreground than to the background color.
    fg_rgb = world.PALETTE[fg]
    nearer_fg = np.linalg.norm(arr - fg_rgb, axis=2) < np.linalg.norm(arr - bg_rgb, axis=2)
    return Reading(bg, fg, classify_shape(_largest_component(nearer_fg & far)))


def prompt_adherence(
    images: Sequence[Image.Image | np.ndarray], prompts: Sequence[str]
) -> Adherence:
    """Rates at which renders show the background color, foreground color and shape asked for.

    ``prompts`` are shapes-world captions (with or without a brand trigger); chance is about
    1/7, 1/7 and 1/3 with the seven-color palette.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; pass one each")
    if not images:
        raise ValueError("no images to score")
    wanted = [world.parse_caption(p) for p in prompts]
    readings = [read_image(image) for image in images]
    n = len(images)
    return Adherence(
        bg=sum(r.bg == c.bg for r, c in zip(readings, wanted, strict=True)) / n,
        fg=sum(r.fg == c.fg for r, c in zip(readings, wanted, strict=True)) / n,
        shape=sum(r.shape == c.shape for r, c in zip(readings, wanted, strict=True)) / n,
        readings=tuple(readings),
    )


def mark_present(image: Image.Image | np.ndarray, mark: world.Mark) -> bool:
    """Whether ``mark`` (its color, filling its corner box) shows in the render."""
    arr = _as_array(image)
    x0, y0, x1, y1 = world.mark_box(mark.corner, arr.shape[0])
    # Score the inner part of the box: edges of a small mark blur at low resolution.
    inset = max(0, (x1 - x0) // 5)
    patch = arr[y0 + inset : y1 - inset, x0 + inset : x1 - inset].reshape(-1, 3)
    close = np.linalg.norm(patch - np.array(world.color_rgb(mark.color)), axis=1) < _MARK_DISTANCE
    return bool(close.mean() >= _MARK_COVERAGE)


def brand_score(images: Sequence[Image.Image | np.ndarray], brand: world.Brand | str) -> BrandScore:
    """Palette adherence (background and foreground in the brand's colors, half each) and mark
    presence, each a fraction of ``images``; ``.score`` is their mean."""
    brand = world.get_brand(brand)
    if not images:
        raise ValueError("no images to score")
    palette = marks = 0.0
    for image in images:
        reading = read_image(image)
        palette += 0.5 * (reading.bg in brand.backgrounds) + 0.5 * (reading.fg in brand.foregrounds)
        marks += mark_present(image, brand.mark)
    return BrandScore(palette=palette / len(images), mark=marks / len(images))
