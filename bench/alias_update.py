"""Time from an alias change to the first render served with the new version.

Starts a real embedded farm in a temporary folder with `--ingress-replicas` ingress replicas
(the webhook reaches one; the others learn through the farm database's alias event log) and an
alias TTL of `--ttl` seconds (long, so only an invalidation can explain a quick change). It
registers two versions of one brand (random-weight LoRA files, `finetune.synthetic_lora`),
renders both once so their weights are warm on the replica, then `--rounds` times moves
`production` to the other version and renders back to back (1 step, native size) until a render
names the new version. Two ways of moving the alias, alternating promotion and rollback:

- `api`: `POST /v1/adapters/{brand}/aliases/production` (the farm invalidates before it
  answers; the other ingress replicas within a poll);
- `mlflow`: `MlflowClient.set_registered_model_alias` straight on the tracking server (only its
  webhook can tell the farm).

The clock starts before the alias call and stops when the first render with the new version
returns, so it includes one render (reported alone as `render`).

    python bench/alias_update.py [--rounds 20] [--ingress-replicas 2] [--ttl 300]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from mlflow import MlflowClient

from cluster.processes import free_ports
from cluster.stack import LocalStack
from finetune.synthetic_lora import register_random_lora
from registry.adapters import PRODUCTION, AdapterRegistry, registered_model_name
from registry.base_models import load_pipeline
from registry.settings import Settings
from registry.tenants import TenantDirectory

BRAND = "alias-bench"


def render(http: httpx.Client, ref: str) -> int:
    body = {"prompt": "a red circle", "seed": 1, "steps": 1, "adapter": ref}
    r = http.post("/images/generations", json=body)
    r.raise_for_status()
    return r.json()["adapter"]["version"]


def first_render_with(http: httpx.Client, version: int, started: float) -> tuple[float, int]:
    """Render until the answer names `version`; (seconds since `started`, renders needed)."""
    renders = 0
    while True:
        renders += 1
        if render(http, BRAND) == version:
            return time.perf_counter() - started, renders
        if time.perf_counter() - started > 600:
            raise RuntimeError(f"version {version} not served within 600 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="Alias moves per way.")
    parser.add_argument("--ingress-replicas", type=int, default=2, help="Ingress replicas.")
    parser.add_argument("--ttl", type=float, default=300.0, help="adapter_resolve_ttl_s.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        names = Settings.service_port_fields()
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        stack = LocalStack(
            Settings(
                state_dir=Path(tmp) / "state",
                ray_num_cpus=4,
                ingress_replicas=args.ingress_replicas,
                adapter_resolve_ttl_s=args.ttl,
                **ports,
            )
        )
        settings = stack.up()
        try:
            run(stack, settings, args)
        finally:
            stack.down()


def run(stack: LocalStack, settings: Settings, args: argparse.Namespace) -> None:
    model = stack.base_model(settings)
    tenant = f"bench-{uuid.uuid4().hex[:6]}"
    key = TenantDirectory.from_url(settings.resolved_database_url).create_tenant(tenant).key
    registry = AdapterRegistry(settings.resolved_mlflow_uri)
    mlflow = MlflowClient(settings.resolved_mlflow_uri)
    unet = load_pipeline(model, "cpu").unet
    with tempfile.TemporaryDirectory() as folder:
        for seed, alias in ((1, PRODUCTION), (2, None)):
            register_random_lora(
                registry, mlflow, tenant, BRAND, model, unet, Path(folder) / str(seed),
                seed=seed, alias=alias,
            )  # fmt: skip
    health = httpx.get(f"{settings.api_url}/healthz", timeout=30).json()
    print("alias updates:", health.get("alias_updates"))

    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=f"{settings.api_url}/v1", headers=headers, timeout=120) as http:
        for _ in range(3):  # both versions' weights warm on the replica
            render(http, f"{BRAND}:1")
            render(http, f"{BRAND}:2")
        started = time.perf_counter()
        for _ in range(10):
            render(http, f"{BRAND}:1")
        render_s = (time.perf_counter() - started) / 10

        def by_api(version: int) -> None:
            r = http.post(f"/adapters/{BRAND}/aliases/{PRODUCTION}", json={"version": version})
            r.raise_for_status()

        def by_mlflow(version: int) -> None:
            name = registered_model_name(tenant, BRAND)
            mlflow.set_registered_model_alias(name, PRODUCTION, str(version))

        current = 1
        print(f"render (1 step, native size, adapter warm): {render_s * 1000:.0f} ms")
        print(
            "seconds from the alias call to the first render with the new version; `call`: the "
            "alias call alone; `after`: from its answer to that render; `renders`: renders it took"
        )
        print(
            f"{'way':8} {'median':>7} {'p90':>7} {'max':>7} {'call':>7} {'after':>7} "
            f"{'after p90':>9} {'renders':>8}"
        )
        for way, move in (("api", by_api), ("mlflow", by_mlflow)):
            took, calls, after, renders = [], [], [], []
            for _ in range(args.rounds):
                current = 3 - current  # promotion, then rollback, ...
                started = time.perf_counter()
                move(current)
                calls.append(time.perf_counter() - started)
                seconds, n = first_render_with(http, current, started)
                took.append(seconds)
                after.append(seconds - calls[-1])
                renders.append(n)
            print(
                f"{way:8} {statistics.median(took):7.3f} {p90(took):7.3f} {max(took):7.3f} "
                f"{statistics.median(calls):7.3f} {statistics.median(after):7.3f} "
                f"{p90(after):9.3f} {statistics.mean(renders):8.1f}"
            )


def p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


if __name__ == "__main__":
    main()
