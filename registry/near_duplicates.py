"""Perceptual hashes of the images a tenant protects (uploads with purpose `reference`) and of
the images each fine-tune trained on, and the nearest of them to a rendered image.

Hashes are 64-bit pHashes (`imagehash.phash`: a DCT of the image shrunk to 32x32 gray, one bit
per low frequency above the median), compared by Hamming distance. They are computed once, when
a file is uploaded, and kept in the farm database beside the file's sha256, which is how a
brand adapter's version names its training data (its `dataset_sha256` tag).
"""

from __future__ import annotations

import datetime as dt
import io
import zipfile
from dataclasses import dataclass

import numpy as np
from PIL import Image
from sqlalchemy import DateTime, ForeignKey, Integer, String, delete, or_, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from registry.sql_base import Base, utcnow

#: File purposes whose images are hashed: protected references and training datasets.
REFERENCE, TRAINING = "reference", "fine-tune"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def phash(image: Image.Image) -> int:
    """The image's 64-bit perceptual hash."""
    import imagehash

    bits = imagehash.phash(image.convert("RGB")).hash.flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def png_phash(png: bytes) -> int:
    with Image.open(io.BytesIO(png)) as image:
        return phash(image)


def zip_image_hashes(data: bytes) -> list[tuple[str, int]]:
    """(member name, pHash) of every image in an upload zip the file checks accepted."""
    out = []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            if info.filename.lower().endswith(_IMAGE_SUFFIXES):
                with zf.open(info) as member, Image.open(member) as image:
                    out.append((info.filename, phash(image)))
    return out


class ImageHashRow(Base):
    """The pHash of one image of an uploaded file."""

    __tablename__ = "image_hashes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    file_id: Mapped[str] = mapped_column(String(40), index=True)
    file_sha256: Mapped[str] = mapped_column(String(64), index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(512))
    # Stored as 16 hex digits: a 64-bit unsigned value does not fit a signed BIGINT.
    phash: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


@dataclass(frozen=True)
class Match:
    """The nearest protected or training image to an output, and how near it is."""

    source: str  # "reference" or "training"
    file_id: str
    image: str
    distance: int  # Hamming distance of the pHashes, 0..64

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "file_id": self.file_id,
            "image": self.image,
            "distance": self.distance,
        }


@dataclass(frozen=True)
class HashSet:
    """The hashes an output is compared with, as arrays for a vectorised scan."""

    values: np.ndarray  # uint64
    sources: tuple[str, ...]
    files: tuple[str, ...]
    names: tuple[str, ...]

    def nearest(self, value: int) -> Match | None:
        if not len(self.values):
            return None
        xor = np.bitwise_xor(self.values, np.uint64(value))
        distances = np.unpackbits(xor.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
        i = int(distances.argmin())
        return Match(self.sources[i], self.files[i], self.names[i], int(distances[i]))


class ImageHashIndex:
    """Hash rows in the farm database."""

    def __init__(self, engine) -> None:  # noqa: ANN001 - a SQLAlchemy engine
        self.engine = engine

    def add_file(
        self, tenant_id: str, file_id: str, sha256: str, purpose: str, hashes: list[tuple[str, int]]
    ) -> None:
        with Session(self.engine) as s, s.begin():
            s.add_all(
                ImageHashRow(
                    tenant_id=tenant_id,
                    file_id=file_id,
                    file_sha256=sha256,
                    purpose=purpose,
                    name=name[:512],
                    phash=f"{value:016x}",
                )
                for name, value in hashes
            )

    def remove_file(self, tenant_id: str, file_id: str) -> None:
        with Session(self.engine) as s, s.begin():
            s.execute(
                delete(ImageHashRow).where(
                    ImageHashRow.tenant_id == tenant_id, ImageHashRow.file_id == file_id
                )
            )

    def candidates(self, tenant_id: str, dataset_sha256: str | None) -> HashSet:
        """The tenant's reference images, plus the training images of `dataset_sha256`."""
        wanted = ImageHashRow.purpose == REFERENCE
        if dataset_sha256:
            wanted = or_(
                wanted,
                (ImageHashRow.purpose == TRAINING) & (ImageHashRow.file_sha256 == dataset_sha256),
            )
        with Session(self.engine) as s:
            rows = s.execute(
                select(
                    ImageHashRow.phash,
                    ImageHashRow.purpose,
                    ImageHashRow.file_id,
                    ImageHashRow.name,
                ).where(ImageHashRow.tenant_id == tenant_id, wanted)
            ).all()
        return HashSet(
            values=np.array([int(r[0], 16) for r in rows], dtype=np.uint64),
            sources=tuple("reference" if r[1] == REFERENCE else "training" for r in rows),
            files=tuple(r[2] for r in rows),
            names=tuple(r[3] for r in rows),
        )
