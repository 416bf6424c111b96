"""Per-request adapter hot-swap through the whole farm: real Ray Serve (multiplexed replica),
real MLflow registry, real object store.

The adapters are real diffusers LoRA files with random weights (`finetune.synthetic_lora`),
registered like a fine-tune job registers its adapter. The farm runs one replica holding two
adapters in its pipeline and a 4 MiB host tier (tests/conftest.py), so a handful of brands
exercises every tier.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
import psutil
import pytest
from mlflow import MlflowClient
from PIL import Image

from finetune.synthetic_lora import register_random_lora
from registry.adapters import PRODUCTION, AdapterRegistry, AdapterVersion
from registry.base_models import TINY_RANDOM, ensure_base_model, load_pipeline
from registry.storage import ObjectStore

pytestmark = pytest.mark.e2e

PROMPT = "a red circle on a blue background"


@dataclass
class Hotswap:
    farm: object
    registry: AdapterRegistry
    mlflow: MlflowClient
    tenant: str
    key: str
    root: Path
    unet: object  # the base model's UNet, to make adapters for

    def register(
        self,
        brand: str,
        seed: int,
        *,
        rank: int = 4,
        unet=None,
        alias: str | None = PRODUCTION,
    ) -> AdapterVersion:
        """Register a new version of `brand` (random LoRA `seed`) and point `alias` at it."""
        return register_random_lora(
            self.registry,
            self.mlflow,
            self.tenant,
            brand,
            self.farm.model,
            unet or self.unet,
            self.root / f"{self.tenant}-{brand}-{seed}-{rank}",
            seed=seed,
            rank=rank,
            alias=alias,
        )

    def post(self, key: str | None = None, headers: dict | None = None, **body) -> httpx.Response:
        body = {"prompt": PROMPT, "seed": 5, "steps": 6, "response_format": "b64_json", **body}
        with self.farm.http(key or self.key) as http:
            return http.post("/images/generations", json=body, headers=headers or {})

    def render(self, **body) -> tuple[np.ndarray, dict | None]:
        r = self.post(**body)
        assert r.status_code == 200, r.text
        payload = r.json()
        return pixels(payload["data"][0]["b64_json"]), payload["adapter"]


def pixels(b64: str) -> np.ndarray:
    import base64

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


@pytest.fixture(scope="module")
def hs(farm, tmp_path_factory) -> Hotswap:
    tenant = f"hs-{uuid.uuid4().hex[:6]}"
    key = farm.new_tenant(tenant)
    unet = load_pipeline(farm.model, "cpu").unet
    return Hotswap(
        farm,
        AdapterRegistry(farm.settings.resolved_mlflow_uri),
        MlflowClient(farm.settings.resolved_mlflow_uri),
        tenant,
        key,
        tmp_path_factory.mktemp("hotswap"),
        unet,
    )


@pytest.fixture(scope="module")
def brands(hs) -> list[str]:
    """Four brands, version 1 each, production alias set."""
    names = [f"brand-{i}" for i in range(4)]
    for i, name in enumerate(names):
        hs.register(name, seed=100 + i)
    return names


def replica_pid(farm) -> int:
    """The pid of the farm's one diffusion replica, from Ray's state API."""
    from ray.util.state import list_actors

    alive = [
        a
        for a in list_actors(
            address=farm.settings.ray_dashboard_url,
            filters=[("state", "=", "ALIVE")],
            detail=True,
            limit=1000,
        )
        if "DiffusionReplica" in (a.name or "")
    ]
    assert len(alive) == 1, alive
    return alive[0].pid


# Ray exports a process's metrics every `metrics_report_interval_ms` (10 s by default).
RAY_METRICS_EXPORT_S = 10.0


def settled_metrics(farm, timeout_s: float = 120) -> dict[tuple[str, str], float]:
    """The counters once Ray has exported everything counted so far: unchanged for longer than
    Ray's export period (two equal reads a few seconds apart can both precede an export)."""
    deadline = time.monotonic() + timeout_s
    last, since = scrape(farm), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(3)
        now = scrape(farm)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > RAY_METRICS_EXPORT_S + 3:
            return now
    raise AssertionError("the farm's metrics kept changing with no requests in flight")


def scrape(farm) -> dict[tuple[str, str], float]:
    """The farm's counters from Ray's Prometheus endpoint: (metric, tier/source) -> value."""
    url = f"http://{farm.settings.host}:{farm.settings.ray_metrics_export_port}/metrics"
    text = httpx.get(url, timeout=30).text
    out: dict[tuple[str, str], float] = {}
    line = re.compile(r"^(ray_brandfarm_\w+?)(?:_total)?\{([^}]*)\} ([0-9.e+-]+)$")
    for row in text.splitlines():
        m = line.match(row)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        label = labels.get("tier") or labels.get("source") or labels.get("tenant") or ""
        key = (m.group(1), label)
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


# --- pixel identity ---------------------------------------------------------------------------


def test_same_adapter_same_pixels_from_every_tier_and_scale_zero_is_base(hs, brands):
    a, b, c, d = brands
    fresh, used = hs.render(adapter=a)  # first use on this replica: fetched from the store
    assert used == {"ref": f"{a}@production", "brand": a, "version": 1, "scale": 1.0}
    again, _ = hs.render(adapter=a)  # resident in the pipeline
    other, _ = hs.render(adapter=b)  # switch away...
    after_other, _ = hs.render(adapter=a)  # ...and back (still resident)
    hs.render(adapter=c)
    hs.render(adapter=d)  # two others: `a` left the pipeline (2 per replica)
    from_host, _ = hs.render(adapter=a)  # back from the host-RAM tier
    for image in (again, after_other, from_host):
        assert np.array_equal(image, fresh)
    assert not np.array_equal(other, fresh)

    base, none = hs.render()
    assert none is None
    assert not np.array_equal(base, fresh)
    zero, used = hs.render(adapter=a, adapter_scale=0)
    assert used["scale"] == 0.0
    assert np.array_equal(zero, base)
    half, _ = hs.render(adapter=a, adapter_scale=0.5)
    assert not np.array_equal(half, base) and not np.array_equal(half, fresh)
    by_version, used = hs.render(adapter=f"{a}:1")
    assert used["ref"] == f"{a}:1" and np.array_equal(by_version, fresh)


def test_openai_client_names_the_adapter_through_extra_body(hs, brands):
    client = openai.OpenAI(base_url=hs.farm.api, api_key=hs.key, max_retries=0, timeout=300)
    resp = client.images.generate(
        prompt=PROMPT,
        response_format="b64_json",
        extra_body={"adapter": brands[1], "adapter_scale": 0.8, "seed": 3, "steps": 4},
    )
    assert resp.model_extra["adapter"] == {
        "ref": f"{brands[1]}@production",
        "brand": brands[1],
        "version": 1,
        "scale": 0.8,
    }
    img = Image.open(io.BytesIO(__import__("base64").b64decode(resp.data[0].b64_json)))
    assert img.text["adapter"] == f"{brands[1]}:1" and img.text["adapter_scale"] == "0.8"


def test_concurrent_mixed_adapters_each_match_their_reference(hs, brands):
    jobs = [(brand, seed) for seed in (21, 22) for brand in (*brands[:3], None)]
    reference = {}
    for brand, seed in jobs:  # one at a time: nothing else in flight
        extra = {"adapter": brand} if brand else {}
        reference[brand, seed], _ = hs.render(seed=seed, **extra)

    def one(job):
        brand, seed = job
        extra = {"adapter": brand} if brand else {}
        image, used = hs.render(seed=seed, **extra)
        return job, image, used

    before = settled_metrics(hs.farm)
    interleaved = jobs * 2  # 16 requests, 4 adapters (base included), interleaved
    with cf.ThreadPoolExecutor(8) as pool:  # 8 = the tenant's in-flight limit
        results = list(pool.map(one, interleaved))
    for (brand, seed), image, used in results:
        assert (used or {}).get("brand") == brand
        assert np.array_equal(image, reference[brand, seed]), (brand, seed)
    distinct = {reference[job].tobytes() for job in jobs}
    assert len(distinct) == len(jobs)  # every adapter really changes the image
    # ...and they were rendered in shared batches (max_batch_images, default 8), not one by one.
    after = settled_metrics(hs.farm)

    def grew(name: str) -> float:
        return after.get((name, ""), 0.0) - before.get((name, ""), 0.0)

    steps, rows = grew("ray_brandfarm_batch_size_count"), grew("ray_brandfarm_batch_size_sum")
    assert steps > 0 and rows / steps > 1.5, (rows, steps)
    assert grew("ray_brandfarm_rows_joined_mid_batch") > 0


# --- promotion and rollback -------------------------------------------------------------------


def wait_for_version(hs, brand: str, version: int, timeout_s: float) -> tuple[np.ndarray, float]:
    started = time.monotonic()
    while True:
        image, used = hs.render(adapter=brand)
        if used["version"] == version:
            return image, time.monotonic() - started
        assert time.monotonic() - started < timeout_s, f"still version {used['version']}"
        time.sleep(0.2)


def test_promotion_and_rollback_reach_serving_within_the_ttl(hs):
    brand = "promo"
    v1 = hs.register(brand, seed=300)
    first, used = hs.render(adapter=brand)
    assert used["version"] == v1.version == 1
    v2 = hs.register(brand, seed=301, alias=None)  # a new version, at `staging` only
    staged, used = hs.render(adapter=f"{brand}@staging")
    assert used["version"] == v2.version == 2

    ttl = hs.farm.settings.adapter_resolve_ttl_s
    with hs.farm.http(hs.key) as http:  # promote through the API: no restart, no redeploy
        r = http.post(f"/adapters/{brand}/aliases/production", json={"version": 2})
        assert r.status_code == 200, r.text
    promoted, took = wait_for_version(hs, brand, 2, timeout_s=ttl + 5)
    print(f"promotion seen after {took:.2f}s (TTL {ttl}s)")
    assert np.array_equal(promoted, staged) and not np.array_equal(promoted, first)

    with hs.farm.http(hs.key) as http:  # roll back
        assert (
            http.post(f"/adapters/{brand}/aliases/production", json={"version": 1}).status_code
            == 200
        )
    rolled_back, took = wait_for_version(hs, brand, 1, timeout_s=ttl + 5)
    print(f"rollback seen after {took:.2f}s (TTL {ttl}s)")
    assert np.array_equal(rolled_back, first)


# --- cache behaviour --------------------------------------------------------------------------


def simulate_tiers(sequence: list[str], nbytes: dict[str, int], slots: int, budget: int):
    """Expected (pipeline hits, pipeline misses, host hits, host misses) of one replica with an
    LRU of `slots` adapters in the pipeline over a host LRU of `budget` bytes."""
    pipeline: OrderedDict[str, None] = OrderedDict()
    host: OrderedDict[str, int] = OrderedDict()
    counts = [0, 0, 0, 0]
    for brand in sequence:
        if brand in pipeline:
            counts[0] += 1
            pipeline.move_to_end(brand)
            continue
        counts[1] += 1
        if brand in host:
            counts[2] += 1
            host.move_to_end(brand)
        else:
            counts[3] += 1
            while host and sum(host.values()) + nbytes[brand] > budget:
                host.popitem(last=False)
            if nbytes[brand] <= budget:
                host[brand] = nbytes[brand]
        if len(pipeline) >= slots:
            pipeline.popitem(last=False)
        pipeline[brand] = None
    return tuple(counts)


def test_many_brands_keep_memory_flat_and_metrics_count_every_tier(hs):
    from safetensors.torch import load_file

    settings = hs.farm.settings
    big = [f"big-{i}" for i in range(6)]  # rank 32: ~1.1 MiB parsed; 3 fit the 4 MiB tier
    versions = {b: hs.register(b, seed=400 + i, rank=32) for i, b in enumerate(big)}
    nbytes = {}
    for b in big:
        folder = hs.root / f"{hs.tenant}-{b}-{400 + big.index(b)}-32"
        state = load_file(folder / "pytorch_lora_weights.safetensors")
        nbytes[b] = sum(t.numel() * t.element_size() for t in state.values())
    assert all(v.version == 1 for v in versions.values())

    rng = np.random.default_rng(7)
    weights = 1.0 / np.arange(1, len(big) + 1) ** 1.1  # Zipf-like: a few hot brands
    sequence = [big[i] for i in rng.choice(len(big), size=160, p=weights / weights.sum())]

    def run(brands: list[str]) -> None:
        for b in brands:
            r = hs.post(adapter=b, steps=1, size="8x8")
            assert r.status_code == 200, r.text

    pid = replica_pid(hs.farm)
    proc = psutil.Process(pid)
    run(sequence[:40])  # warm up: every brand loaded at least once, allocator settled
    before_metrics = settled_metrics(hs.farm)
    rss_start = proc.memory_info().rss
    run(sequence[40:])
    rss_end = proc.memory_info().rss
    growth_mb = (rss_end - rss_start) / 2**20
    print(f"replica RSS {rss_start / 2**20:.0f} -> {rss_end / 2**20:.0f} MiB over 120 requests")
    # A leak of one adapter per miss would be ~1-2 MiB each (74 pipeline and 47 host misses).
    assert growth_mb < 40, f"RSS grew {growth_mb:.0f} MiB"

    # What the replica must have counted in the measured part, replayed on the same LRUs.
    warm = simulate_tiers(sequence[:40], nbytes, settings.max_adapters_per_replica, 4 * 2**20)
    total = simulate_tiers(sequence, nbytes, settings.max_adapters_per_replica, 4 * 2**20)
    expected = tuple(t - w for t, w in zip(total, warm, strict=True))
    assert expected[0] > 0 and expected[1] > 0 and expected[2] > 0 and expected[3] > 0, expected
    names = [
        ("ray_brandfarm_adapter_cache_hits", "pipeline"),
        ("ray_brandfarm_adapter_cache_misses", "pipeline"),
        ("ray_brandfarm_adapter_cache_hits", "host"),
        ("ray_brandfarm_adapter_cache_misses", "host"),
    ]
    deadline = time.monotonic() + 60  # Ray exports metrics every few seconds
    while True:
        after = scrape(hs.farm)
        got = tuple(after.get(n, 0) - before_metrics.get(n, 0) for n in names)
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(2)
    print(f"tier counts (pipeline hit/miss, host hit/miss): {got}")
    assert got == expected
    assert after.get(("ray_brandfarm_renders", hs.tenant), 0) >= 120
    assert any(k[0].startswith("ray_brandfarm_adapter_load_seconds") for k in after)
    assert ("ray_brandfarm_replica_queue_depth", "") in after


# --- bad input --------------------------------------------------------------------------------


def test_unknown_or_foreign_adapters_are_404_with_one_answer(hs, brands):
    other_key = hs.farm.new_tenant(f"hs-other-{uuid.uuid4().hex[:6]}")
    mine = brands[0]
    objects_before = hs.farm.all_objects()

    def error(ref: str, key: str | None = None) -> dict:
        r = hs.post(key=key, adapter=ref)
        assert r.status_code == 404, r.text
        err = r.json()["error"]
        assert err["code"] == "adapter_not_found" and err["param"] == "adapter"
        return err

    foreign = error(mine, other_key)  # exists, but for another tenant
    missing = error("no-such-brand", other_key)
    assert foreign["message"].replace(mine, "X") == missing["message"].replace("no-such-brand", "X")
    error(f"{mine}:99")  # no such version
    error(f"{mine}@canary")  # no such alias
    error(f"{mine}@staging", other_key)
    error(f"{mine}:1", other_key)
    assert hs.farm.all_objects() == objects_before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"adapter": "Acme"}, "adapter"),
        ({"adapter": "acme@"}, "adapter"),
        ({"adapter": "@production"}, "adapter"),
        ({"adapter": "acme:0"}, "adapter"),
        ({"adapter": "acme:v2"}, "adapter"),
        ({"adapter": "acme@latest"}, "adapter"),
        ({"adapter": "a" * 80}, "adapter"),
        ({"adapter": 7}, "adapter"),
        ({"adapter": "acme", "adapter_scale": -0.1}, "adapter_scale"),
        ({"adapter": "acme", "adapter_scale": 2.5}, "adapter_scale"),
        ({"adapter": "acme", "adapter_scale": "strong"}, "adapter_scale"),
        ({"adapter_scale": 0.5}, "adapter_scale"),
    ],
)
def test_malformed_adapter_or_scale_is_400_naming_the_field(hs, body, field):
    before = hs.farm.all_objects()
    r = hs.post(**body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field, err
    assert hs.farm.all_objects() == before


def test_client_multiplex_header_is_ignored(hs, brands):
    base, _ = hs.render()
    foreign = f"someone-else/{brands[0]}:1"
    image, used = hs.render(headers={"serve_multiplexed_model_id": foreign})
    assert used is None and np.array_equal(image, base)
    own, used = hs.render(adapter=brands[1], headers={"serve_multiplexed_model_id": foreign})
    assert used["brand"] == brands[1]


def test_corrupt_adapter_is_a_5xx_not_cached_and_others_unaffected(hs, brands):
    version = hs.register("corrupt", seed=500)
    uri = hs.registry.weights_uri(version)
    key = uri.split(":", 1)[1].lstrip("/")
    artifacts = ObjectStore.from_settings(
        hs.farm.settings, bucket=hs.farm.settings.mlflow_artifacts_bucket
    )
    good = artifacts.get_bytes(key)
    artifacts.put_bytes(key, good[:-64] + b"\0" * 64)  # damaged after registration
    try:
        r = hs.post(adapter="corrupt")
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["code"] == "adapter_corrupt" and "sha256" in err["message"]
        assert err["type"] == "server_error"
        ok, used = hs.render(adapter=brands[0])  # others are unaffected
        assert used["brand"] == brands[0]
    finally:
        artifacts.put_bytes(key, good)
    image, used = hs.render(adapter="corrupt")  # the failure was not cached
    assert used["brand"] == "corrupt"


def test_adapter_for_another_base_model_is_a_5xx_and_others_unaffected(hs, brands):
    other_base = ensure_base_model(TINY_RANDOM, hs.farm.settings.state_path / "models", 1024)
    other_unet = load_pipeline(other_base, "cpu").unet
    hs.register("misfit", seed=600, unet=other_unet)  # a LoRA with the other UNet's shapes
    for _ in range(2):  # the second attempt fails the same way: nothing half-loaded stays
        r = hs.post(adapter="misfit")
        assert r.status_code == 500, r.text
        assert r.json()["error"]["code"] == "adapter_incompatible"
    base, _ = hs.render()
    fine, used = hs.render(adapter=brands[0])
    assert used["brand"] == brands[0] and not np.array_equal(fine, base)
