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
from dataclasses import dataclass

import numpy as np
from imwatermark import WatermarkDecoder, WatermarkEncoder

PAYLOAD_BITS = 48
METHOD = "dwtDctSvd"
#: Embedding strength in the U and V channels (the library's default is 36; 60 survives JPEG
#: q80 on flat brand imagery, measured in bench/provenance.py). Y is left alone.
SCALES = (0, 60, 60)
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


def embed(rgb: np.ndarray, payload: bytes) -> np.ndarray:
    """The RGB uint8 image with `payload` embedded; unchanged when it is too small to carry it."""
    height, width = rgb.shape[:2]
    if not carries_watermark(width, height):
        return rgb
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", payload)
    bgr = encoder.encode(np.ascontiguousarray(rgb[:, :, ::-1]), METHOD, scales=list(SCALES))
    return np.ascontiguousarray(bgr[:, :, ::-1])


def read_bits(rgb: np.ndarray) -> bytes | None:
    """The 48 bits decoded from an RGB image as it is, or None when it is too small to read."""
    height, width = rgb.shape[:2]
    if not carries_watermark(width, height):
        return None
    decoder = WatermarkDecoder("bytes", PAYLOAD_BITS)
    return bytes(decoder.decode(np.ascontiguousarray(rgb[:, :, ::-1]), METHOD, scales=list(SCALES)))


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
