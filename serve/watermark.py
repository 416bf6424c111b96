"""The invisible watermark: a 48-bit payload derived from the render id, hidden in the pixels
with `invisible-watermark`'s DWT-DCT-SVD method, so an image stays traceable after its
metadata is stripped.

The payload is 32 bits of sha256("<render id>/<index>") and a 16-bit check (sha256 of those
32 bits), so a reader can tell a decoded payload from noise (a random image passes the check
with probability 2^-16). The library refuses images under 256x256 pixels; those carry no
watermark and read as absent (docs/architecture.md, "Provenance", has the measured limits).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

PAYLOAD_BITS = 48
#: Embedding strength per YUV channel; the method marks U only (it reads the first two scales,
#: and Y is left alone). The library's default is 36; 60 survives JPEG q80 on flat brand
#: imagery (bench/provenance.py).
SCALES = (0, 60, 60)
BLOCK = 4
#: `detect` reads a copy at 2x (a halved image) only up to this side, to bound its work.
MAX_READ_SIDE = 4096
#: The library's own minimum (width x height).
MIN_PIXELS = 256 * 256


def payload_for(render_id: str, index: int) -> bytes:
    """The 6-byte payload of image `index` of render `render_id`."""
    ident = hashlib.sha256(f"{render_id}/{index}".encode()).digest()[:4]
    return ident + hashlib.sha256(ident).digest()[:2]


def payload_checks(payload: bytes) -> bool:
    return len(payload) == 6 and hashlib.sha256(payload[:4]).digest()[:2] == payload[4:]


def carries_watermark(width: int, height: int) -> bool:
    return width * height >= MIN_PIXELS


@cache
def _method():  # noqa: ANN202 - imwatermark.dwtDctSvd.EmbedDwtDctSvd
    """The library's DWT-DCT-SVD embedder, loaded on its own: the `imwatermark` package's
    `__init__` imports torch (for its RivaGAN method), which the ingress must not load."""
    name = "imwatermark_dwtdctsvd"
    if name not in sys.modules:
        package = importlib.util.find_spec("imwatermark")  # finds, does not import
        if package is None or package.origin is None:
            raise ImportError("invisible-watermark is not installed")
        spec = importlib.util.spec_from_file_location(
            name, Path(package.origin).parent / "dwtDctSvd.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name].EmbedDwtDctSvd


def embed(rgb: np.ndarray, payload: bytes) -> np.ndarray:
    """The RGB uint8 image with `payload` embedded; unchanged when it is too small to carry it."""
    height, width = rgb.shape[:2]
    if not carries_watermark(width, height):
        return rgb
    bits = list(np.unpackbits(np.frombuffer(payload, np.uint8)))
    embedder = _method()(bits, wmLen=len(bits), scales=list(SCALES), block=BLOCK)
    bgr = embedder.encode(np.ascontiguousarray(rgb[:, :, ::-1]))
    return np.ascontiguousarray(bgr[:, :, ::-1])


def read_bits(rgb: np.ndarray) -> bytes | None:
    """The 48 bits decoded from an RGB image as it is, or None when it is too small to read."""
    height, width = rgb.shape[:2]
    if not carries_watermark(width, height):
        return None
    reader = _method()([], wmLen=PAYLOAD_BITS, scales=list(SCALES), block=BLOCK)
    bits = reader.decode(np.ascontiguousarray(rgb[:, :, ::-1]))
    return np.packbits(np.asarray(bits, np.uint8)).tobytes()


@dataclass(frozen=True)
class WatermarkReading:
    payload: str | None  # hex of the 6 bytes that passed the check, else None
    detail: str  # how it was found, or why not

    def to_dict(self) -> dict:
        return {"payload": self.payload, "detail": self.detail}


def detect(rgb: np.ndarray) -> WatermarkReading:
    """Look for a payload in the image as given and at twice its size (an image downscaled by
    half after rendering); the check bits tell a payload from noise."""
    from PIL import Image

    tried = []
    for factor in (1, 2):
        candidate = rgb
        if factor != 1:
            h, w = rgb.shape[:2]
            if max(h, w) * factor > MAX_READ_SIDE:
                tried.append(f"{factor}x: not tried (over {MAX_READ_SIDE} px)")
                continue
            candidate = np.asarray(
                Image.fromarray(rgb).resize((w * factor, h * factor), Image.Resampling.BICUBIC)
            )
        bits = read_bits(candidate)
        if bits is None:
            tried.append(f"{factor}x: too small (under {MIN_PIXELS} pixels)")
            continue
        if payload_checks(bits):
            return WatermarkReading(bits.hex(), f"found at {factor}x scale")
        tried.append(f"{factor}x: no payload passed the check")
    return WatermarkReading(None, "absent: " + "; ".join(tried))


def bit_accuracy(decoded: bytes | None, expected: bytes) -> float:
    """Share of the payload's bits read correctly (0.0 when nothing could be read)."""
    if decoded is None:
        return 0.0
    a = np.unpackbits(np.frombuffer(decoded, np.uint8))
    b = np.unpackbits(np.frombuffer(expected, np.uint8))
    return float((a == b).mean())
