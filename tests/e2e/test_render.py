"""Rendering through the whole farm: the official openai client, determinism, storage layout."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def key(farm) -> str:
    return farm.new_tenant("render-co")


def _client(farm, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=farm.api, api_key=key, max_retries=0, timeout=300)


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_openai_client_renders_url_and_b64(farm, key):
    client = _client(farm, key)
    by_url = client.images.generate(
        prompt="a red circle on a blue background",
        n=2,
        size=f"{farm.model.native_size}x{farm.model.native_size}",
        response_format="url",
        extra_body={"seed": 11},
    )
    assert len(by_url.data) == 2
    pngs = [httpx.get(d.url, timeout=60).content for d in by_url.data]
    for png in pngs:
        img = Image.open(io.BytesIO(png))
        side = farm.model.native_size
        assert img.format == "PNG" and img.size == (side, side)
    assert [d.model_extra["seed"] for d in by_url.data] == [11, 12]

    inline = client.images.generate(
        prompt="a red circle on a blue background",
        size=f"{farm.model.native_size}x{farm.model.native_size}",
        response_format="b64_json",
        extra_body={"seed": 11},
    )
    png = base64.b64decode(inline.data[0].b64_json)
    # Same prompt and seed: identical pixels whichever way the image was delivered.
    assert np.array_equal(_pixels(png), _pixels(pngs[0]))


def test_png_carries_generation_metadata(farm, key):
    body = {"prompt": "a green square", "seed": 5, "steps": 4, "guidance_scale": 3.5}
    with farm.http(key) as c:
        r = c.post("/images/generations", json={**body, "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    img = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert img.text["prompt"] == "a green square"
    assert img.text["seed"] == "5" and img.text["steps"] == "4"
    assert img.text["guidance_scale"] == "3.5"
    assert img.text["base_model"] == r.json()["model"]
    params = json.loads(img.text["parameters"])
    assert params["base_model_revision"] == img.text["base_model_revision"]


def test_fixed_seed_is_deterministic_and_seeds_differ(farm, key):
    def render(seed: int) -> np.ndarray:
        with farm.http(key) as c:
            r = c.post(
                "/images/generations",
                json={"prompt": "a blue triangle", "seed": seed, "response_format": "b64_json"},
            )
        assert r.status_code == 200, r.text
        return _pixels(base64.b64decode(r.json()["data"][0]["b64_json"]))

    a, b, other = render(123), render(123), render(124)
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - other.astype(int)).mean() > 1.0


def test_renders_land_under_the_tenants_prefix(farm, key):
    with farm.http(key) as c:
        r = c.post("/images/generations", json={"prompt": "a white circle", "n": 2})
    assert r.status_code == 200, r.text
    render_id = r.json()["id"]
    keys = [k for k in farm.all_objects() if f"/renders/{render_id}/" in k]
    assert keys == [
        f"tenants/render-co/renders/{render_id}/0.png",
        f"tenants/render-co/renders/{render_id}/1.png",
    ]
    for item, obj_key in zip(r.json()["data"], keys, strict=True):
        assert f"/{farm.settings.s3_bucket}/{obj_key}?" in item["url"]
        assert farm.store.stat(obj_key).sha256 is not None


def test_models_and_health(farm, key):
    models = _client(farm, key).models.list()
    assert [m.id for m in models.data] == [farm.model.id]
    assert httpx.get(f"{farm.settings.api_url}/healthz").json()["status"] == "ok"
