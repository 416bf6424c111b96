"""Image files the farm writes: PNG, JPEG and WebP, each with the generation parameters embedded
(PNG: a tEXt chunk per item plus all of them as JSON `parameters`; JPEG and WebP: the same JSON
in XMP (`brandfarm:parameters`) and in EXIF UserComment, where tools such as A1111 put it).

Pillow only: no torch, so the ingress and the replica both use it.
"""

from __future__ import annotations

import html
import io
import json
import re
from dataclasses import dataclass
from typing import Literal

from PIL import Image
from PIL.PngImagePlugin import PngInfo

OutputFormat = Literal["png", "jpeg", "webp"]


@dataclass(frozen=True)
class FormatInfo:
    pil_name: str
    content_type: str
    extension: str


FORMATS: dict[str, FormatInfo] = {
    "png": FormatInfo("PNG", "image/png", "png"),
    "jpeg": FormatInfo("JPEG", "image/jpeg", "jpg"),
    "webp": FormatInfo("WEBP", "image/webp", "webp"),
}
#: Quality of JPEG and WebP when the request sets no `output_compression` (OpenAI's default).
DEFAULT_QUALITY = 100
_XMP_NS = "https://brandfarm.invalid/ns/1.0/"
_XMP_PARAMS = re.compile(rb'brandfarm:parameters="([^"]*)"')
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_UNICODE_PREFIX = b"UNICODE\x00"

Metadata = dict[str, str | int | float | None]


def _xmp(parameters: str) -> bytes:
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:brandfarm="{_XMP_NS}" '
        f'brandfarm:parameters="{html.escape(parameters, quote=True)}"/>'
        "</rdf:RDF></x:xmpmeta>"
    ).encode()


def encode_image(
    image: Image.Image, output_format: str, metadata: Metadata, quality: int | None = None
) -> bytes:
    """`image` as `output_format` bytes with `metadata` embedded. `quality` (0..100, JPEG and
    WebP only) defaults to `DEFAULT_QUALITY`."""
    parameters = json.dumps(metadata, sort_keys=True)
    buf = io.BytesIO()
    fmt = FORMATS[output_format]
    if output_format == "png":
        info = PngInfo()
        for key, value in metadata.items():
            if value is not None:
                info.add_text(key, str(value))
        info.add_text("parameters", parameters)
        image.save(buf, format="PNG", pnginfo=info)
    else:
        exif = Image.Exif()
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _UNICODE_PREFIX + parameters.encode("utf-16-be")
        q = DEFAULT_QUALITY if quality is None else quality
        image.save(buf, format=fmt.pil_name, quality=q, exif=exif, xmp=_xmp(parameters))
    return buf.getvalue()


def read_parameters(image: Image.Image) -> dict | None:
    """The generation parameters embedded by `encode_image` (or the engine), or None."""
    text = getattr(image, "text", None) or {}
    raw = text.get("parameters")
    if raw is None:
        match = _XMP_PARAMS.search(image.info.get("xmp") or b"")
        if match is not None:
            raw = html.unescape(match.group(1).decode("utf-8", "replace"))
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
