"""Provenance of every output without Ray: C2PA manifests that verify valid and trusted in
PNG, JPEG and WebP, break on a changed pixel, record edits and hide adapters per tenant; the
watermark's payload after the transforms docs/benchmarks.md states; the verify route."""

from __future__ import annotations

import asyncio
import base64
import io
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune import world
from registry.settings import Settings
from serve import watermark
from serve.engine import encode_png
from serve.outputs import OutputEncoder
from serve.provenance import RENDER_ASSERTION, TRAINED_ALGORITHMIC_MEDIA, verify_image
from tests.serve.conftest import client

FORMATS = ("png", "jpeg", "webp")
PARAMS = {
    "prompt": "a red circle",
    "seed": 7,
    "base_model": "tiny-test",
    "base_model_revision": "rev1",
    "adapter": "acme:3",
    "adapter_scale": 1.0,
}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> OutputEncoder:
    state = tmp_path_factory.mktemp("provenance") / "state"
    return OutputEncoder.from_settings(
        Settings(state_dir=state, provenance_hide_adapter_tenants="secretive, other")
    )


def rendered(size: int, seed: int = 0) -> bytes:
    """A rendered PNG as the engine makes it: a scene of the built-in world, with parameters."""
    rng = random.Random(seed)
    scene = world.sample_scene(rng, rng.choice(world.all_combos()))
    return encode_png(world.render(scene, size), PARAMS)


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        out.append((png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def one_pixel_changed(png: bytes) -> bytes:
    """The signed PNG with exactly one pixel changed and every other chunk (the manifest
    included) kept: its image data is replaced by that of the edited pixels."""
    pixels = np.array(Image.open(io.BytesIO(png)).convert("RGB"))
    pixels[0, 0, 0] ^= 1
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    idat = b"".join(d for kind, d in _chunks(buf.getvalue()) if kind == b"IDAT")
    out, placed = [png[:8]], False
    for kind, data in _chunks(png):
        if kind == b"IDAT":
            if not placed:
                out.append(_chunk(b"IDAT", idat))
                placed = True
            continue
        out.append(_chunk(kind, data))
    changed = b"".join(out)
    diff = np.asarray(Image.open(io.BytesIO(changed)).convert("RGB")) != np.asarray(
        Image.open(io.BytesIO(png)).convert("RGB")
    )
    assert diff.sum() == 1  # one channel of one pixel, nothing else
    return changed


def one_byte_changed(data: bytes) -> bytes:
    """A JPEG or WebP with one byte of its compressed image data (after the JPEG scan header,
    inside the WebP VP8 chunk) changed, such that it still decodes to different pixels."""
    start = data.index(b"\xff\xda") + 16 if data[:2] == b"\xff\xd8" else data.index(b"VP8 ") + 40
    before = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    for at in range(start, start + 200):
        out = bytearray(data)
        out[at] ^= 0x04
        try:
            after = np.asarray(Image.open(io.BytesIO(bytes(out))).convert("RGB"))
        except OSError:
            continue
        if not np.array_equal(before, after):
            return bytes(out)
    raise AssertionError("no single-byte change altered the pixels")


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_verifies_valid_and_trusted_with_its_claims(encoder, fmt):
    out = encoder.encode(
        rendered(64), tenant="t1", render_id="r1", index=2, output_format=fmt, quality=90
    )
    assert out.content_type == f"image/{fmt}"
    report = verify_image(out.data, encoder.trust_anchors)
    assert report["valid"] and report["trusted"], report["manifest"]
    assert report["format"] == fmt
    claims = report["manifest"]["claims"]
    (action,) = claims["assertions"]["c2pa.actions.v2"]["actions"]
    assert action["action"] == "c2pa.created"
    assert action["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert claims["claim_generator_info"][0]["name"] == "brandfarm"
    render = claims["assertions"][RENDER_ASSERTION]
    assert render["render_id"] == "r1" and render["index"] == 2
    assert render["base_model"] == "tiny-test" and render["base_model_revision"] == "rev1"
    assert render["adapter"] == "acme:3"
    # The generation parameters are embedded in every format too.
    assert report["parameters"]["prompt"] == "a red circle"
    assert report["parameters"]["seed"] == 7


def test_untrusted_without_the_farm_ca(encoder):
    out = encoder.encode(rendered(64), tenant="t1", render_id="r1", index=0)
    report = verify_image(out.data, trust_anchors_pem="")
    assert report["valid"] and not report["trusted"]


def test_one_changed_pixel_fails_verification(encoder):
    out = encoder.encode(rendered(64), tenant="t1", render_id="r1", index=0)
    report = verify_image(one_pixel_changed(out.data), encoder.trust_anchors)
    assert report["manifest"] is not None and not report["valid"]
    assert "assertion.dataHash.mismatch" in {f["code"] for f in report["manifest"]["failures"]}


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_changed_image_data_fails_verification(encoder, fmt):
    out = encoder.encode(rendered(64), tenant="t1", render_id="r1", index=0, output_format=fmt)
    tampered = one_byte_changed(out.data)
    assert not verify_image(tampered, encoder.trust_anchors)["valid"]


def test_an_edit_records_its_source_as_ingredient(encoder):
    source = encoder.encode(rendered(64), tenant="t1", render_id="src", index=0).data
    out = encoder.encode(
        rendered(64, seed=1), tenant="t1", render_id="edit", index=0, source=source
    )
    report = verify_image(out.data, encoder.trust_anchors)
    assert report["valid"] and report["trusted"]
    claims = report["manifest"]["claims"]
    actions = [a["action"] for a in claims["assertions"]["c2pa.actions.v2"]["actions"]]
    assert actions == ["c2pa.opened", "c2pa.edited"]
    (ingredient,) = claims["ingredients"]
    assert ingredient["relationship"] == "parentOf" and ingredient["active_manifest"]


def test_a_tenant_can_hide_its_adapter(encoder):
    out = encoder.encode(rendered(64), tenant="secretive", render_id="r", index=0)
    report = verify_image(out.data, encoder.trust_anchors)
    assert "adapter" not in report["manifest"]["claims"]["assertions"][RENDER_ASSERTION]
    assert "adapter" not in report["parameters"] and b"acme" not in out.data


def test_a_tenants_policy_hides_its_adapter_from_its_outputs_only(local_parts):
    from serve.protocol import RenderedImage

    services = local_parts.services()
    for name in ("hides-co", "shows-co"):
        services.tenants.create_tenant(name)
    asyncio.run(services.moderation.set_policy("hides-co", {"provenance_hide_adapter": True}))

    def output(tenant: str) -> bytes:
        images = [RenderedImage(png=rendered(64), seed=0)]
        return asyncio.run(services.images.encode_outputs(tenant, "r", images))[0].data

    hidden, shown = output("hides-co"), output("shows-co")
    trust = services.images.outputs.trust_anchors
    assert b"acme" not in hidden and verify_image(hidden, trust)["trusted"]
    assert "adapter" in verify_image(shown, trust)["parameters"]


def test_not_an_image_and_no_manifest(encoder):
    from serve.provenance import NotAnImage

    with pytest.raises(NotAnImage):
        verify_image(b"PK\x03\x04 not an image", encoder.trust_anchors)
    report = verify_image(rendered(64), encoder.trust_anchors)
    assert report["manifest"] is None and not report["valid"]


# --- the watermark ------------------------------------------------------------------------


def _jpeg80(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return Image.open(buf).convert("RGB")


def _half(img: Image.Image) -> Image.Image:
    return img.resize((img.width // 2, img.height // 2), Image.Resampling.BICUBIC)


@pytest.mark.parametrize(
    ("transform", "least"),
    [(lambda im: im, 1.0), (_jpeg80, 0.95)],
    ids=["clean", "jpeg-q80"],
)
def test_watermark_bit_accuracy_at_256px(encoder, transform, least):
    accuracies = []
    for seed in range(4):
        out = encoder.encode(rendered(256, seed), tenant="t1", render_id=f"r{seed}", index=0)
        assert out.watermark == watermark.payload_for(f"r{seed}", 0).hex()
        image = transform(Image.open(io.BytesIO(out.data)).convert("RGB"))
        bits = watermark.read_bits(np.asarray(image))
        accuracies.append(watermark.bit_accuracy(bits, watermark.payload_for(f"r{seed}", 0)))
    assert np.mean(accuracies) >= least, accuracies


def test_watermark_found_after_half_resize_and_reported_by_verify(encoder):
    found = 0
    for seed in range(4):
        out = encoder.encode(rendered(256, seed), tenant="t1", render_id=f"h{seed}", index=1)
        small = _half(Image.open(io.BytesIO(out.data)).convert("RGB"))
        reading = watermark.detect(np.asarray(small))
        found += reading.payload == out.watermark
    assert found >= 3
    report = verify_image(out.data, encoder.trust_anchors)
    assert report["watermark"]["payload"] == out.watermark


def test_images_under_256px_carry_no_watermark_and_read_as_absent(encoder):
    png = rendered(128)
    out = encoder.encode(png, tenant="t1", render_id="r", index=0)
    assert out.watermark is None
    pixels = np.asarray(Image.open(io.BytesIO(out.data)).convert("RGB"))
    assert np.array_equal(pixels, np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
    report = verify_image(out.data, encoder.trust_anchors)
    assert report["watermark"]["payload"] is None
    assert report["manifest"]["claims"]["assertions"][RENDER_ASSERTION]["watermark"] is None


def test_the_ingress_watermarks_without_importing_torch():
    code = (
        "import sys, numpy as np; import serve.api, serve.provenance_api; "
        "from serve import watermark; "
        "img = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8); "
        "p = watermark.payload_for('r', 0); "
        "assert watermark.read_bits(watermark.embed(img, p)) == p; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_an_unmarked_image_reads_as_absent():
    pixels = np.asarray(Image.open(io.BytesIO(rendered(256, seed=9))).convert("RGB"))
    assert watermark.detect(pixels).payload is None


# --- the API in-process (real engine and store; no Ray) -------------------------------------


def test_render_route_outputs_verify_in_every_format(local_parts):
    services = local_parts.services()
    key = services.tenants.create_tenant("prov-co").key
    anchors = services.images.outputs.trust_anchors
    body = {"prompt": "a red circle", "steps": 1, "size": "64x64", "seed": 3}

    async def go():
        async with client(services, key) as c:
            out = {}
            for fmt in FORMATS:
                out[fmt] = await c.post(
                    "/v1/images/generations",
                    json={**body, "output_format": fmt, "response_format": "b64_json"},
                )
            out["url"] = await c.post(
                "/v1/images/generations", json={**body, "output_format": "webp"}
            )
            return out

    answers = asyncio.run(go())
    for fmt in FORMATS:
        r = answers[fmt]
        assert r.status_code == 200, r.text
        assert r.json()["output_format"] == fmt
        data = base64.b64decode(r.json()["data"][0]["b64_json"])
        report = verify_image(data, anchors)
        assert report["format"] == fmt and report["valid"] and report["trusted"], report
        render = report["manifest"]["claims"]["assertions"][RENDER_ASSERTION]
        assert render["render_id"] == r.json()["id"]
        assert render["base_model"] == local_parts.model.id
    r = answers["url"]
    key_ = f"tenants/prov-co/renders/{r.json()['id']}/0.webp"
    assert f"/{key_}?" in r.json()["data"][0]["url"]
    stored = services.store.get_bytes(key_)
    assert verify_image(stored, anchors)["trusted"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"output_format": "gif"}, "output_format"),
        ({"output_format": "jpeg", "output_compression": 101}, "output_compression"),
        ({"output_format": "webp", "output_compression": -1}, "output_compression"),
        ({"output_compression": 50}, "output_compression"),  # png is lossless
        ({"output_format": "jpeg", "output_compression": "80"}, "output_compression"),
    ],
)
def test_bad_output_fields_are_400_naming_the_field(local_parts, extra, param):
    services = local_parts.services()
    key = services.tenants.create_tenant("fmt-co").key

    async def go():
        async with client(services, key) as c:
            return await c.post("/v1/images/generations", json={"prompt": "a", **extra})

    r = asyncio.run(go())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_verify_route(local_parts, tmp_path: Path):
    services = local_parts.services()
    key = services.tenants.create_tenant("verify-co").key
    signed = services.images.outputs.encode(rendered(64), tenant="x", render_id="v", index=0)

    async def go():
        async with client(services, key) as c:
            post = lambda data: c.post(  # noqa: E731
                "/v1/provenance/verify", files={"file": ("f", data)}
            )
            return (
                await post(b"this is not an image"),
                await post(rendered(64)),
                await post(signed.data),
                await post(one_pixel_changed(signed.data)),
                await c.post("/v1/provenance/verify"),
            )

    not_image, plain, good, tampered, missing = asyncio.run(go())
    assert not_image.status_code == 400 and not_image.json()["error"]["param"] == "file"
    assert plain.status_code == 200 and plain.json()["manifest"] is None
    assert plain.json()["parameters"]["prompt"] == "a red circle"
    assert good.status_code == 200 and good.json()["valid"] and good.json()["trusted"]
    assert tampered.status_code == 200 and not tampered.json()["valid"]
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"
