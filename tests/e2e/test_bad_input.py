"""The bad-input matrix: status, OpenAI error shape, the field named, and nothing written."""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.e2e

GOOD = {"prompt": "a red circle"}

# (case, body override or raw body, expected status, expected param, words the message must hold)
CASES = [
    ("missing prompt", {"prompt": None}, 400, "prompt", ["required"]),
    ("empty prompt", {"prompt": "   "}, 400, "prompt", ["empty"]),
    ("prompt too long", {"prompt": "x" * 1001}, 400, "prompt", ["1001", "1000"]),
    ("n too large", {"n": 5}, 400, "n", ["1 and 4"]),
    ("n zero", {"n": 0}, 400, "n", ["1 and 4"]),
    ("n not int", {"n": "many"}, 400, "n", ["integer"]),
    ("size malformed", {"size": "big"}, 400, "size", ["WxH"]),
    ("size not multiple", {"size": "{bad_multiple}"}, 400, "size", ["multiples of {multiple}"]),
    ("size too large", {"size": "4096x4096"}, 400, "size", ["{max_side}"]),
    ("bad response_format", {"response_format": "jpeg"}, 400, "response_format", ["url"]),
    ("steps too many", {"steps": 101}, 400, "steps", ["1 and 100"]),
    ("negative guidance", {"guidance_scale": -1}, 400, "guidance_scale", ["0 and 30"]),
    ("seed negative", {"seed": -1}, 400, "seed", ["4294967295"]),
    ("unknown field", {"style": "vivid"}, 400, "style", ["not permitted"]),
    ("negative prompt too long", {"negative_prompt": "y" * 1001}, 400, "negative_prompt", ["1000"]),
    ("unknown model", {"model": "dall-e-3"}, 404, "model", ["dall-e-3"]),
]


@pytest.fixture(scope="module")
def key(farm) -> str:
    return farm.new_tenant("bad-input-co")


def _assert_error(resp, status: int, param: str | None, words: list[str]) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param
    for w in words:
        assert w in err["message"], (w, err["message"])


@pytest.mark.parametrize(("case", "override", "status", "param", "words"), CASES)
def test_invalid_field(farm, key, case, override, status, param, words):
    m = farm.model  # size rules come from the farm's base model
    rules = {
        "multiple": m.size_multiple,
        "max_side": m.max_side,
        "bad_multiple": f"{m.native_size - 1}x{m.native_size}",
    }
    override = {k: v.format(**rules) if isinstance(v, str) else v for k, v in override.items()}
    words = [w.format(**rules) for w in words]
    body = {**GOOD, **override}
    body = {k: v for k, v in body.items() if v is not None}
    objects, renders = farm.all_objects(), farm.tenants.count_renders()
    with farm.http(key) as c:
        resp = c.post("/images/generations", json=body)
    _assert_error(resp, status, param, words)
    assert farm.all_objects() == objects, "a rejected request wrote to the object store"
    assert farm.tenants.count_renders() == renders, "a rejected request wrote to the database"


def test_invalid_json_body(farm, key):
    with farm.http(key) as c:
        resp = c.post(
            "/images/generations",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
    _assert_error(resp, 400, "body", ["not valid JSON"])


@pytest.mark.parametrize(
    "header", [None, "Bearer", "Bearer bf-000000000000-" + "x" * 43, "Basic abc"]
)
def test_missing_or_wrong_key_is_401(farm, header):
    objects = farm.all_objects()
    headers = {"Authorization": header} if header else {}
    resp = farm.http(None).post("/images/generations", json=GOOD, headers=headers)
    _assert_error(resp, 401, None, ["API key"])
    assert farm.all_objects() == objects


def test_revoked_key_is_401(farm):
    issued = farm.tenants.create_tenant("revoked-co")
    with farm.http(issued.key) as c:
        assert c.get("/models").status_code == 200
        farm.tenants.revoke_key(issued.key_id)
        _assert_error(c.get("/models"), 401, None, ["revoked"])


def test_body_over_limit_is_413(farm, key):
    limit = farm.settings.max_request_bytes
    objects = farm.all_objects()
    with farm.http(key) as c:
        resp = c.post("/images/generations", json={"prompt": "z" * (limit + 10)})
    _assert_error(resp, 413, None, [str(limit)])
    assert farm.all_objects() == objects


def test_hourly_quota_is_429(farm):
    key = farm.new_tenant("quota-co", images_per_hour=2)
    with farm.http(key) as c:
        assert c.post("/images/generations", json={**GOOD, "n": 2}).status_code == 200
        objects, renders = farm.all_objects(), farm.tenants.count_renders()
        resp = c.post("/images/generations", json=GOOD)
    _assert_error(resp, 429, None, ["quota", "2 of 2"])
    assert resp.headers["retry-after"] == "60"
    assert farm.all_objects() == objects and farm.tenants.count_renders() == renders


def test_unknown_route_is_404_in_openai_shape(farm, key):
    with farm.http(key) as c:
        _assert_error(c.get("/does-not-exist"), 404, None, ["Not Found"])


def test_openai_client_raises_the_right_exceptions(farm, key):
    good = openai.OpenAI(base_url=farm.api, api_key=key, max_retries=0)
    bad = openai.OpenAI(base_url=farm.api, api_key="bf-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(prompt="a red circle")
    with pytest.raises(openai.BadRequestError) as e:
        good.images.generate(prompt="a red circle", n=9)
    assert e.value.param == "n"
    with pytest.raises(openai.NotFoundError):
        good.images.generate(prompt="a red circle", model="dall-e-3")
    quota_key = farm.new_tenant("quota-client-co", images_per_hour=1)
    limited = openai.OpenAI(base_url=farm.api, api_key=quota_key, max_retries=0)
    limited.images.generate(prompt="a red circle")
    with pytest.raises(openai.RateLimitError):
        limited.images.generate(prompt="a red circle")
