"""Intake validation of tenant fine-tune datasets (a zip of images with captions): the limits, the
problems a rejection lists, the summary of an accepted upload, and reading it back for training.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import stat
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from registry.settings import Settings

#: Problem name used for faults of the upload as a whole rather than of one entry in it.
UPLOAD = "<upload>"
#: Name of the Hugging Face imagefolder caption file (one JSON object per line).
METADATA_NAME = "metadata.jsonl"

#: Image file extensions (compared case-insensitively) and the Pillow formats the images may be.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
CAPTION_EXTENSION = ".txt"

_CHUNK = 64 * 1024
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_EXPECTED_FILES = (
    f"expected {', '.join(IMAGE_EXTENSIONS)} images, {CAPTION_EXTENSION} captions "
    f"or a {METADATA_NAME}"
)


@dataclass(frozen=True)
class DatasetLimits:
    """What a dataset upload may be; the field names match the ``dataset_*`` settings."""

    max_upload_bytes: int
    max_uncompressed_bytes: int
    max_entries: int
    min_images: int
    max_images: int
    min_image_side: int
    max_image_side: int
    max_caption_chars: int
    require_captions: bool = True

    def __post_init__(self) -> None:
        if self.min_images > self.max_images:
            raise ValueError(f"min_images {self.min_images} > max_images {self.max_images}")
        if self.min_image_side > self.max_image_side:
            raise ValueError(
                f"min_image_side {self.min_image_side} > max_image_side {self.max_image_side}"
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> DatasetLimits:
        """The limits configured in ``settings`` (``dataset_max_upload_bytes`` and friends)."""
        return cls(
            max_upload_bytes=settings.dataset_max_upload_bytes,
            max_uncompressed_bytes=settings.dataset_max_uncompressed_bytes,
            max_entries=settings.dataset_max_entries,
            min_images=settings.dataset_min_images,
            max_images=settings.dataset_max_images,
            min_image_side=settings.dataset_min_image_side,
            max_image_side=settings.dataset_max_image_side,
            max_caption_chars=settings.dataset_max_caption_chars,
        )


@dataclass(frozen=True)
class DatasetProblem:
    """One reason a dataset was rejected: the entry it concerns (or ``UPLOAD``) and why."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


class DatasetRejected(ValueError):
    """A dataset upload failed validation; ``problems`` lists every fault found.

    ``status`` is the HTTP status to answer with: 413 when the upload exceeds
    ``max_upload_bytes``, else 400.
    """

    def __init__(self, problems: list[DatasetProblem], status: int = 400) -> None:
        if not problems:
            raise ValueError("DatasetRejected needs at least one problem")
        self.problems = list(problems)
        self.status = status
        super().__init__("; ".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class DatasetSummary:
    """What an accepted upload holds; ``sha256`` and ``bytes`` are of the uploaded zip itself."""

    sha256: str
    bytes: int
    uncompressed_bytes: int
    images: int
    caption_source: str
    image_names: tuple[str, ...]
    #: (where the caption came from, its text): the .txt file, or metadata.jsonl's line.
    captions: tuple[tuple[str, str], ...] = ()


class _BudgetExceeded(Exception):
    """Raised inside a member read once the archive's decompressed-bytes budget is spent."""


@dataclass
class _Budget:
    """Decompressed bytes the archive may still produce, counted as read (never from headers)."""

    left: int

    def read(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
        chunks = []
        with zf.open(info) as member:
            # Asking for one byte past the budget is enough to tell "exactly at" from "over".
            while chunk := member.read(min(_CHUNK, self.left + 1)):
                self.left -= len(chunk)
                if self.left < 0:
                    raise _BudgetExceeded
                chunks.append(chunk)
        return b"".join(chunks)


@dataclass
class _Entries:
    """The archive's entries sorted by what they are, after the name-level checks."""

    images: list[zipfile.ZipInfo] = field(default_factory=list)
    captions: list[zipfile.ZipInfo] = field(default_factory=list)
    metadata: list[zipfile.ZipInfo] = field(default_factory=list)
    problems: list[DatasetProblem] = field(default_factory=list)
    #: Entries with a name-level problem (already reported): never opened.
    blocked: set[zipfile.ZipInfo] = field(default_factory=set)


def validate_dataset_zip(data: bytes, limits: DatasetLimits) -> DatasetSummary:
    """Check an uploaded dataset zip completely, without extracting anything to disk.

    Returns its summary, or raises ``DatasetRejected`` listing every problem found. Archive-wide
    faults that make inspecting the entries unsafe or pointless (empty, too large an upload, not a
    zip, too many entries) are reported alone.
    """
    if not data:
        raise DatasetRejected([DatasetProblem(UPLOAD, "the upload is empty; send a .zip file")])
    if len(data) > limits.max_upload_bytes:
        raise DatasetRejected(
            [
                DatasetProblem(
                    UPLOAD,
                    f"the upload is {len(data):,} bytes, over the limit of "
                    f"{limits.max_upload_bytes:,} bytes (dataset_max_upload_bytes)",
                )
            ],
            status=413,
        )
    try:
        zf = zipfile.ZipFile(BytesIO(data))
    except Exception as exc:  # zipfile raises several types on hostile bytes; all mean "not a zip"
        raise DatasetRejected(
            [DatasetProblem(UPLOAD, f"not a readable zip archive ({exc}); send a .zip file")]
        ) from None
    with zf:
        return _validate_open_zip(data, zf, limits)


def _validate_open_zip(data: bytes, zf: zipfile.ZipFile, limits: DatasetLimits) -> DatasetSummary:
    infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise DatasetRejected(
            [
                DatasetProblem(
                    UPLOAD,
                    f"the archive has {len(infos):,} entries, over the limit of "
                    f"{limits.max_entries:,} (dataset_max_entries); its entries were not inspected",
                )
            ]
        )
    problems: list[DatasetProblem] = []
    declared = sum(info.file_size for info in infos)
    if declared > limits.max_uncompressed_bytes:
        problems.append(
            DatasetProblem(
                UPLOAD,
                f"the archive declares {declared:,} uncompressed bytes, over the limit of "
                f"{limits.max_uncompressed_bytes:,} (dataset_max_uncompressed_bytes)",
            )
        )
    entries = _sort_entries(infos)
    problems += entries.problems

    budget = _Budget(limits.max_uncompressed_bytes)
    stopped_at: str | None = None

    def read(info: zipfile.ZipInfo) -> bytes | None:
        """The member's bytes, or None after recording why they could not be read."""
        nonlocal stopped_at
        if stopped_at is not None or info in entries.blocked:
            return None
        try:
            return budget.read(zf, info)
        except _BudgetExceeded:
            stopped_at = info.filename
            problems.append(
                DatasetProblem(
                    info.filename,
                    f"the archive decompresses to more than {limits.max_uncompressed_bytes:,} "
                    "bytes (dataset_max_uncompressed_bytes); reading stopped here and the "
                    "entries after it were not inspected",
                )
            )
        except Exception as exc:  # CRC errors, bad local headers, unknown compression methods
            problems.append(DatasetProblem(info.filename, f"corrupt archive entry ({exc})"))
        return None

    # Captions first: they are small, so a budget overrun is found in the images, not in them.
    captions = _read_captions(entries, read, problems)
    for info in sorted(entries.images, key=lambda i: i.filename):
        raw = read(info)
        if raw is not None and (reason := _image_problem(raw, limits)):
            problems.append(DatasetProblem(info.filename, reason))

    if captions is not None:
        for name, text in sorted(captions.texts.items()):
            if not text:
                problems.append(DatasetProblem(captions.origin[name], "the caption is empty"))
            elif len(text) > limits.max_caption_chars:
                problems.append(
                    DatasetProblem(
                        captions.origin[name],
                        f"the caption is {len(text):,} characters, over the limit of "
                        f"{limits.max_caption_chars:,} (dataset_max_caption_chars)",
                    )
                )
        if limits.require_captions:
            for info in entries.images:
                named = info.filename in captions.texts or info.filename in captions.excused
                if not named and info not in entries.blocked:
                    problems.append(DatasetProblem(info.filename, _missing_caption(captions)))

    count = len(entries.images)
    if count < limits.min_images:
        problems.append(
            DatasetProblem(
                UPLOAD,
                f"the archive holds {count} images; at least {limits.min_images} are required "
                "(dataset_min_images)",
            )
        )
    elif count > limits.max_images:
        problems.append(
            DatasetProblem(
                UPLOAD,
                f"the archive holds {count:,} images; at most {limits.max_images:,} are allowed "
                "(dataset_max_images)",
            )
        )
    if problems:
        raise DatasetRejected(problems)
    return DatasetSummary(
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
        uncompressed_bytes=declared,
        images=count,
        caption_source=METADATA_NAME if entries.metadata else "txt",
        image_names=tuple(sorted(info.filename for info in entries.images)),
        captions=tuple(
            (captions.origin[name], text) for name, text in sorted(captions.texts.items())
        )
        if captions is not None
        else (),
    )


def read_dataset_zip(data: bytes) -> list[tuple[Image.Image, str]]:
    """The (RGB image, caption) pairs of a dataset, in image-name order, for the training job.

    Call only on an upload ``validate_dataset_zip`` accepted; it re-checks names and captions
    but not the size limits. An image without a caption (allowed when captions are optional)
    gets ``""``.
    """
    with zipfile.ZipFile(BytesIO(data)) as zf:
        entries = _sort_entries(zf.infolist())
        if entries.problems:
            raise DatasetRejected(entries.problems)
        problems: list[DatasetProblem] = []
        captions = _read_captions(entries, zf.read, problems)
        if problems or captions is None:
            raise DatasetRejected(problems or [DatasetProblem(UPLOAD, "captions are unreadable")])
        pairs = []
        for info in sorted(entries.images, key=lambda i: i.filename):
            with Image.open(BytesIO(zf.read(info)), formats=IMAGE_FORMATS) as image:
                pairs.append((image.convert("RGB"), captions.texts.get(info.filename, "")))
    return pairs


def _sort_entries(infos: list[zipfile.ZipInfo]) -> _Entries:
    """Name-level checks of every entry, and the entries sorted into images/captions/metadata.

    An entry with a name-level problem is still sorted (an encrypted image is still an image, so
    its caption is not an orphan and it counts toward the image total) but is blocked from reading.
    """
    entries = _Entries()
    seen: set[str] = set()
    for info in infos:
        name = info.filename
        if name in seen:
            entries.problems.append(
                DatasetProblem(name, "the archive holds two entries with this name; keep one")
            )
            continue
        seen.add(name)
        reason = _unsafe_name(name)
        if reason is None and stat.S_ISLNK(info.external_attr >> 16):
            reason = "symbolic links are not allowed; put the file itself in the archive"
        if reason is None and info.flag_bits & 0x1:
            reason = "encrypted entries are not supported; zip without a password"
        if reason is not None:
            entries.problems.append(DatasetProblem(name, reason))
            entries.blocked.add(info)
        base = posixpath.basename(name)
        ext = posixpath.splitext(base)[1].lower()
        if info.is_dir() or _is_junk(name):
            continue
        if base == METADATA_NAME:
            entries.metadata.append(info)
        elif ext in IMAGE_EXTENSIONS:
            entries.images.append(info)
        elif ext == CAPTION_EXTENSION:
            entries.captions.append(info)
        elif reason is None:
            kind = f"'{ext}'" if ext else "without an extension"
            entries.problems.append(
                DatasetProblem(name, f"unsupported file type {kind}; {_EXPECTED_FILES}")
            )
    return entries


def _unsafe_name(name: str) -> str | None:
    """Why an entry name could escape the archive root on extraction, or None if it cannot."""
    if not name:
        return "the entry has an empty name"
    if "\\" in name:
        return "backslashes are not allowed in entry names; use '/' between folders"
    if name.startswith("/") or _DRIVE_RE.match(name):
        return "absolute paths are not allowed; use paths relative to the archive root"
    if ".." in name.split("/"):
        return "'..' path components are not allowed; the entry would escape the archive root"
    if any(ord(c) < 32 for c in name):
        return "control characters are not allowed in entry names"
    return None


def _is_junk(name: str) -> bool:
    """macOS archive debris, skipped silently."""
    return name.split("/")[0] == "__MACOSX" or posixpath.basename(name) == ".DS_Store"


@dataclass
class _Captions:
    """Captions by image entry name, and where each came from (for naming problems)."""

    source: str
    texts: dict[str, str] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    #: Images whose caption problem is already reported (caption file unreadable or shared), not
    #: to be reported again as missing a caption.
    excused: set[str] = field(default_factory=set)


def _read_captions(
    entries: _Entries,
    read: Callable[[zipfile.ZipInfo], bytes | None],
    problems: list[DatasetProblem],
) -> _Captions | None:
    """Captions from a metadata.jsonl or from same-name .txt files; None if they are unreadable.

    Problems with the caption files themselves are appended to ``problems``.
    """
    images = {info.filename for info in entries.images}
    if len(entries.metadata) > 1:
        for info in entries.metadata:
            problems.append(
                DatasetProblem(
                    info.filename,
                    f"the archive holds {len(entries.metadata)} {METADATA_NAME} files; keep one",
                )
            )
        return None
    if entries.metadata:
        for info in entries.captions:
            if info in entries.blocked:
                continue
            problems.append(
                DatasetProblem(
                    info.filename,
                    f"caption .txt files cannot be mixed with a {METADATA_NAME}; "
                    "use one caption source",
                )
            )
        return _metadata_captions(entries.metadata[0], images, read, problems)

    captions = _Captions("txt")
    by_stem: dict[str, str] = {}
    for name in sorted(images):
        stem = posixpath.splitext(name)[0]
        if stem in by_stem:
            problems.append(
                DatasetProblem(
                    name,
                    f"shares the caption file {stem}{CAPTION_EXTENSION} with {by_stem[stem]}; "
                    "give each image its own name",
                )
            )
            captions.excused.add(name)
        else:
            by_stem[stem] = name
    for info in entries.captions:
        image = by_stem.get(posixpath.splitext(info.filename)[0])
        if image is None:
            if info in entries.blocked:
                continue
            problems.append(
                DatasetProblem(
                    info.filename,
                    "caption without an image: no image of the same name (with one of "
                    f"{', '.join(IMAGE_EXTENSIONS)}) is in the same folder",
                )
            )
            continue
        if image in captions.origin:
            problems.append(
                DatasetProblem(
                    info.filename,
                    f"second caption file for {image} (also {captions.origin[image]}); keep one",
                )
            )
            continue
        captions.origin[image] = info.filename
        raw = read(info)
        text = None if raw is None else _decode(raw, info.filename, problems)
        if text is None:
            captions.excused.add(image)
        else:
            captions.texts[image] = text
    return captions


def _metadata_captions(
    info: zipfile.ZipInfo,
    images: set[str],
    read: Callable[[zipfile.ZipInfo], bytes | None],
    problems: list[DatasetProblem],
) -> _Captions | None:
    """Captions from a ``metadata.jsonl``: ``{"file_name": ..., "text": ...}`` per line.

    ``file_name`` is relative to the folder the metadata file is in (the imagefolder convention).
    """
    raw = read(info)
    text = None if raw is None else _decode(raw, info.filename, problems, strip=False)
    if text is None:
        return None
    folder = posixpath.dirname(info.filename)
    captions = _Captions(METADATA_NAME)
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{info.filename} line {number}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            problems.append(DatasetProblem(where, f"not valid JSON ({exc})"))
            continue
        if not isinstance(record, dict):
            problems.append(
                DatasetProblem(where, 'expected an object like {"file_name": ..., "text": ...}')
            )
            continue
        file_name, caption = record.get("file_name"), record.get("text")
        if not isinstance(file_name, str) or not file_name:
            problems.append(DatasetProblem(where, "'file_name' is missing or not a string"))
            continue
        if not isinstance(caption, str):
            problems.append(
                DatasetProblem(
                    where, f"'text' (the caption of {file_name}) is missing or not a string"
                )
            )
            continue
        image = posixpath.join(folder, file_name) if folder else file_name
        if image not in images:
            problems.append(
                DatasetProblem(where, f"file_name {file_name!r} is not an image in the archive")
            )
        elif image in captions.texts:
            problems.append(
                DatasetProblem(
                    where,
                    f"second caption for {file_name!r} (first at {captions.origin[image]}); "
                    "keep one",
                )
            )
        else:
            captions.texts[image] = caption.strip()
            captions.origin[image] = where
    return captions


def _decode(
    raw: bytes, name: str, problems: list[DatasetProblem], strip: bool = True
) -> str | None:
    """UTF-8 text of a caption file (a leading BOM is dropped), or None after a problem."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problems.append(
            DatasetProblem(
                name,
                f"not UTF-8 text (byte {exc.start}: {exc.reason}); save the file as UTF-8",
            )
        )
        return None
    return text.strip() if strip else text


def _missing_caption(captions: _Captions) -> str:
    if captions.source == METADATA_NAME:
        return f"no caption: the image has no line in {METADATA_NAME}"
    return f"no caption: add a same-name {CAPTION_EXTENSION} file next to the image"


def _image_problem(raw: bytes, limits: DatasetLimits) -> str | None:
    """Why ``raw`` is not an acceptable training image, or None if it is."""
    # Pillow raises many exception types on hostile data (OSError, SyntaxError, ValueError,
    # struct.error, ...); any of them means "not decodable".
    try:
        # Opening reads only the header, so the size is known before any pixel is decoded.
        with Image.open(BytesIO(raw), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            kind = image.format
    except Image.DecompressionBombError as exc:
        return f"the image is too large to decode safely ({exc})"
    except Exception:
        return f"not a decodable image; expected one of {', '.join(IMAGE_FORMATS)}"
    if min(width, height) < limits.min_image_side:
        return (
            f"the image is {width}x{height} pixels; each side must be at least "
            f"{limits.min_image_side} (dataset_min_image_side)"
        )
    if max(width, height) > limits.max_image_side:
        return (
            f"the image is {width}x{height} pixels; each side must be at most "
            f"{limits.max_image_side} (dataset_max_image_side)"
        )
    pixel_limit = Image.MAX_IMAGE_PIXELS
    if pixel_limit is not None and width * height > pixel_limit:
        return (
            f"the image is {width}x{height} pixels, over Pillow's decompression-bomb limit "
            f"of {pixel_limit:,} pixels"
        )
    try:
        # verify() checks the file's structure (and PNG CRCs) but leaves the image unusable, so
        # the pixels are decoded from a fresh open.
        with Image.open(BytesIO(raw), formats=IMAGE_FORMATS) as image:
            image.verify()
        with Image.open(BytesIO(raw), formats=IMAGE_FORMATS) as image:
            image.load()
    except Exception as exc:
        return f"the {kind} image data is corrupt or truncated ({exc})"
    return None
