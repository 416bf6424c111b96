"""Several adapters per render at the API, in-process (no Ray): every malformed `adapters`
list is a 400 naming the field, on the generations and the async renders route alike, before
any registry lookup (MLflow here accepts connections and never answers: a lookup would hang).
Tenant isolation and the rendered result need the registry: tests/e2e/test_multi_adapter.py."""

from __future__ import annotations

import asyncio

import pytest

from registry.settings import Settings
from serve.errors import InvalidField
from serve.protocol import ImageGenerationRequest, RenderLimits
from tests.serve.conftest import SilentServer, client

TINY = {"prompt": "a red circle", "steps": 1, "size": "64x64"}
MAX = 2  # max_adapters_per_request of these services
NAN = float("nan")


def entries(*refs: str) -> list[dict]:
    return [{"adapter": ref, "scale": 0.5} for ref in refs]


BAD = [
    # both fields
    ({"adapter": "acme", "adapters": entries("texture")}, "adapter"),
    ({"adapter_scale": 0.5, "adapters": entries("texture")}, "adapter_scale"),
    # more than max_adapters_per_request
    ({"adapters": entries("a", "b", "c")}, "adapters"),
    ({"adapters": []}, "adapters"),
    # the same reference twice ("acme" is "acme@production")
    ({"adapters": entries("acme", "acme")}, "adapters.1.adapter"),
    ({"adapters": entries("acme@production", "acme")}, "adapters.1.adapter"),
    # a bad scale, a bad reference, a bad entry
    ({"adapters": [{"adapter": "acme", "scale": 2.5}]}, "adapters.0.scale"),
    ({"adapters": [{"adapter": "acme"}, {"adapter": "bravo", "scale": -0.1}]}, "adapters.1.scale"),
    ({"adapters": [{"adapter": "acme", "scale": "1"}]}, "adapters.0.scale"),
    ({"adapters": entries("acme", "bad brand")}, "adapters.1.adapter"),
    ({"adapters": [{"adapter": "acme", "weight": 1}]}, "adapters.0.weight"),
    ({"adapters": [{"scale": 1}]}, "adapters.0.adapter"),
]


@pytest.mark.parametrize("route", ["/v1/images/generations", "/v1/renders"])
def test_bad_adapter_lists_are_400_naming_the_field_before_any_lookup(local_parts, route):
    mlflow = SilentServer()
    services = local_parts.services(mlflow.url, max_adapters_per_request=MAX)
    key = services.tenants.create_tenant("multi-bad-co").key

    async def go():
        async with client(services, key) as c:
            return [await c.post(route, json={**TINY, **body}) for body, _ in BAD]

    try:
        answers = asyncio.run(go())
    finally:
        mlflow.close()
    for r, (body, param) in zip(answers, BAD, strict=True):
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.text)
    assert mlflow.accepted == []  # refused before any registry call
    too_many = answers[2].json()["error"]["message"]
    assert "limit is 2" in too_many and "max_adapters_per_request" in too_many


def test_max_adapters_per_request_must_fit_a_replica(tmp_path):
    with pytest.raises(ValueError, match="max_adapters_per_request=5 is above"):
        Settings(state_dir=tmp_path, max_adapters_per_replica=4, max_adapters_per_request=5)
    # Left at its default, it fits itself to a smaller replica.
    assert Settings(state_dir=tmp_path, max_adapters_per_replica=2).max_adapters_per_request == 2
    assert Settings(state_dir=tmp_path).max_adapters_per_request == 3


def test_an_adapter_list_parses_in_request_order_with_default_scales():
    from tests.serve.test_protocol import MODEL

    limits = RenderLimits.from_settings(Settings(max_adapters_per_request=3), MODEL)
    body = {"adapters": [{"adapter": "texture@staging", "scale": 0.5}, {"adapter": "acme"}]}
    req = ImageGenerationRequest(prompt="a cat", **body)
    parsed = limits.adapters(req)
    assert [(f, str(ref), scale) for f, ref, scale in parsed] == [
        ("adapters.0.adapter", "texture@staging", 0.5),
        ("adapters.1.adapter", "acme@production", 1.0),
    ]
    assert limits.check(req).adapters == ()  # resolved later, by the ingress
    single = ImageGenerationRequest(prompt="a cat", adapter="acme:3", adapter_scale=0.3)
    assert [(f, str(r), s) for f, r, s in limits.adapters(single)] == [("adapter", "acme:3", 0.3)]
    nan = ImageGenerationRequest(prompt="a cat", adapters=[{"adapter": "acme", "scale": NAN}])
    with pytest.raises(InvalidField) as e:
        limits.adapters(nan)
    assert e.value.param == "adapters.0.scale"
