"""The editing routes in-process over real parts (the engine on the built-in shapes model,
SQLite, the embedded object store): bad uploads are 400s naming the field and limit with
nothing stored or charged, another tenant's render is a 404 like a missing one, the real
`openai` client's `images.edit` and `images.create_variation` work unmodified, and operations
on a stored render record their source in the response, the PNG and the database."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from finetune import metrics, world
from registry.base_models import SHAPES, ensure_base_model
from registry.storage import tenant_prefix
from registry.tenants import RenderRow
from serve.api import create_api
from serve.provenance import verify_image
from tests.serve.conftest import LocalParts, client

EDITS, VARIATIONS = "/v1/images/edits", "/v1/images/variations"
FAST = {"steps": "8"}


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def red_circle_on_blue(size: int = 32) -> Image.Image:
    image = Image.new("RGB", (size, size), world.PALETTE["blue"])
    ImageDraw.Draw(image).ellipse(
        (size // 4, size // 4, 3 * size // 4 - 1, 3 * size // 4 - 1), fill=world.PALETTE["red"]
    )
    return image


def center_mask_alpha(size: int = 32) -> Image.Image:
    """OpenAI's mask: opaque everywhere but the center, which is transparent (repaint)."""
    mask = Image.new("RGBA", (size, size), (0, 0, 0, 255))
    ImageDraw.Draw(mask).rectangle(
        (size // 4, size // 4, 3 * size // 4 - 1, 3 * size // 4 - 1), fill=(0, 0, 0, 0)
    )
    return mask


def bomb_png(side: int = 30000) -> bytes:
    """A valid PNG header for a huge grayscale image with almost no data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\0" * (side + 1) * 16)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def shapes(local_parts: LocalParts) -> LocalParts:
    """Services over the built-in shapes model (the shared object store, its own engine)."""
    from serve.engine import DiffusionEngine

    model = ensure_base_model(SHAPES, local_parts.state / "models", 1024)
    engine = DiffusionEngine.load(model, "cpu", max_batch_images=4)
    yield LocalParts(model, engine, local_parts.stack, local_parts.settings, local_parts.state)
    engine.close()


# --- bad input ------------------------------------------------------------------------------


BAD_UPLOADS = [
    # (files, form, param, words in the message)
    ({"image": ("a.txt", b"not an image", "text/plain")}, {}, "image", "could not be decoded"),
    ({"image": ("a.gif", png(red_circle_on_blue(), "GIF"), "image/gif")}, {}, "image", "GIF"),
    ({"image": ("a.png", png(red_circle_on_blue())[:60], "image/png")}, {}, "image", "decoded"),
    ({"image": ("a.png", bomb_png(), "image/png")}, {}, "image", "decompression bomb"),
    (
        {"image": ("a.png", png(red_circle_on_blue(80)), "image/png")},
        {},
        "image",
        "6400 pixels; the limit is 4096 pixels (edit_max_image_pixels)",
    ),
    (
        {
            "image": ("a.png", png(red_circle_on_blue()), "image/png"),
            "mask": ("m.png", png(center_mask_alpha(16)), "image/png"),
        },
        {},
        "mask",
        "same size",
    ),
    (
        {
            "image": ("a.png", png(red_circle_on_blue()), "image/png"),
            "mask": ("m.png", png(red_circle_on_blue()), "image/png"),
        },
        {},
        "mask",
        "neither an alpha channel nor a single gray channel",
    ),
    (
        {"image": ("a.png", png(red_circle_on_blue()), "image/png")},
        {"strength": "1.5"},
        "strength",
        "less than or equal to 1",
    ),
    (
        {"image": ("a.png", png(red_circle_on_blue()), "image/png")},
        {"strength": "-0.1"},
        "strength",
        "greater than or equal to 0",
    ),
    ({}, {}, "image", "required"),
]


@pytest.mark.parametrize(("files", "form", "param", "words"), BAD_UPLOADS)
def test_bad_uploads_are_400_naming_the_field_with_nothing_stored_or_charged(
    shapes, files, form, param, words
):
    services = shapes.services(edit_max_image_pixels=4096)
    key = services.tenants.create_tenant("bad-upload-co").key
    steps = shapes.engine.stats.steps

    async def go():
        async with client(services, key) as c:
            return await c.post(EDITS, files=files, data={"prompt": "a green square", **form})

    r = run(go())
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    # Nothing rendered, stored, recorded or charged.
    assert shapes.engine.stats.steps == steps
    assert services.tenants.count_renders() == 0
    assert services.tenants.images_in_last_hour("bad-upload-co") == 0
    assert services.store.list(tenant_prefix("bad-upload-co")) == []


def test_an_upload_over_the_byte_limit_is_400_naming_the_limit(shapes):
    services = shapes.services(edit_max_image_bytes=1024)
    key = services.tenants.create_tenant("big-upload-co").key
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8))

    async def go():
        async with client(services, key) as c:
            return await c.post(VARIATIONS, files={"image": ("a.png", png(noisy), "image/png")})

    r = run(go())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "image"
    assert "the limit is 1024 bytes (edit_max_image_bytes)" in r.json()["error"]["message"]
    assert services.tenants.count_renders() == 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"from": {"prompt": "a", "seed": 1}, "to": {"prompt": "b", "seed": 2}, "frames": 1},
            "frames",
        ),
        (
            {"from": {"prompt": "a", "seed": 1}, "to": {"prompt": "b", "seed": 2}, "frames": 17},
            "frames",
        ),
        (
            {"from": {"prompt": "a", "seed": -1}, "to": {"prompt": "b", "seed": 2}, "frames": 4},
            "from.seed",
        ),
        (
            {
                "from": {"prompt": "a", "seed": 1, "adapter": "x"},
                "to": {"prompt": "b", "seed": 2, "adapter": "y"},
                "frames": 4,
            },
            "body",
        ),
    ],
)
def test_bad_interpolations_are_400(shapes, body, param):
    services = shapes.services()
    key = services.tenants.create_tenant("interp-co").key

    async def go():
        async with client(services, key) as c:
            return await c.post("/v1/images/interpolations", json=body)

    r = run(go())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert services.tenants.count_renders() == 0


# --- the openai client, and operations on stored renders ------------------------------------


def openai_client(services, key: str):
    from openai import AsyncOpenAI

    transport = httpx.ASGITransport(app=create_api(services))
    http = httpx.AsyncClient(transport=transport, base_url="http://brandfarm.test/v1", timeout=120)
    return AsyncOpenAI(api_key=key, base_url="http://brandfarm.test/v1", http_client=http)


def test_openai_client_edit_and_variation_work_unmodified(shapes):
    services = shapes.services()
    key = services.tenants.create_tenant("openai-co").key
    image = red_circle_on_blue()

    async def go():
        api = openai_client(services, key)
        edited = await api.images.edit(
            image=("in.png", png(image), "image/png"),
            mask=("mask.png", png(center_mask_alpha()), "image/png"),
            prompt="a green square on a blue background",
            n=2,
            size="32x32",
            response_format="b64_json",
            extra_body={"seed": 3, "steps": 20},
        )
        varied = await api.images.create_variation(
            image=("in.png", png(image), "image/png"), n=1, response_format="url"
        )
        return edited, varied

    edited, varied = run(go())
    assert len(edited.data) == 2 and len(varied.data) == 1
    out = pixels(base64.b64decode(edited.data[0].b64_json))
    assert out.shape == (32, 32, 3)
    assert metrics.read_image(out).bg == "blue"
    assert varied.data[0].url.startswith("http")
    assert services.tenants.count_renders() == 2


def test_operations_record_their_source_and_another_tenants_render_is_404(shapes):
    services = shapes.services()
    acme = services.tenants.create_tenant("ops-acme").key
    globex = services.tenants.create_tenant("ops-globex").key
    ops = [
        ("vary", {"variant": "strong"}, (32, 32)),
        ("remix", {"prompt": "a yellow square on a blue background"}, (32, 32)),
        ("upscale", {}, (64, 64)),
        ("zoom_out", {"factor": 2.0}, (32, 32)),
        ("pan", {"direction": "left"}, (32, 32)),
    ]

    async def go():
        async with client(services, acme) as c, client(services, globex) as other:
            made = await c.post(
                "/v1/images/generations",
                json={"prompt": "a red circle on a blue background", "seed": 7, "n": 2},
            )
            render = made.json()["id"]
            results = {}
            for op, body, _ in ops:
                r = await c.post(
                    f"/v1/renders/{render}/images/1/{op}",
                    json={**body, "response_format": "b64_json", "seed": 1},
                )
                results[op] = r
            theirs = await other.post(f"/v1/renders/{render}/images/0/vary", json={})
            missing = await other.post("/v1/renders/nope/images/0/vary", json={})
            index = await c.post(f"/v1/renders/{render}/images/2/vary", json={})
            wrong_field = await c.post(
                f"/v1/renders/{render}/images/0/vary", json={"direction": "up"}
            )
            return render, results, theirs, missing, index, wrong_field

    render, results, theirs, missing, index, wrong_field = run(go())
    for op, _, size in ops:
        r = results[op]
        assert r.status_code == 200, (op, r.text)
        body = r.json()
        assert (body["source_render"], body["source_index"], body["operation"]) == (render, 1, op)
        image = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
        assert image.size == size, op
        assert image.text["source_render"] == render and image.text["operation"] == op
        assert image.text["source_index"] == "1"
        origin = services.tenants.render_origin(body["id"])
        assert (origin.source_render, origin.source_index, origin.operation) == (render, 1, op)
        # Signed like every output, as an edit of its source (C2PA ingredient).
        report = verify_image(
            base64.b64decode(body["data"][0]["b64_json"]), services.images.outputs.trust_anchors
        )
        assert report["valid"] and report["trusted"], (op, report["manifest"])
        claims = report["manifest"]["claims"]
        actions = [a["action"] for a in claims["assertions"]["c2pa.actions.v2"]["actions"]]
        assert "c2pa.edited" in actions, (op, actions)
        assert [i["relationship"] for i in claims["ingredients"]] == ["parentOf"], op
    # Another tenant's render answers exactly as a missing one.
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"]["code"] == missing.json()["error"]["code"] == "render_not_found"
    assert (
        theirs.json()["error"]["message"].replace(render, "nope")
        == missing.json()["error"]["message"]
    )
    assert index.status_code == 400 and index.json()["error"]["param"] == "index"
    assert wrong_field.status_code == 400 and wrong_field.json()["error"]["param"] == "direction"
    assert RenderRow.__table__.c.operation.nullable


def test_interpolation_and_blend_through_the_api(shapes):
    services = shapes.services()
    key = services.tenants.create_tenant("latent-co").key

    async def go():
        async with client(services, key) as c:
            frames = await c.post(
                "/v1/images/interpolations",
                json={
                    "from": {"prompt": "a red circle on a blue background", "seed": 1},
                    "to": {"prompt": "a yellow square on a green background", "seed": 2},
                    "frames": 3,
                    "steps": 8,
                    "response_format": "b64_json",
                },
            )
            blend = await c.post(
                "/v1/images/blends",
                json={
                    "prompts": [
                        {"prompt": "a red circle on a blue background", "weight": 3},
                        {"prompt": "a red circle on a green background", "weight": 1},
                    ],
                    "seed": 4,
                    "steps": 8,
                    "response_format": "b64_json",
                },
            )
            return frames, blend

    frames, blend = run(go())
    assert frames.status_code == 200, frames.text
    images = [
        Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in frames.json()["data"]
    ]
    assert [im.text["noise_t"] for im in images] == ["0.0", "0.5", "1.0"]
    assert all(im.text["noise_seed"] == "2" and im.text["seed"] == "1" for im in images)
    assert blend.status_code == 200, blend.text
    mixed = Image.open(io.BytesIO(base64.b64decode(blend.json()["data"][0]["b64_json"])))
    assert mixed.text["prompt_mix"].startswith("0.75*a red circle on a blue background")
    assert services.tenants.images_in_last_hour("latent-co") == 4  # 3 frames + 1 blend
