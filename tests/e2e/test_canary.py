"""A canary through the whole farm: real HTTP ingress, Ray Serve replica, MLflow registry (the
challenger alias and share tag), farm database (usage rows) and Prometheus metrics.

Versions are random LoRAs (`finetune.synthetic_lora`) registered as a fine-tune registers its
adapter. Renders are one step at the model's native size, so 200 of them stay cheap.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import math
import re
import uuid
from dataclasses import dataclass

import httpx
import pytest
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from cluster.cli import app as cli_app
from finetune.synthetic_lora import register_random_lora
from registry.adapters import PRODUCTION, AdapterRef, AdapterRegistry
from registry.base_models import load_pipeline
from registry.canary import CHALLENGER, SHARE_TAG, Canary
from serve.image_formats import read_parameters
from tests.polling import wait_for

pytestmark = pytest.mark.e2e

BRAND = "logo"
SHARE = 0.1
RENDERS = 200


@dataclass
class Brand:
    farm: object
    registry: AdapterRegistry
    tenant: str
    key: str
    other_key: str  # another tenant's

    def http(self, key: str | None = None) -> httpx.Client:
        return self.farm.http(key or self.key)

    def render(self, adapter: str, http: httpx.Client | None = None) -> dict:
        body = {
            "prompt": "a red circle",
            "adapter": adapter,
            "steps": 1,
            "seed": 3,
            "response_format": "b64_json",
        }
        if http is None:
            with self.http() as c:
                r = c.post("/images/generations", json=body)
        else:
            r = http.post("/images/generations", json=body)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="module")
def brand(farm, tmp_path_factory) -> Brand:
    """BRAND with versions 1 (production), 2 and 3; no render has named it yet."""
    tenant = f"canary-{uuid.uuid4().hex[:6]}"
    key, other = farm.new_tenant(tenant), farm.new_tenant(f"canary-other-{uuid.uuid4().hex[:6]}")
    registry = AdapterRegistry(farm.settings.resolved_mlflow_uri)
    client = MlflowClient(farm.settings.resolved_mlflow_uri)
    unet = load_pipeline(farm.model, "cpu").unet
    root = tmp_path_factory.mktemp("canary")
    for seed, alias in ((1, PRODUCTION), (2, None), (3, None)):
        register_random_lora(
            registry, client, tenant, BRAND, farm.model, unet, root / f"v{seed}", seed=seed,
            alias=alias,
        )  # fmt: skip
    return Brand(farm, registry, tenant, key, other)


def png_adapter(b64: str) -> str | None:
    """The adapter the PNG's own metadata names (`brand:version`)."""
    return (read_parameters(Image.open(io.BytesIO(base64.b64decode(b64)))) or {}).get("adapter")


def binomial_bounds(n: int, p: float, tail: float = 1e-4) -> tuple[int, int]:
    """The central interval holding all but `tail` of Binomial(n, p) on each side."""
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    low, acc = 0, 0.0
    while acc + pmf[low] < tail:
        acc += pmf[low]
        low += 1
    high, acc = n, 0.0
    while acc + pmf[high] < tail:
        acc += pmf[high]
        high -= 1
    return low, high


def adapter_renders_metric(farm, tenant: str) -> dict[tuple[str, str], float]:
    """(version, canary role) -> brandfarm_adapter_renders of `tenant`, from Ray's endpoint."""
    url = f"http://{farm.settings.host}:{farm.settings.ray_metrics_export_port}/metrics"
    out: dict[tuple[str, str], float] = {}
    for row in httpx.get(url, timeout=30).text.splitlines():
        m = re.match(r"^ray_brandfarm_adapter_renders(?:_total)?\{([^}]*)\} ([0-9.e+-]+)$", row)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("tenant") == tenant:
            key = (labels["version"], labels["canary"])
            out[key] = out.get(key, 0.0) + float(m.group(2))
    return out


def test_a_10_percent_canary_serves_about_10_percent_of_200_renders(brand: Brand) -> None:
    with brand.http() as c:
        r = c.put(f"/adapters/{BRAND}/canary", json={"version": 2, "share": SHARE})
        assert r.status_code == 200, r.text
        started = r.json()
        assert (started["share"], started["status"]) == (SHARE, "running")
        assert (started["champion"]["version"], started["challenger"]["version"]) == (1, 2)
    # Operators see it in MLflow: the challenger alias and the share tag on the model.
    model = brand.registry.client.get_registered_model(f"{brand.tenant}.{BRAND}")
    assert model.aliases[CHALLENGER] == "2" and float(model.tags[SHARE_TAG]) == SHARE

    # Bare and explicit production references alike, a few at a time through the HTTP stack.
    refs = [BRAND if i % 2 else f"{BRAND}@production" for i in range(RENDERS)]
    with brand.http() as c, cf.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda ref: brand.render(ref, c), refs))
    canary = Canary(challenger=2, share=SHARE)
    used = []
    for answer in answers:
        adapter = answer["adapter"]
        # The version is the one the render id hashes to, the response names it and its role,
        # and so does the PNG's own metadata.
        expected, role = canary.assign(answer["id"], BRAND, champion=1)
        assert (adapter["version"], adapter["canary"]) == (expected, role), answer["id"]
        assert png_adapter(answer["data"][0]["b64_json"]) == f"{BRAND}:{expected}"
        used.append(expected)
    challengers = used.count(2)
    low, high = binomial_bounds(RENDERS, SHARE)
    print(f"canary split: {challengers} of {RENDERS} renders on the challenger ({low}..{high})")
    assert low <= challengers <= high

    # Pinned references are never split.
    for ref, version in ((f"{BRAND}:1", 1), (f"{BRAND}:2", 2), (f"{BRAND}@staging", 3)):
        adapter = brand.render(ref)["adapter"]
        assert adapter["version"] == version and "canary" not in adapter, adapter

    # Async renders are assigned by their own render id, at acceptance.
    with brand.http() as c:
        queued = [
            c.post("/renders", json={"prompt": "a red circle", "adapter": BRAND, "steps": 1})
            for _ in range(6)
        ]
        assert all(q.status_code < 300 for q in queued), [q.text for q in queued]
        ids = [q.json()["id"] for q in queued]
        done: dict[str, dict] = {}

        def finished() -> bool:
            for rid in ids:
                if rid not in done:
                    got = c.get(f"/renders/{rid}").json()
                    if got["status"] in ("succeeded", "failed", "cancelled"):
                        done[rid] = got
            return len(done) == len(ids)

        wait_for(finished, 300, "the queued renders to finish")
    for rid, got in done.items():
        assert got["status"] == "succeeded", got
        assert got["adapter"]["version"] == canary.assign(rid, BRAND, champion=1)[0]
        used.append(got["adapter"]["version"])

    # Durable per-version counts: GET /v1/adapters and the canary's own view agree with what
    # the renders said (the pinned renders count toward their versions too).
    counts = {1: used.count(1) + 1, 2: used.count(2) + 1, 3: 1}
    with brand.http() as c:
        listed = c.get("/adapters").json()["data"]
        view = c.get(f"/adapters/{BRAND}/canary").json()
    [ours] = [b for b in listed if b["brand"] == BRAND]
    assert {v["version"]: v["renders"] for v in ours["versions"]} == counts
    assert {v["version"]: v["images"] for v in ours["versions"]} == counts
    assert (view["champion"]["renders"], view["challenger"]["renders"]) == (counts[1], counts[2])
    assert "challenger" in next(v for v in ours["versions"] if v["version"] == 2)["aliases"]

    # Prometheus: per version and role (one ingress here, so the live counts are all of them).
    want = {
        ("1", "champion"): float(used.count(1)),
        ("2", "challenger"): float(used.count(2)),
        ("1", "-"): 1.0,
        ("2", "-"): 1.0,
        ("3", "-"): 1.0,
    }
    wait_for(
        lambda: adapter_renders_metric(brand.farm, brand.tenant) == want,
        90,
        f"brandfarm_adapter_renders to reach {want}",
        every_s=2,
    )


def test_archiving_the_challenger_is_refused_while_the_canary_runs(brand: Brand) -> None:
    with brand.http() as c:
        r = c.delete(f"/adapters/{BRAND}/versions/2")
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "adapter_version_in_use"
    assert CHALLENGER in r.json()["error"]["message"]
    assert brand.registry.get(brand.tenant, BRAND, 2).archived_at is None


def test_bad_canary_input_is_a_400_naming_the_field(brand: Brand) -> None:
    path = f"/adapters/{BRAND}/canary"
    cases = [
        ({"version": 2, "share": 1.5}, "share"),
        ({"version": 2, "share": -0.1}, "share"),
        ({"version": 2, "share": "lots"}, "share"),
        ({"version": 2}, "share"),
        ({"version": 0, "share": 0.5}, "version"),
        ({"version": 2, "share": 0.5, "extra": 1}, "extra"),
    ]
    with brand.http() as c:
        for body, param in cases:
            r = c.put(path, json=body)
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["param"] == param, (body, r.text)
        r = c.put("/adapters/Bad_Brand/canary", json={"version": 2, "share": 0.5})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "brand"), r.text
        # The challenger alias belongs to the canary routes.
        r = c.post(f"/adapters/{BRAND}/aliases/{CHALLENGER}", json={"version": 3})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "alias"), r.text
        # The champion cannot challenge itself; a missing version is a 404.
        r = c.put(path, json={"version": 1, "share": 0.5})
        assert (r.status_code, r.json()["error"]["code"]) == (409, "canary_conflict"), r.text
        r = c.put(path, json={"version": 99, "share": 0.5})
        assert r.status_code == 404, r.text
        # Nothing changed the running canary.
        assert c.get(path).json()["challenger"]["version"] == 2
        assert c.get(path).json()["share"] == SHARE


def test_another_tenants_brand_reads_as_missing(brand: Brand) -> None:
    calls = [
        ("GET", f"/adapters/{BRAND}/canary", None),
        ("PUT", f"/adapters/{BRAND}/canary", {"version": 2, "share": 0.5}),
        ("POST", f"/adapters/{BRAND}/canary/promote", None),
        ("DELETE", f"/adapters/{BRAND}/canary", None),
    ]
    with brand.http(brand.other_key) as other, brand.http() as own:
        for method, path, body in calls:
            theirs = other.request(method, path, json=body)
            missing = own.request(method, path.replace(BRAND, "no-such-brand"), json=body)
            assert theirs.status_code == missing.status_code == 404, (path, theirs.text)
            assert theirs.json()["error"] == {
                **missing.json()["error"],
                "message": missing.json()["error"]["message"].replace("no-such-brand", BRAND),
            }
    assert brand.registry.canary(brand.tenant, BRAND).challenger == 2  # untouched


def test_promote_then_drop_each_end_the_canary_in_one_call(brand: Brand) -> None:
    path = f"/adapters/{BRAND}/canary"

    def cli(*args: str) -> str:
        argv = ["adapters", "canary", *args]
        result = CliRunner().invoke(cli_app, argv, env=brand.farm.cli_env(brand.key))
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    with brand.http() as c:
        r = c.post(f"{path}/promote")
        assert r.status_code == 200, r.text
        assert (r.json()["status"], r.json()["challenger"]["version"]) == ("promoted", 2)
        assert c.get(path).status_code == 404
        production = brand.registry.resolve(brand.tenant, AdapterRef(BRAND, alias=PRODUCTION))
        assert production.version == 2
        # The next renders of production use the promoted version only (within the TTL).
        wait_for(
            lambda: brand.render(BRAND, c)["adapter"] == {
                "ref": f"{BRAND}@production", "brand": BRAND, "version": 2, "scale": 1.0
            },
            10,
            "production renders to use version 2",
        )  # fmt: skip
        # A second canary, through the CLI, dropped: the champion keeps production.
        started = cli("start", BRAND, "3", "--share", "1")
        assert "challenger version 3 at 100%" in started, started
        wait_for(lambda: brand.render(BRAND, c)["adapter"]["version"] == 3, 10, "share 1.0")
        status = cli("status", BRAND)
        assert "challenger version 3" in status and "champion version 2" in status, status
        assert "production stays version 2" in cli("drop", BRAND)
        assert c.get(path).status_code == 404
        assert c.delete(path).status_code == 404  # nothing left to drop
        assert c.post(f"{path}/promote").status_code == 404
        wait_for(lambda: brand.render(BRAND, c)["adapter"]["version"] == 2, 10, "the drop")
        # No canary points at version 3 any more: with staging moved off it too, it archives.
        assert c.post(f"/adapters/{BRAND}/aliases/staging", json={"version": 2}).status_code == 200
        r = c.delete(f"/adapters/{BRAND}/versions/3")
        assert r.status_code == 200, r.text
    model = brand.registry.client.get_registered_model(f"{brand.tenant}.{BRAND}")
    assert CHALLENGER not in model.aliases and SHARE_TAG not in (model.tags or {})
    assert model.aliases[PRODUCTION] == "2"
