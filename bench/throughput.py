"""Batched rendering through the real HTTP stack: images/s and latency at 1, 4 and 16 clients.

Starts a real embedded farm (object store, MLflow, Ray Serve; one replica) in a temporary
folder, registers `--brands` random-weight LoRA adapters for one tenant, and sends a Zipf(1.1)
mix over those brands plus the base model from N concurrent HTTP clients, on the built-in
model. Measured in the same run:

- the farm with batching (`max_batch_images`, default 8, and the other settings' defaults),
- (a) the same farm redeployed with `max_batch_images=1` (one image at a time, as before),
- (b) the ceiling: the engine alone, in-process, rendering full batches with one adapter.

Prints images/s and p50/p95 latency per level, and the ratios the issue sets targets for
(16 clients: >= 1.8x (a) and >= 0.85x (b); 1 client: p50 <= 1.1x (a)).

    python bench/throughput.py [--brands 8] [--requests 48] [--steps 20] [--clients 1 4 16]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.hotswap import PROMPT, deploy, register_brands, zipf_brands  # noqa: E402
from cluster.processes import free_ports  # noqa: E402
from cluster.stack import LocalStack  # noqa: E402
from registry.settings import Settings  # noqa: E402
from registry.storage import ObjectStore  # noqa: E402
from registry.tenants import TenantDirectory  # noqa: E402
from serve.adapter_cache import AdapterFetcher, parse_weights  # noqa: E402
from serve.engine import DiffusionEngine  # noqa: E402
from serve.protocol import RenderJob  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--brands", type=int, default=8, help="Brand adapters (plus the base model).")
    p.add_argument("--requests", type=int, default=48, help="Renders timed per level.")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="Levels.")
    p.add_argument("--steps", type=int, default=20, help="Denoising steps per image.")
    p.add_argument("--max-batch", type=int, default=8, help="max_batch_images when batching.")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank of each adapter.")
    return p.parse_args()


def latency_stats(seconds: list[float]) -> tuple[float, float]:
    return float(np.percentile(seconds, 50)), float(np.percentile(seconds, 95))


def farm_level(settings: Settings, key: str, specs, picks, clients: int, steps: int) -> dict:  # noqa: ANN001
    """images/s, p50, p95 of `picks` (index into specs; len(specs) = the base model)."""

    def one(i: int, pick: int) -> float:
        body = {"prompt": PROMPT, "steps": steps, "seed": i, "response_format": "b64_json"}
        if pick < len(specs):
            body["adapter"] = specs[pick].brand
        started = time.perf_counter()
        with httpx.Client(timeout=900) as http:
            r = http.post(
                f"{settings.api_url}/v1/images/generations",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
            )
        r.raise_for_status()
        return time.perf_counter() - started

    started = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, range(len(picks)), picks))
    wall = time.perf_counter() - started
    p50, p95 = latency_stats(latencies)
    return {"images_s": len(picks) / wall, "p50_s": p50, "p95_s": p95}


def ceiling(model, spec, weights, steps: int, batch: int, n: int) -> float:  # noqa: ANN001
    """images/s of the engine alone rendering full batches of one adapter."""
    engine = DiffusionEngine.load(model, "cpu", 1, max_batch_images=batch)
    side = model.native_size
    job = RenderJob(PROMPT, None, side, side, steps, model.default_guidance_scale, (1,), spec)
    engine.generate(job, weights)  # load the adapter, warm up
    started = time.perf_counter()
    futures = [engine.submit(dataclasses.replace(job, seeds=(i,)), weights) for i in range(n)]
    for f in futures:
        f.result()
    rate = n / (time.perf_counter() - started)
    engine.close()
    return rate


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        names = Settings.service_port_fields()
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        settings = Settings(
            state_dir=Path(tmp) / "state",
            ray_num_cpus=4,
            max_inflight_per_tenant=64,
            max_adapters_per_replica=args.brands,
            max_batch_images=args.max_batch,
            max_ongoing_requests=max(16, max(args.clients)),
            **ports,
        )
        stack = LocalStack(settings)
        settings = stack.up()
        try:
            model = stack.base_model(settings)
            tenant = f"bench-{uuid.uuid4().hex[:6]}"
            key = TenantDirectory.from_url(settings.resolved_database_url).create_tenant(tenant).key
            print(f"registering {args.brands} adapters ...", flush=True)
            specs = register_brands(settings, model, tenant, args.brands, args.rank, Path(tmp))
            warm = list(range(args.brands + 1))  # every brand and the base once, untimed
            results: dict[str, dict[int, dict]] = {}
            for label, batch in (("batched", args.max_batch), ("one-at-a-time (a)", 1)):
                if label != "batched":
                    deploy(stack, settings.model_copy(update={"max_batch_images": batch}), model)
                farm_level(settings, key, specs, warm, 1, args.steps)
                results[label] = {}
                for clients in args.clients:
                    picks = zipf_brands(args.brands + 1, args.requests, seed=clients)
                    print(f"{label}: {clients} clients ...", flush=True)
                    level = farm_level(settings, key, specs, picks, clients, args.steps)
                    results[label][clients] = level
            store = ObjectStore.from_settings(settings, bucket=settings.mlflow_artifacts_bucket)
            weights = parse_weights(specs[0], AdapterFetcher(store).fetch(specs[0]))
            print("ceiling (b): the engine alone, full batches, one adapter ...", flush=True)
            top = ceiling(model, specs[0], weights, args.steps, args.max_batch, args.requests)
        finally:
            stack.down()

    print(f"\nbuilt-in model, {args.steps} steps, Zipf(1.1) over {args.brands} brands + base")
    print(f"{'clients':>7} | {'mode':<18} | {'images/s':>8} | {'p50 s':>6} | {'p95 s':>6}")
    for clients in args.clients:
        for label, levels in results.items():
            r = levels[clients]
            print(
                f"{clients:>7} | {label:<18} | {r['images_s']:8.2f} | "
                f"{r['p50_s']:6.2f} | {r['p95_s']:6.2f}"
            )
    print(f"ceiling (b): {top:.2f} images/s")
    hi, lo = max(args.clients), min(args.clients)
    batched, single = results["batched"], results["one-at-a-time (a)"]
    print(
        f"{hi} clients: {batched[hi]['images_s'] / single[hi]['images_s']:.2f}x (a) "
        f"(target >= 1.8), {batched[hi]['images_s'] / top:.2f}x (b) (target >= 0.85); "
        f"{lo} client p50: {batched[lo]['p50_s'] / single[lo]['p50_s']:.2f}x (a) (target <= 1.1)"
    )


if __name__ == "__main__":
    main()
