"""Request limits: every field checked against settings and the model, errors naming both."""

from __future__ import annotations

import random

import pytest

from registry.base_models import BaseModelInfo
from registry.settings import Settings
from serve.errors import InvalidField
from serve.protocol import MAX_SEED, ImageGenerationRequest, RenderLimits

MODEL = BaseModelInfo(
    id="m",
    path="/x",
    revision="r",
    native_size=64,
    size_multiple=8,
    max_side=256,
    default_steps=10,
    default_guidance_scale=5.0,
)
LIMITS = RenderLimits.from_settings(Settings(), MODEL)


def check(**fields):
    return LIMITS.check(ImageGenerationRequest(prompt=fields.pop("prompt", "a cat"), **fields))


def test_defaults_come_from_the_model():
    job = check(seed=7, n=3)
    assert (job.width, job.height, job.steps, job.guidance_scale) == (64, 64, 10, 5.0)
    assert job.seeds == (7, 8, 9)


def test_seed_wraps_and_random_seeds_are_drawn():
    assert check(seed=MAX_SEED, n=2).seeds == (MAX_SEED, 0)
    job = LIMITS.check(ImageGenerationRequest(prompt="a", n=4), rng=random.Random(0))
    assert len(set(job.seeds)) == 4 and all(0 <= s <= MAX_SEED for s in job.seeds)


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": "x" * 1001}, "prompt", "limit is 1000"),
        ({"n": 5}, "n", "between 1 and 4"),
        ({"size": "64"}, "size", "WxH"),
        ({"size": "64x60"}, "size", "multiples of 8"),
        ({"size": "0x0"}, "size", "between 8 and 256"),
        ({"size": "264x264"}, "size", "between 8 and 256"),
        ({"steps": 0}, "steps", "between 1 and 100"),
        ({"guidance_scale": 31}, "guidance_scale", "between 0 and 30"),
        ({"seed": MAX_SEED + 1}, "seed", "between 0 and"),
        ({"model": "other"}, "model", "not served"),
    ],
)
def test_limits_name_field_and_bound(fields, param, fragment):
    with pytest.raises(InvalidField) as e:
        check(**fields)
    assert e.value.param == param and fragment in e.value.message
    assert e.value.status == (404 if param == "model" else 400)


def test_valid_sizes():
    job = check(size="128x64")
    assert (job.width, job.height) == (128, 64)


def adapter(**fields):
    return LIMITS.adapter(ImageGenerationRequest(prompt="a cat", **fields))


def test_adapter_references_parse_to_alias_or_version_with_scale():
    assert adapter() is None
    ref, scale = adapter(adapter="acme")
    assert (ref.brand, ref.alias, ref.version, scale) == ("acme", "production", None, 1.0)
    ref, scale = adapter(adapter="acme@staging", adapter_scale=0)
    assert (ref.alias, scale) == ("staging", 0.0)
    ref, scale = adapter(adapter="acme:3", adapter_scale=LIMITS.max_adapter_scale)
    assert (ref.version, scale) == (3, LIMITS.max_adapter_scale)
    assert check(adapter="acme").adapter is None  # resolved later, by the ingress


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"adapter": "acme:"}, "adapter", "from 1 to 2147483647"),
        # A version no registry can hold: refused here, without a registry call.
        ({"adapter": "acme:99999999999999999999"}, "adapter", "from 1 to 2147483647"),
        ({"adapter": "acme:2147483648"}, "adapter", "from 1 to 2147483647"),
        ({"adapter": "acme:" + "9" * 5000}, "adapter", "from 1 to 2147483647"),
        ({"adapter": "ACME"}, "adapter", "brand 'ACME' is invalid"),
        ({"adapter": "acme@v1"}, "adapter", "reserved"),
        ({"adapter": "acme@x@y"}, "adapter", "malformed"),
        ({"adapter": "acme", "adapter_scale": -1}, "adapter_scale", "between 0 and 2.0"),
        ({"adapter": "acme", "adapter_scale": float("nan")}, "adapter_scale", "between 0"),
        ({"adapter": "acme", "adapter_scale": 2.01}, "adapter_scale", "got 2.01"),
        ({"adapter_scale": 1.0}, "adapter_scale", "no adapter is named"),
    ],
)
def test_bad_adapter_fields_name_the_field_and_the_rule(fields, param, says):
    with pytest.raises(InvalidField) as e:
        check(**fields)
    assert e.value.param == param and e.value.status == 400
    assert says in e.value.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "a", "n": True}, "n"),
        ({"prompt": "a", "n": 1.0}, "n"),
        ({"prompt": "a", "n": "2"}, "n"),
        ({"prompt": "a", "seed": False}, "seed"),
        ({"prompt": "a", "guidance_scale": True}, "guidance_scale"),
        ({"prompt": 5}, "prompt"),
    ],
)
def test_bodies_are_strict_no_type_coercion(body, param):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        ImageGenerationRequest.model_validate(body)
    assert e.value.errors()[0]["loc"] == (param,)


def test_an_integer_is_still_a_valid_float():
    assert (
        ImageGenerationRequest.model_validate({"prompt": "a", "guidance_scale": 7}).guidance_scale
        == 7
    )


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "size", "adapter", "user", "model"])
def test_lone_surrogates_are_refused_naming_the_field(field):
    from pydantic import ValidationError

    body = {"prompt": "a", field: "x\ud800y"}
    with pytest.raises(ValidationError) as e:
        ImageGenerationRequest.model_validate(body)
    [err] = e.value.errors()
    assert err["loc"] == (field,) and "surrogate" in err["msg"]
