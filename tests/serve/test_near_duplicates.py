"""Near-duplicate checks of renders against a tenant's reference images and an adapter's
training images: flag (response, PNG metadata, metric) or block (422, nothing stored)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import create_engine

from registry.near_duplicates import ImageHashIndex, phash, png_phash, zip_image_hashes
from registry.schema import metadata
from registry.tenants import TenantDirectory
from serve.near_duplicates import NearDuplicateService
from serve.protocol import AdapterSpec, RenderedImage
from tests.serve.conftest import client

RENDER = "/v1/images/generations"


def run(coro):
    return asyncio.run(coro)


def zip_of(images: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in images.items():
            zf.writestr(name, data)
    return buf.getvalue()


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_phash_sees_small_changes_as_near_and_other_images_as_far():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (64, 64, 3))
    noisy = np.clip(base + rng.integers(-6, 7, base.shape), 0, 255)
    other = rng.integers(0, 255, (64, 64, 3))
    h = png_phash(png(base))
    assert bin(h ^ png_phash(png(noisy))).count("1") <= 6
    assert bin(h ^ png_phash(png(other))).count("1") > 16
    # Hashes survive the round trip through the database's hex column and the zip reader.
    [(name, value)] = zip_image_hashes(zip_of({"a.png": png(base), "a.txt": b"caption"}))
    assert (name, value) == ("a.png", h)
    assert phash(Image.open(io.BytesIO(png(base)))) == h


def test_training_images_count_only_for_the_adapter_trained_on_them(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'farm.db'}")
    metadata.create_all(engine)
    tenants = TenantDirectory(engine)
    tenants.create_tenant("train-co")
    rng = np.random.default_rng(1)
    trained_on = png(rng.integers(0, 255, (32, 32, 3)))
    index = ImageHashIndex(engine)
    index.add_file("train-co", "file-1", "sha-a", "fine-tune", [("0.png", png_phash(trained_on))])

    class Policy:
        near_duplicate, near_duplicate_distance = "flag", 6

    class Moderation:
        async def policy(self, tenant_id):
            return Policy()

    from serve.io_pools import BlockingPool

    seen = []
    service = NearDuplicateService(
        index, Moderation(), BlockingPool("db", 1), lambda t, a: seen.append((t, a))
    )
    image = RenderedImage(seed=1, png=trained_on)

    def spec(dataset: str) -> AdapterSpec:
        return AdapterSpec("train-co", "acme", 1, 1.0, "w", "uri", "acme", dataset)

    flagged, matches = run(service.check("train-co", spec("sha-a"), [image]))
    assert matches == [{"source": "training", "file_id": "file-1", "image": "0.png", "distance": 0}]
    assert (
        json.loads(Image.open(io.BytesIO(flagged[0].png)).text["near_duplicate"])["distance"] == 0
    )
    assert seen == [("train-co", "flag")]
    # Another version (other data) and the base model do not compare with those images.
    assert run(service.check("train-co", spec("sha-b"), [image]))[1] == [None]
    assert run(service.check("train-co", None, [image]))[1] == [None]


@pytest.fixture
def services(local_parts):
    return local_parts.services()


def test_a_render_near_a_reference_image_is_flagged_then_blocked(services):
    key = services.tenants.create_tenant("ref-co").key
    other = services.tenants.create_tenant("ref-other").key
    flagged_metric = []
    services.images.near_duplicates.on_match = lambda t, a: flagged_metric.append((t, a))
    body = {
        "prompt": "a red circle",
        "steps": 2,
        "size": "64x64",
        "seed": 7,
        "response_format": "b64_json",
    }

    async def go():
        async with client(services, key) as c, client(services, other) as o:
            first = await c.post(RENDER, json=body)
            rendered = base64.b64decode(first.json()["data"][0]["b64_json"])
            # A reference set holding that very image (and another), no captions needed.
            refs = zip_of({"logo.png": rendered, "x.png": png(np.zeros((32, 32, 3)))})
            up = await c.post(
                "/v1/files",
                files={"file": ("refs.zip", refs, "application/zip")},
                data={"purpose": "reference"},
            )
            assert up.status_code == 200, up.text
            flagged = await c.post(RENDER, json=body)
            other_tenant = await o.post(RENDER, json=body)
            await c.put("/v1/moderation/policy", json={"near_duplicate": "block"})
            renders_before = services.tenants.count_renders("ref-co")
            blocked = await c.post(RENDER, json=body)
            renders_after = services.tenants.count_renders("ref-co")
            events = await c.get("/v1/moderation/events")
            job = await c.post(
                "/v1/fine_tuning/jobs",
                json={"training_file": up.json()["id"], "brand": "acme"},
            )
            return up, flagged, other_tenant, blocked, (renders_before, renders_after), events, job

    up, flagged, other_tenant, blocked, renders, events, job = run(go())
    assert up.status_code == 200, up.text
    assert up.json()["purpose"] == "reference" and up.json()["images"] == 2
    item = flagged.json()["data"][0]
    assert item["near_duplicate"] == {
        "source": "reference",
        "file_id": up.json()["id"],
        "image": "logo.png",
        "distance": 0,
    }
    meta = Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).text
    assert json.loads(meta["near_duplicate"])["image"] == "logo.png"
    assert flagged_metric == [("ref-co", "flag"), ("ref-co", "block")]
    assert "near_duplicate" not in other_tenant.json()["data"][0]  # not B's reference
    assert blocked.status_code == 422, blocked.text
    assert blocked.json()["error"]["code"] == "near_duplicate"
    assert renders[0] == renders[1]  # nothing charged
    [event] = events.json()["data"]
    assert (event["rule"], event["field"]) == ("near_duplicate", "data[0]")
    assert job.status_code == 400 and job.json()["error"]["param"] == "training_file"
