"""Hot-swap costs and mixed-brand throughput, measured side by side in one run.

Starts a real embedded farm (object store, MLflow, Ray Serve; one replica) in a temporary
folder, registers `--brands` adapters (random-weight LoRA files, `finetune.synthetic_lora`) for
one tenant, then measures on the built-in model:

(a) switch costs, each as a fraction of one image's render time, in-process on one engine:
    - activate an adapter already in the pipeline (`set_adapters`, what a switch costs),
    - load one from the host-RAM tier (parsed state dict -> pipeline),
    - load one from the object store (fetch + sha256 + parse + pipeline), reading the same
      MLflow-registered objects the farm reads;
(b) images/s of a mixed workload: `--requests` renders, brands drawn from a Zipf distribution,
    `--clients` concurrent HTTP clients, through the farm, compared with
    - the same engine rendering in-process with a single adapter (no HTTP, no switching), and
    - a naive server: the same farm and workload over HTTP, but its replica fetches, loads and
      unloads the LoRA for every request (no pipeline slots, no host tier), and
    - that naive replica's engine loop in-process (no HTTP), for scale.

    python bench/hotswap.py [--brands 8] [--requests 64] [--clients 4] [--steps 20]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import torch
from mlflow import MlflowClient

from cluster.processes import free_ports
from cluster.stack import LocalStack
from finetune.synthetic_lora import register_random_lora
from registry.adapters import AdapterRegistry
from registry.base_models import load_pipeline
from registry.settings import Settings
from registry.storage import ObjectStore
from registry.tenants import TenantDirectory
from serve.adapter_cache import AdapterFetcher, parse_weights
from serve.engine import DiffusionEngine
from serve.protocol import AdapterSpec, RenderJob

PROMPT = "a red circle on a blue background"


def start_farm(state: Path) -> tuple[LocalStack, Settings]:
    names = Settings.service_port_fields()
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    stack = LocalStack(
        Settings(state_dir=state, ray_num_cpus=4, max_inflight_per_tenant=64, **ports)
    )
    return stack, stack.up()


def register_brands(settings: Settings, model, tenant: str, n: int, rank: int, root: Path):  # noqa: ANN001
    registry = AdapterRegistry(settings.resolved_mlflow_uri)
    mlflow = MlflowClient(settings.resolved_mlflow_uri)
    unet = load_pipeline(model, "cpu").unet
    specs = []
    for i in range(n):
        brand = f"brand-{i}"
        version = register_random_lora(
            registry, mlflow, tenant, brand, model, unet, root / brand, seed=i, rank=rank
        )
        specs.append(
            AdapterSpec(
                tenant,
                brand,
                version.version,
                1.0,
                version.sha256,
                registry.weights_uri(version),
                brand,
            )
        )
    return specs


def timed(fn, repeat: int) -> float:  # noqa: ANN001
    """Median seconds of `fn()` over `repeat` calls."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def switch_costs(model, fetcher: AdapterFetcher, specs, job: RenderJob, repeat: int):  # noqa: ANN001
    """Median seconds of one render and of each way an adapter becomes usable."""
    engine = DiffusionEngine.load(model, "cpu", max_adapters=2)
    render = timed(lambda: engine.generate(job), repeat)
    a, b, c = specs[:3]
    wa, wb, wc = (parse_weights(s, fetcher.fetch(s)) for s in (a, b, c))
    engine.load_adapter(wa, a)
    engine.load_adapter(wb, b)
    names = engine.slot_names()
    flip = iter(range(10**9))

    def activate() -> None:
        engine.pipeline.set_adapters([names[next(flip) % 2]], [1.0])

    resident = timed(activate, repeat * 10)

    def fresh_slot() -> None:  # into a free slot: peft injects new LoRA layers
        engine.unload_adapter(c.model_id)
        started = time.perf_counter()
        engine.load_adapter(wc, c)
        fresh_times.append(time.perf_counter() - started)

    fresh_times: list[float] = []
    for _ in range(repeat):
        fresh_slot()
    fresh = statistics.median(fresh_times)

    full = DiffusionEngine.load(model, "cpu", max_adapters=1)  # every load replaces the slot
    full.load_adapter(wa, a)
    cycle = iter(range(10**9))

    def in_place() -> None:
        spec, weights = ((b, wb), (a, wa))[next(cycle) % 2]
        full.load_adapter(weights, spec)

    hot = timed(in_place, repeat)
    assert full.hotswaps >= repeat

    def from_store() -> None:
        spec = (b, a)[next(cycle) % 2]
        full.load_adapter(parse_weights(spec, fetcher.fetch(spec)), spec)

    store = timed(from_store, repeat)
    return render, resident, hot, fresh, store


def zipf_brands(n_brands: int, n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_brands + 1) ** 1.1
    return list(rng.choice(n_brands, size=n, p=weights / weights.sum()))


def farm_throughput(settings: Settings, key: str, specs, picks, clients: int, steps: int) -> float:  # noqa: ANN001
    def one(i: int) -> None:
        body = {
            "prompt": PROMPT,
            "adapter": specs[i].brand,
            "steps": steps,
            "seed": 1,
            "response_format": "b64_json",
        }
        with httpx.Client(timeout=600) as http:
            r = http.post(
                f"{settings.api_url}/v1/images/generations",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
            )
        r.raise_for_status()

    one(picks[0])  # warm the HTTP path
    started = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, picks))
    return len(picks) / (time.perf_counter() - started)


def naive_replica():  # noqa: ANN201 - a serve.Deployment
    """The farm's replica without adapter caches: every request with an adapter fetches it from
    the object store, checks and parses it, loads it into the pipeline, renders, and unloads it."""
    import asyncio

    from ray import serve

    from serve.app import DiffusionReplica

    class NaiveReplica(DiffusionReplica.func_or_class):
        async def render(self, job: RenderJob):  # noqa: ANN201
            spec = job.adapter
            if spec is None:
                return await asyncio.to_thread(self.engine.generate, job)
            data = await asyncio.to_thread(self.fetcher.fetch, spec)
            weights = await asyncio.to_thread(parse_weights, spec, data)
            try:
                return await asyncio.to_thread(self.engine.generate, job, weights)
            finally:
                await asyncio.to_thread(self.engine.unload_adapter, spec.model_id)

    return serve.deployment(name="DiffusionReplica")(NaiveReplica)


def deploy(stack: LocalStack, settings: Settings, model, replica=None) -> None:  # noqa: ANN001
    """(Re)deploy the farm's app on the running stack, with another replica deployment."""
    import ray
    from ray import serve

    from serve.app import APP_NAME, DiffusionReplica, build_app

    ray.init(address=stack.ray_address(settings), logging_level="ERROR", log_to_driver=False)
    try:
        app = build_app(settings, model, replica or DiffusionReplica)
        serve.run(app, name=APP_NAME, route_prefix="/")
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brands", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-hotswap-") as tmp:
        stack, settings = start_farm(Path(tmp) / "state")
        try:
            model = stack.base_model(settings)
            tenant = f"bench-{uuid.uuid4().hex[:6]}"
            key = TenantDirectory.from_url(settings.resolved_database_url).create_tenant(tenant).key
            print(f"registering {args.brands} adapters (rank {args.rank}) ...", flush=True)
            specs = register_brands(settings, model, tenant, args.brands, args.rank, Path(tmp))
            store = ObjectStore.from_settings(settings, bucket=settings.mlflow_artifacts_bucket)
            fetcher = AdapterFetcher(store)
            side = model.native_size
            job = RenderJob(
                PROMPT, None, side, side, args.steps, model.default_guidance_scale, (1,)
            )

            # A replica reserves `cpus_per_replica` CPUs and Ray caps its torch threads to them:
            # render in-process with the same number of threads, for a fair ratio.
            torch.set_num_threads(max(1, int(settings.cpus_per_replica)))
            render, resident, host, fresh, store_load = switch_costs(
                model, fetcher, specs, job, args.repeat
            )
            engine = DiffusionEngine.load(model, "cpu", max_adapters=args.brands)

            picks = zipf_brands(args.brands, args.requests)
            print(
                f"mixed workload: {args.requests} renders, {args.clients} clients ...", flush=True
            )
            mixed = farm_throughput(settings, key, specs, picks, args.clients, args.steps)
            print("the same workload on the farm with a naive replica ...", flush=True)
            deploy(stack, settings, model, naive_replica())
            naive_http = farm_throughput(settings, key, specs, picks, args.clients, args.steps)

            single_spec = specs[0]
            single_weights = parse_weights(single_spec, fetcher.fetch(single_spec))
            single_job = dataclasses.replace(job, adapter=single_spec)
            n_local = max(8, args.requests // 4)
            started = time.perf_counter()
            for _ in range(n_local):
                engine.generate(single_job, single_weights)
            single = n_local / (time.perf_counter() - started)

            naive_engine = DiffusionEngine.load(model, "cpu", max_adapters=1)
            started = time.perf_counter()
            for i in picks[:n_local]:
                spec = specs[i]
                weights = parse_weights(spec, fetcher.fetch(spec))  # from storage, every time
                naive_engine.generate(dataclasses.replace(job, adapter=spec), weights)
                naive_engine.unload_adapter(spec.model_id)
            naive = n_local / (time.perf_counter() - started)
            file_kib = len(fetcher.fetch(specs[0])) / 1024
        finally:
            stack.down()

    def row(label: str, seconds: float) -> str:
        return f"  {label:<30}{seconds * 1000:9.3f} ms  {seconds / render:8.4f} x render"

    def rate(label: str, value: float, ratio: float | None = None) -> str:
        tail = "" if ratio is None else f"   farm / this = {ratio:.2f}"
        return f"  {label:<36}{value:6.2f} images/s{tail}"

    lines = [
        f"built-in model {model.id}, {side}x{side}, {args.steps} steps, LoRA rank {args.rank}, "
        f"adapter file {file_kib:.0f} KiB, torch threads {torch.get_num_threads()}",
        "",
        f"(a) switch costs vs one image's render time ({render * 1000:.1f} ms, in-process)",
        row("activate a resident adapter", resident),
        row("host-RAM tier, in place (full)", host),
        row("host-RAM tier, into a free slot", fresh),
        row("object store, in place (full)", store_load),
        "",
        f"(b) throughput, {args.brands} brands Zipf(1.1), {args.requests} requests, "
        f"{args.clients} HTTP clients, one replica",
        rate("farm over HTTP, mixed brands", mixed),
        rate("in-process, one adapter", single, mixed / single),
        rate("naive farm over HTTP (load+unload)", naive_http, mixed / naive_http),
        rate("naive in-process (load+unload)", naive, mixed / naive),
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
