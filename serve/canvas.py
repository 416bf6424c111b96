"""Images a client sends for an edit, checked before any work, and the canvases of the
operations on a stored render (zoom out, pan). PIL only: the ingress runs this, not the engine.

An upload must be PNG, JPEG or WebP, within a byte and a pixel limit (checked on the header,
before decoding, so a decompression bomb is refused without being inflated), and decode fully.
A mask follows OpenAI: alpha 0 marks the area to repaint; a single gray channel (white =
repaint) is accepted too. Everything leaves as PNG bytes the engine reads: the image RGB, the
mask grayscale with 255 where to repaint.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from serve.errors import InvalidField

FORMATS = ("PNG", "JPEG", "WEBP")
#: Where a pan moves the canvas, as (dx, dy) signs: "left" reveals new content on the left.
PAN_DIRECTIONS = {"left": (1, 0), "right": (-1, 0), "up": (0, 1), "down": (0, -1)}


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int
    max_pixels: int


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def decode_upload(field: str, data: bytes, limits: UploadLimits) -> Image.Image:
    """The upload as a loaded PIL image, or a 400 naming `field` and the limit it broke."""
    if not data:
        raise InvalidField(field, f"{field} is empty; send a PNG, JPEG or WebP image")
    if len(data) > limits.max_bytes:
        raise InvalidField(
            field,
            f"{field} is {len(data)} bytes; the limit is {limits.max_bytes} bytes "
            "(edit_max_image_bytes)",
        )
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS and raises above twice that: both are refusals.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in FORMATS:
                raise InvalidField(
                    field,
                    f"{field} is {image.format or 'an unknown format'}; send PNG, JPEG or WebP",
                )
            width, height = image.size
            if width * height > limits.max_pixels:
                raise InvalidField(
                    field,
                    f"{field} is {width}x{height} = {width * height} pixels; the limit is "
                    f"{limits.max_pixels} pixels (edit_max_image_pixels)",
                )
            image.load()
            image = ImageOps.exif_transpose(image)
            # Modes PIL cannot turn into RGB (or alpha) are refused here, not at render time.
            image.convert("RGBA")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidField(
            field,
            f"{field} is a decompression bomb (over PIL's limit of {Image.MAX_IMAGE_PIXELS} "
            f"pixels): {e}",
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as e:
        raise InvalidField(
            field, f"{field} could not be decoded as a PNG, JPEG or WebP image ({e})"
        ) from None
    return image


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def repaint_mask(field: str, mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A mask upload as grayscale, 255 = repaint: alpha 0 (OpenAI) or a white gray channel."""
    if mask.size != size:
        raise InvalidField(
            field,
            f"{field} is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]}; "
            "they must be the same size",
        )
    if _has_alpha(mask):
        alpha = mask.convert("RGBA").getchannel("A")
        return alpha.point(lambda a: 255 if a == 0 else 0)
    if mask.mode in ("L", "1", "I;16", "I", "F"):
        return mask.convert("L").point(lambda v: 255 if v >= 128 else 0)
    raise InvalidField(
        field,
        f"{field} has mode {mask.mode} with neither an alpha channel nor a single gray "
        "channel; send a PNG whose alpha is 0 where to repaint, or a grayscale one (white = "
        "repaint)",
    )


def alpha_mask(image: Image.Image) -> Image.Image | None:
    """OpenAI's edit without a mask: the image's own transparent pixels, if it has any."""
    if not _has_alpha(image):
        return None
    alpha = image.convert("RGBA").getchannel("A")
    if alpha.getextrema()[0] > 0:
        return None
    return alpha.point(lambda a: 255 if a == 0 else 0)


def fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The image as RGB at the render size (a smooth resize)."""
    rgb = image.convert("RGB")
    return rgb if rgb.size == size else rgb.resize(size, Image.Resampling.BICUBIC)


def fit_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    return mask if mask.size == size else mask.resize(size, Image.Resampling.NEAREST)


def zoom_out(image: Image.Image, factor: float) -> tuple[Image.Image, Image.Image]:
    """Midjourney's zoom out at the same size: the source shrunk by `factor` in the middle of
    the canvas, the border around it to repaint. The border starts as the source's edge
    colours stretched outward, so the noised start is not a hard frame."""
    width, height = image.size
    inner = (max(1, round(width / factor)), max(1, round(height / factor)))
    small = image.convert("RGB").resize(inner, Image.Resampling.LANCZOS)
    left, top = (width - inner[0]) // 2, (height - inner[1]) // 2
    canvas = ImageOps.expand(small, (left, top, width - inner[0] - left, height - inner[1] - top))
    canvas = _stretch_edges(canvas, (left, top, left + inner[0], top + inner[1]))
    mask = Image.new("L", (width, height), 255)
    mask.paste(0, (left, top, left + inner[0], top + inner[1]))
    return canvas, mask


def pan(image: Image.Image, direction: str, fraction: float) -> tuple[Image.Image, Image.Image]:
    """Shift the canvas by `fraction` of its side toward `direction`'s opposite, revealing a
    strip on the `direction` side to repaint (seeded with the stretched edge)."""
    dx, dy = PAN_DIRECTIONS[direction]
    width, height = image.size
    shift_x, shift_y = dx * round(width * fraction), dy * round(height * fraction)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(image.convert("RGB"), (shift_x, shift_y))
    kept = (max(0, shift_x), max(0, shift_y), width + min(0, shift_x), height + min(0, shift_y))
    canvas = _stretch_edges(canvas, kept)
    mask = Image.new("L", (width, height), 255)
    mask.paste(0, kept)
    return canvas, mask


def _stretch_edges(canvas: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """Fill outside `box` with the nearest pixel of the box (edge replication)."""
    import numpy as np

    arr = np.asarray(canvas).copy()
    x0, y0, x1, y1 = box
    arr[:, :x0] = arr[:, x0 : x0 + 1]
    arr[:, x1:] = arr[:, x1 - 1 : x1]
    arr[:y0] = arr[y0 : y0 + 1]
    arr[y1:] = arr[y1 - 1 : y1]
    return Image.fromarray(arr)
