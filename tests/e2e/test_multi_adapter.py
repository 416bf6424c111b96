"""Several adapters per render through the whole farm: real Ray Serve (the request routed by
its first adapter, the others loaded on the replica through the same multiplexer), real MLflow
registry, real object store. The farm holds two adapters per replica (tests/conftest.py), so
`max_adapters_per_request` is 2 there."""

from __future__ import annotations

import base64
import io
import json
import uuid

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from finetune.synthetic_lora import register_random_lora
from registry.adapters import AdapterRegistry
from registry.base_models import load_pipeline
from tests.polling import wait_for

pytestmark = pytest.mark.e2e

BODY = {"prompt": "a red circle on a blue background", "seed": 5, "steps": 6}


@pytest.fixture(scope="module")
def tenants(farm, tmp_path_factory) -> dict[str, str]:
    """Two tenants: `mine` with brands `brand` and `texture`, `other` with `secret`."""
    registry = AdapterRegistry(farm.settings.resolved_mlflow_uri)
    mlflow = MlflowClient(farm.settings.resolved_mlflow_uri)
    unet = load_pipeline(farm.model, "cpu").unet
    root = tmp_path_factory.mktemp("multi")
    keys = {}
    for role, brands in (("mine", ("brand", "texture")), ("other", ("secret",))):
        tenant = f"multi-{role}-{uuid.uuid4().hex[:6]}"
        keys[role] = farm.new_tenant(tenant)
        for seed, brand in enumerate(brands):
            register_random_lora(
                registry,
                mlflow,
                tenant,
                brand,
                farm.model,
                unet,
                root / f"{tenant}-{brand}",
                seed=300 + seed + 10 * len(keys),
            )
    return keys


def post(farm, key: str, **body):
    with farm.http(key) as http:
        return http.post(
            "/images/generations", json={**BODY, "response_format": "b64_json", **body}
        )


def image(payload: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(payload["data"][0]["b64_json"])))


def pixels(payload: dict) -> np.ndarray:
    return np.asarray(image(payload).convert("RGB")).astype(int)


def test_two_adapters_render_together_in_any_order_and_are_named(farm, tenants):
    both = [{"adapter": "brand", "scale": 0.8}, {"adapter": "texture@production", "scale": 0.5}]
    r = post(farm, tenants["mine"], adapters=both)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(a["brand"], a["version"], a["scale"]) for a in body["adapters"]] == [
        ("brand", 1, 0.8),
        ("texture", 1, 0.5),
    ]
    assert body["adapter"]["brand"] == "brand"  # the single-adapter field: the first one
    meta = image(body).text
    assert json.loads(meta["adapters"]) == [
        {"adapter": "brand:1", "scale": 0.8},
        {"adapter": "texture:1", "scale": 0.5},
    ]
    reversed_ = post(farm, tenants["mine"], adapters=both[::-1])
    assert reversed_.status_code == 200, reversed_.text
    worst = int(np.abs(pixels(reversed_.json()) - pixels(body)).max())
    print(f"two adapters listed in either order, through the farm: max difference {worst}/255")
    assert worst == 0
    alone = post(farm, tenants["mine"], adapter="brand", adapter_scale=0.8)
    assert not np.array_equal(pixels(alone.json()), pixels(body))


def test_another_tenants_brand_anywhere_is_404_as_a_missing_one(farm, tenants):
    answers = {
        name: post(farm, tenants["mine"], adapters=[{"adapter": "brand"}, {"adapter": name}])
        for name in ("secret", "nosuchbrand")
    }
    first = post(farm, tenants["mine"], adapters=[{"adapter": "secret"}, {"adapter": "brand"}])
    for r in (*answers.values(), first):
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "adapter_not_found"
    assert answers["secret"].json()["error"]["param"] == "adapters.1.adapter"
    assert first.json()["error"]["param"] == "adapters.0.adapter"
    # The same answer as for a brand that exists nowhere, but for its name.
    shown = {n: r.json()["error"]["message"].replace(n, "X") for n, r in answers.items()}
    assert shown["secret"] == shown["nosuchbrand"]


def test_one_version_named_twice_and_too_many_adapters_are_400(farm, tenants):
    twice = post(farm, tenants["mine"], adapters=[{"adapter": "brand"}, {"adapter": "brand:1"}])
    assert twice.status_code == 400, twice.text
    assert twice.json()["error"]["param"] == "adapters.1.adapter"
    assert "brand version 1" in twice.json()["error"]["message"]
    three = [{"adapter": "brand"}, {"adapter": "texture"}, {"adapter": "brand:1"}]
    many = post(farm, tenants["mine"], adapters=three)
    assert many.status_code == 400 and many.json()["error"]["param"] == "adapters"
    assert "limit is 2" in many.json()["error"]["message"]


def test_an_async_render_combines_adapters_too(farm, tenants):
    both = [{"adapter": "texture", "scale": 0.5}, {"adapter": "brand", "scale": 0.8}]
    with farm.http(tenants["mine"]) as c:
        r = c.post("/renders", json={**BODY, "adapters": both})
        assert r.status_code == 202, r.text
        render_id = r.json()["id"]
        wait_for(
            lambda: c.get(f"/renders/{render_id}").json()["status"] == "succeeded",
            180,
            "the async render succeeds",
        )
        done = c.get(f"/renders/{render_id}").json()
    assert [(a["brand"], a["scale"]) for a in done["adapters"]] == [
        ("texture", 0.5),
        ("brand", 0.8),
    ]
