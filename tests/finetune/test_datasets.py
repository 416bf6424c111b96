"""Tests of dataset intake validation: good uploads pass, each bad one is rejected by name."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import stat
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from io import BytesIO

import pytest
from PIL import Image

from finetune import world
from finetune.datasets import (
    METADATA_NAME,
    UPLOAD,
    DatasetLimits,
    DatasetProblem,
    DatasetRejected,
    read_dataset_zip,
    validate_dataset_zip,
)
from registry.settings import Settings

# Small limits so every case builds and checks in milliseconds.
LIMITS = DatasetLimits(
    max_upload_bytes=1 << 20,
    max_uncompressed_bytes=2 << 20,
    max_entries=40,
    min_images=4,
    max_images=10,
    min_image_side=32,
    max_image_side=128,
    max_caption_chars=120,
)
_STAMP = (2020, 1, 1, 0, 0, 0)
Entry = tuple[str | zipfile.ZipInfo, bytes | str]


# --- building archives --------------------------------------------------------------------------


def _image(size: tuple[int, int] = (64, 64), fmt: str = "PNG") -> bytes:
    buf = BytesIO()
    Image.new("RGB", size, (0, 130, 130)).save(buf, format=fmt)
    return buf.getvalue()


@cache
def _brand_pairs(n: int) -> tuple[tuple[bytes, str], ...]:
    pairs = []
    for image, text in world.generate_brand("acme", n, seed=7):
        buf = BytesIO()
        image.save(buf, format="PNG")
        pairs.append((buf.getvalue(), text))
    return tuple(pairs)


def _good(n: int = 4) -> list[Entry]:
    """``n`` brand images with same-name .txt captions, the upload format of the issue."""
    entries: list[Entry] = []
    for i, (png, text) in enumerate(_brand_pairs(n)):
        entries += [(f"{i:04d}.png", png), (f"{i:04d}.txt", text + "\n")]
    return entries


def _metadata(n: int = 4, folder: str = "img/") -> list[Entry]:
    """``n`` brand images under ``folder`` captioned by a root metadata.jsonl."""
    entries: list[Entry] = []
    lines = []
    for i, (png, text) in enumerate(_brand_pairs(n)):
        entries.append((f"{folder}{i:04d}.png", png))
        lines.append(json.dumps({"file_name": f"{folder}{i:04d}.png", "text": text}))
    return [(METADATA_NAME, "\n".join(lines) + "\n"), *entries]


def _zip(entries: list[Entry], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are a case we build on purpose
        with zipfile.ZipFile(buf, "w", compression=compression) as zf:
            for name, data in entries:
                info = name if isinstance(name, zipfile.ZipInfo) else zipfile.ZipInfo(name, _STAMP)
                info.compress_type = compression
                zf.writestr(info, data)
    return buf.getvalue()


def _without(entries: list[Entry], name: str) -> list[Entry]:
    return [e for e in entries if e[0] != name]


def _replace(entries: list[Entry], name: str, data: bytes | str) -> list[Entry]:
    return [(n, data if n == name else d) for n, d in entries]


# (offset in the central directory entry, offset in the local header, struct format)
_HEADER_FIELDS = {"flags": (8, 6, "<H"), "crc": (16, 14, "<I"), "file_size": (24, 22, "<I")}


def _patch_header(data: bytes, name: str, field: str, value: int) -> bytes:
    """Overwrite one field of ``name``'s central directory entry and local header."""
    central, local, fmt = _HEADER_FIELDS[field]
    out = bytearray(data)
    with zipfile.ZipFile(BytesIO(data)) as zf:
        info = zf.getinfo(name)
        offset = zf.start_dir
    while True:  # walk the central directory to the entry
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", out, offset + 28)
        if out[offset + 46 : offset + 46 + name_len] == name.encode():
            break
        offset += 46 + name_len + extra_len + comment_len
    struct.pack_into(fmt, out, offset + central, value)
    struct.pack_into(fmt, out, info.header_offset + local, value)
    return bytes(out)


def _symlink(name: str, target: str) -> Entry:
    info = zipfile.ZipInfo(name, _STAMP)
    info.create_system = 3  # Unix, where the high 16 bits of external_attr are st_mode
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target


def _rejected(data: bytes, limits: DatasetLimits = LIMITS) -> DatasetRejected:
    with pytest.raises(DatasetRejected) as caught:
        validate_dataset_zip(data, limits)
    return caught.value


def _has(problems: list[DatasetProblem], name: str, fragment: str) -> bool:
    return any(p.name == name and fragment in p.reason for p in problems)


# --- good uploads -------------------------------------------------------------------------------


def test_brand_zip_from_the_world_passes(tmp_path) -> None:
    path = world.write_brand_zip(tmp_path / "acme.zip", "acme", n=6, seed=3)
    data = path.read_bytes()
    summary = validate_dataset_zip(data, LIMITS)
    with zipfile.ZipFile(path) as zf:
        uncompressed = sum(i.file_size for i in zf.infolist())
    assert summary.sha256 == hashlib.sha256(data).hexdigest()
    assert summary.bytes == len(data)
    assert summary.uncompressed_bytes == uncompressed
    assert summary.images == 6
    assert summary.caption_source == "txt"
    assert summary.image_names == tuple(f"{i:04d}.png" for i in range(6))


def test_read_dataset_zip_gives_rgb_images_and_captions_in_name_order(tmp_path) -> None:
    path = world.write_brand_zip(tmp_path / "acme.zip", "acme", n=5, seed=3)
    pairs = read_dataset_zip(path.read_bytes())
    expected = list(world.generate_brand("acme", 5, seed=3))
    assert [text for _, text in pairs] == [text for _, text in expected]
    for (image, _), (want, _) in zip(pairs, expected, strict=True):
        assert image.mode == "RGB"
        assert image.tobytes() == want.tobytes()


def test_metadata_jsonl_variant_passes_and_reads_back() -> None:
    data = _zip(_metadata(5))
    summary = validate_dataset_zip(data, LIMITS)
    assert summary.caption_source == METADATA_NAME
    assert summary.images == 5
    assert summary.image_names == tuple(f"img/{i:04d}.png" for i in range(5))
    pairs = read_dataset_zip(data)
    assert [text for _, text in pairs] == [text for _, text in _brand_pairs(5)]


def test_metadata_jsonl_in_a_folder_names_files_relative_to_it() -> None:
    # Zipping a folder puts everything under it, metadata.jsonl included (imagefolder layout).
    (_, metadata), *images = _metadata(4, folder="")
    entries = [("acme/" + METADATA_NAME, metadata)]
    entries += [("acme/" + str(name), png) for name, png in images]
    summary = validate_dataset_zip(_zip(entries), LIMITS)
    assert summary.image_names == tuple(f"acme/{i:04d}.png" for i in range(4))


def test_nested_folders_jpeg_webp_upper_case_and_macos_junk_pass() -> None:
    entries = _good(2) + [
        ("photos/", b""),  # a directory entry
        ("photos/IMG_0001.JPG", _image(fmt="JPEG")),
        ("photos/IMG_0001.txt", "acme style, a photo"),
        ("photos/b.webp", _image((48, 96), fmt="WEBP")),
        ("photos/b.txt", "acme style, a webp"),
        ("__MACOSX/photos/._IMG_0001.JPG", b"\x00\x05\x16\x07junk"),
        (".DS_Store", b"\x00\x00\x00\x01Bud1"),
        ("photos/.DS_Store", b"\x00\x00\x00\x01Bud1"),
    ]
    summary = validate_dataset_zip(_zip(entries), LIMITS)
    assert summary.image_names == ("0000.png", "0001.png", "photos/IMG_0001.JPG", "photos/b.webp")
    assert [text for _, text in read_dataset_zip(_zip(entries))][2:] == [
        "acme style, a photo",
        "acme style, a webp",
    ]


def test_captions_may_be_optional() -> None:
    entries = [e for e in _good(4) if not str(e[0]).endswith(".txt")]
    summary = validate_dataset_zip(
        _zip(entries), dataclasses.replace(LIMITS, require_captions=False)
    )
    assert summary.images == 4
    assert [text for _, text in read_dataset_zip(_zip(entries))] == [""] * 4


def test_limits_from_settings() -> None:
    settings = Settings(dataset_max_images=7, dataset_min_image_side=16)
    limits = DatasetLimits.from_settings(settings)
    assert limits.max_images == 7
    assert limits.min_image_side == 16
    assert limits.max_upload_bytes == settings.dataset_max_upload_bytes
    assert limits.max_uncompressed_bytes == settings.dataset_max_uncompressed_bytes
    assert limits.max_entries == settings.dataset_max_entries
    assert limits.min_images == settings.dataset_min_images
    assert limits.max_image_side == settings.dataset_max_image_side
    assert limits.max_caption_chars == settings.dataset_max_caption_chars
    assert limits.require_captions is True


# --- each bad upload, alone ---------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """One bad upload and the problem it must be rejected with."""

    id: str
    build: Callable[[], bytes]
    name: str
    reason: str
    status: int = 400


def _meta_lines(*extra: str, drop: int | None = None) -> list[Entry]:
    meta, *images = _metadata(4)
    lines = str(meta[1]).splitlines()
    if drop is not None:
        del lines[drop]
    return [(METADATA_NAME, "\n".join([*lines, *extra])), *images]


def _crc_broken() -> bytes:
    data = _zip(_good(4))
    return _patch_header(data, "0001.txt", "crc", 0xDEADBEEF)


def _encrypted() -> bytes:
    data = _zip(_good(4))
    return _patch_header(data, "0003.png", "flags", 0x1)  # bit 0: encrypted


BAD = [
    Bad("empty", lambda: b"", UPLOAD, "empty"),
    Bad("not-a-zip", lambda: b"hello, not a zip", UPLOAD, "not a readable zip"),
    Bad("truncated-zip", lambda: _zip(_good(4))[:-100], UPLOAD, "not a readable zip"),
    Bad(
        "upload-too-large",
        lambda: _zip(_good(4)) + b"\0" * (1 << 20),
        UPLOAD,
        "over the limit of 1,048,576 bytes (dataset_max_upload_bytes)",
        status=413,
    ),
    Bad(
        "too-many-entries",
        lambda: _zip(_good(4) + [(f"d{i:02d}/", b"") for i in range(40)]),
        UPLOAD,
        "48 entries, over the limit of 40 (dataset_max_entries)",
    ),
    Bad(
        "declared-too-large",
        lambda: _zip(_good(4) + [("big.txt", "x" * (3 << 20))]),
        UPLOAD,
        "over the limit of 2,097,152 (dataset_max_uncompressed_bytes)",
    ),
    Bad("dotdot", lambda: _zip(_good(4) + [("../evil.png", _image())]), "../evil.png", "'..'"),
    Bad(
        "nested-dotdot",
        lambda: _zip(_good(4) + [("img/../../evil.txt", "x")]),
        "img/../../evil.txt",
        "escape the archive root",
    ),
    Bad(
        "absolute", lambda: _zip(_good(4) + [("/etc/evil.png", b"x")]), "/etc/evil.png", "absolute"
    ),
    Bad(
        "drive-letter", lambda: _zip(_good(4) + [("C:/evil.png", b"x")]), "C:/evil.png", "absolute"
    ),
    Bad(
        "backslash",
        lambda: _zip(_good(4) + [("..\\evil.png", _image())]),
        "..\\evil.png",
        "backslashes",
    ),
    Bad(
        "symlink",
        lambda: _zip(_good(4) + [_symlink("link.png", "/etc/passwd")]),
        "link.png",
        "symbolic links",
    ),
    Bad("encrypted", _encrypted, "0003.png", "encrypted"),
    Bad("crc-error", _crc_broken, "0001.txt", "corrupt archive entry (Bad CRC-32"),
    Bad(
        "duplicate-entry",
        lambda: _zip(_good(4) + [("0001.png", _image())]),
        "0001.png",
        "two entries with this name",
    ),
    Bad(
        "unsupported-type",
        lambda: _zip(_good(4) + [("notes.csv", "a,b")]),
        "notes.csv",
        "unsupported file type '.csv'",
    ),
    Bad(
        "no-extension",
        lambda: _zip(_good(4) + [("run", "#!/bin/sh")]),
        "run",
        "unsupported file type without an extension",
    ),
    Bad(
        "not-an-image",
        lambda: _zip(_replace(_good(4), "0002.png", b"\x89PNG but not really")),
        "0002.png",
        "not a decodable image",
    ),
    Bad(
        "gif-named-png",
        lambda: _zip(_replace(_good(4), "0002.png", _image(fmt="GIF"))),
        "0002.png",
        "not a decodable image; expected one of PNG, JPEG, WEBP",
    ),
    Bad(
        "truncated-png",
        lambda: _zip(_replace(_good(4), "0002.png", _brand_pairs(4)[2][0][:400])),
        "0002.png",
        "PNG image data is corrupt or truncated",
    ),
    Bad(
        "image-too-small",
        lambda: _zip(_replace(_good(4), "0002.png", _image((64, 16)))),
        "0002.png",
        "64x16 pixels; each side must be at least 32 (dataset_min_image_side)",
    ),
    Bad(
        "image-too-large",
        lambda: _zip(_replace(_good(4), "0002.png", _image((200, 100)))),
        "0002.png",
        "200x100 pixels; each side must be at most 128 (dataset_max_image_side)",
    ),
    Bad(
        "missing-caption",
        lambda: _zip(_without(_good(4), "0002.txt")),
        "0002.png",
        "no caption: add a same-name .txt",
    ),
    Bad("empty-caption", lambda: _zip(_replace(_good(4), "0002.txt", " \n")), "0002.txt", "empty"),
    Bad(
        "long-caption",
        lambda: _zip(_replace(_good(4), "0002.txt", "x" * 121)),
        "0002.txt",
        "121 characters, over the limit of 120 (dataset_max_caption_chars)",
    ),
    Bad(
        "caption-not-utf8",
        lambda: _zip(_replace(_good(4), "0002.txt", b"caf\xe9 style")),
        "0002.txt",
        "not UTF-8",
    ),
    Bad(
        "caption-without-image",
        lambda: _zip(_good(4) + [("0009.txt", "acme style")]),
        "0009.txt",
        "caption without an image",
    ),
    Bad(
        "two-images-one-caption",
        lambda: _zip(_good(4) + [("0001.jpg", _image(fmt="JPEG"))]),
        "0001.png",
        "shares the caption file 0001.txt with 0001.jpg",
    ),
    Bad("too-few-images", lambda: _zip(_good(3)), UPLOAD, "3 images; at least 4 are required"),
    Bad("too-many-images", lambda: _zip(_good(11)), UPLOAD, "11 images; at most 10 are allowed"),
    Bad("meta-bad-json", lambda: _zip(_meta_lines("{oops")), "metadata.jsonl line 5", "JSON"),
    Bad(
        "meta-not-an-object",
        lambda: _zip(_meta_lines('["img/0000.png", "x"]')),
        "metadata.jsonl line 5",
        "expected an object",
    ),
    Bad(
        "meta-unknown-file",
        lambda: _zip(_meta_lines(json.dumps({"file_name": "img/nope.png", "text": "x"}))),
        "metadata.jsonl line 5",
        "file_name 'img/nope.png' is not an image in the archive",
    ),
    Bad(
        "meta-missing-text",
        lambda: _zip(_meta_lines(json.dumps({"file_name": "img/0000.png"}))),
        "metadata.jsonl line 5",
        "'text'",
    ),
    Bad(
        "meta-duplicate-line",
        lambda: _zip(_meta_lines(json.dumps({"file_name": "img/0000.png", "text": "again"}))),
        "metadata.jsonl line 5",
        "second caption for 'img/0000.png' (first at metadata.jsonl line 1)",
    ),
    Bad(
        "meta-empty-caption",
        lambda: _zip(_meta_lines(json.dumps({"file_name": "img/0003.png", "text": " "}), drop=3)),
        "metadata.jsonl line 4",
        "the caption is empty",
    ),
    Bad(
        "meta-missing-line",
        lambda: _zip(_meta_lines(drop=1)),
        "img/0001.png",
        "no caption: the image has no line in metadata.jsonl",
    ),
    Bad(
        "meta-mixed-with-txt",
        lambda: _zip(_meta_lines() + [("img/0001.txt", "acme style")]),
        "img/0001.txt",
        "cannot be mixed with a metadata.jsonl",
    ),
    Bad(
        "meta-not-utf8",
        lambda: _zip([(METADATA_NAME, b'{"file_name": "caf\xe9"}'), *_metadata(4)[1:]]),
        METADATA_NAME,
        "not UTF-8",
    ),
]


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_bad_upload_is_rejected_naming_file_and_reason(bad: Bad) -> None:
    rejected = _rejected(bad.build())
    assert rejected.status == bad.status
    assert _has(rejected.problems, bad.name, bad.reason), rejected.problems
    assert f"{bad.name}: " in str(rejected)


def test_bad_cases_are_otherwise_good() -> None:
    # Every case above is one fault away from the good dataset: the bases themselves pass.
    assert validate_dataset_zip(_zip(_good(4)), LIMITS).images == 4
    assert validate_dataset_zip(_zip(_meta_lines()), LIMITS).images == 4


def test_every_problem_is_listed_at_once() -> None:
    entries = _replace(_good(5), "0001.png", b"garbage")
    entries = _replace(entries, "0003.txt", "x" * 500)
    entries = _without(entries, "0004.txt")
    entries += [
        ("../escape.png", _image()),
        _symlink("link.txt", "/etc/shadow"),
        ("notes.docx", b"PK"),
        ("tiny.png", _image((8, 8))),
        ("tiny.txt", "acme style, tiny"),
    ]
    rejected = _rejected(_zip(entries))
    expected = [
        ("0001.png", "not a decodable image"),
        ("0003.txt", "500 characters"),
        ("0004.png", "no caption"),
        ("../escape.png", "'..'"),
        ("link.txt", "symbolic links"),
        ("notes.docx", "unsupported file type '.docx'"),
        ("tiny.png", "8x8 pixels"),
    ]
    for name, fragment in expected:
        assert _has(rejected.problems, name, fragment), (name, rejected.problems)
    assert len(rejected.problems) == len(expected), rejected.problems
    assert rejected.status == 400
    assert str(rejected) == "; ".join(f"{p.name}: {p.reason}" for p in rejected.problems)


# --- zip bombs ----------------------------------------------------------------------------------

_BOMB_BYTES = 50 << 20  # 50 MB of zeros, about 50 KB deflated
_BOMB_LIMITS = dataclasses.replace(LIMITS, max_uncompressed_bytes=10 << 20)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """The good dataset plus a 50 MB ``0004.png`` of zeros, then a garbage ``0005.png``."""
    data = _zip(
        _good(4)
        + [("0004.png", b"\0" * _BOMB_BYTES), ("0004.txt", "acme style, a bomb")]
        + [("0005.png", b"never inspected"), ("0005.txt", "acme style, garbage")]
    )
    assert len(data) < 100_000
    return data


@pytest.fixture
def decompressed(monkeypatch) -> Iterator[list[int]]:
    """Counts the bytes every zip member read hands out (the real decompression work)."""
    counted = [0]
    real_read = zipfile.ZipExtFile.read

    def read(self: zipfile.ZipExtFile, n: int = -1) -> bytes:
        data = real_read(self, n)
        counted[0] += len(data)
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", read)
    yield counted


def test_zip_bomb_with_honest_header_is_stopped_at_the_budget(bomb, decompressed) -> None:
    rejected = _rejected(bomb, _BOMB_LIMITS)
    assert _has(rejected.problems, UPLOAD, "declares 52,43")
    assert _has(rejected.problems, "0004.png", "decompresses to more than 10,485,760 bytes")
    # Reading stopped inside the bomb: nothing after it was decompressed or judged.
    assert not any(p.name == "0005.png" for p in rejected.problems)
    assert decompressed[0] <= _BOMB_LIMITS.max_uncompressed_bytes + 64 * 1024


# The header lie: the central directory says the 50 MB member is 1,000 bytes. Python's zipfile
# never hands out more than the central directory's file_size (it truncates the stream there and
# then checks the CRC), so a header that under-declares cannot make us decompress more than it
# declares, and the declared-size sum stays the binding check. The running budget in
# validate_dataset_zip is the second line for the honest-but-huge case tested above.
def _lying(bomb: bytes) -> bytes:
    data = _patch_header(bomb, "0004.png", "file_size", 1000)
    with zipfile.ZipFile(BytesIO(data)) as zf:
        assert zf.getinfo("0004.png").file_size == 1000
    return data


def test_zip_bomb_whose_header_under_declares_is_rejected_without_inflating(
    bomb, decompressed
) -> None:
    rejected = _rejected(_lying(bomb), _BOMB_LIMITS)
    assert _has(rejected.problems, "0004.png", "corrupt archive entry (Bad CRC-32")
    assert not _has(rejected.problems, UPLOAD, "uncompressed")
    assert decompressed[0] < 100_000


def test_zip_bomb_whose_header_lies_consistently_yields_only_the_declared_bytes(
    bomb, decompressed
) -> None:
    # Also forge the CRC of the 1,000 declared zeros: the member then reads cleanly, as 1,000
    # bytes, and is judged on those (not an image), never on the 50 MB behind them.
    crc = zipfile.crc32(b"\0" * 1000)
    data = _patch_header(_lying(bomb), "0004.png", "crc", crc)
    rejected = _rejected(data, _BOMB_LIMITS)
    assert _has(rejected.problems, "0004.png", "not a decodable image")
    assert decompressed[0] < 100_000


def test_an_unreadable_entry_is_reported_once_without_knock_on_problems() -> None:
    # The encrypted image still counts as an image and keeps its caption from being an orphan;
    # the symlinked caption keeps its image from being reported as uncaptioned.
    entries = _without(_good(5), "0004.txt") + [_symlink("0004.txt", "/etc/passwd")]
    rejected = _rejected(_patch_header(_zip(entries), "0003.png", "flags", 0x1))
    assert [(p.name, p.reason.split(";")[0]) for p in rejected.problems] == [
        ("0003.png", "encrypted entries are not supported"),
        ("0004.txt", "symbolic links are not allowed"),
    ]
