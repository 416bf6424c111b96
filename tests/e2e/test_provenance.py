"""Every image the farm's render route outputs, in PNG, JPEG and WebP, verifies valid and trusted
with the c2pa library against the farm CA that `up` created; a changed pixel fails; the verify
route and `brandfarm verify` report the same."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
from typer.testing import CliRunner

from cluster.cli import app as cli_app
from serve.provenance import RENDER_ASSERTION, verify_image
from serve.signing import trust_anchors_pem
from tests.serve.test_provenance import one_pixel_changed

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def key(farm) -> str:
    return farm.new_tenant("provenance-co")


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_render_route_outputs_are_signed_and_trusted(farm, key, fmt):
    anchors = trust_anchors_pem(farm.settings)
    assert "BEGIN CERTIFICATE" in anchors  # up created the farm CA
    body = {"prompt": "a red circle", "n": 2, "seed": 4, "output_format": fmt}
    if fmt != "png":
        body["output_compression"] = 85
    with farm.http(key) as c:
        inline = c.post("/images/generations", json={**body, "response_format": "b64_json"})
        by_url = c.post("/images/generations", json=body)
    assert inline.status_code == 200, inline.text
    assert by_url.status_code == 200, by_url.text
    images = [base64.b64decode(d["b64_json"]) for d in inline.json()["data"]]
    for d in by_url.json()["data"]:
        got = httpx.get(d["url"], timeout=60)
        assert got.headers["content-type"] == f"image/{fmt}"
        images.append(got.content)
    ext = {"png": "png", "jpeg": "jpg", "webp": "webp"}[fmt]
    render_id = by_url.json()["id"]
    assert f"tenants/provenance-co/renders/{render_id}/1.{ext}" in farm.all_objects()
    for i, data in enumerate(images):
        report = verify_image(data, anchors)
        assert report["format"] == fmt and report["valid"] and report["trusted"], report
        render = report["manifest"]["claims"]["assertions"][RENDER_ASSERTION]
        assert render["index"] == i % 2 and render["base_model"] == farm.model.id
        assert report["parameters"]["seed"] == 4 + i % 2


def test_tampered_output_fails_on_the_route_and_the_cli(farm, key, tmp_path):
    with farm.http(key) as c:
        r = c.post(
            "/images/generations", json={"prompt": "a blue square", "response_format": "b64_json"}
        )
        signed = base64.b64decode(r.json()["data"][0]["b64_json"])
        good = c.post("/provenance/verify", files={"file": ("a.png", signed)})
        bad = c.post("/provenance/verify", files={"file": ("b.png", one_pixel_changed(signed))})
    assert good.status_code == 200 and good.json()["valid"] and good.json()["trusted"]
    assert bad.status_code == 200 and not bad.json()["valid"]

    (tmp_path / "good.png").write_bytes(signed)
    (tmp_path / "bad.png").write_bytes(one_pixel_changed(signed))
    ok = CliRunner().invoke(cli_app, ["verify", str(tmp_path / "good.png")], env=farm.cli_env())
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output[ok.output.index("{") :])["trusted"] is True
    failed = CliRunner().invoke(cli_app, ["verify", str(tmp_path / "bad.png")], env=farm.cli_env())
    assert failed.exit_code == 1 and "Invalid" in failed.output
