"""Shared fixtures: one embedded farm per test session (real rclone S3, MLflow, Ray, Serve)."""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cluster.processes import free_ports
from cluster.stack import LocalStack
from registry.base_models import BaseModelInfo
from registry.db import make_engine
from registry.files import FileCatalog
from registry.jobs import JobStore
from registry.settings import Settings
from registry.storage import ObjectStore
from registry.tenants import TenantDirectory

PORT_FIELDS = Settings.service_port_fields()


def farm_settings(state_dir: Path, **overrides: object) -> Settings:
    ports = dict(zip(PORT_FIELDS, free_ports(len(PORT_FIELDS)), strict=True))
    return Settings(
        state_dir=state_dir,
        startup_timeout_s=300,
        # Logical CPUs (Ray allows more than the 2 cores): the replica and a job's entrypoint
        # take one each, and a data-parallel job's two Ray Train workers one each.
        ray_num_cpus=4,
        dataset_max_upload_bytes=4 * 1024 * 1024,  # small, so the 413 tests send little
        fine_tune_checkpoint_every=4,
        # Hot-swap: two adapters in the pipeline and a host tier of ~3 test adapters, so the
        # cache tests see every tier evict; promotions show within a second.
        max_adapters_per_replica=2,
        adapter_host_cache_mb=4,
        adapter_resolve_ttl_s=1.0,
        # Jobs whose Ray job died turn failed within seconds, not the production 15 s.
        job_reconcile_interval_s=2.0,
        webhook_allow_hosts=["127.0.0.1"],  # the webhook tests' loopback receiver
        # A distinctive value, so a leak into Ray's job data would be found (test_finetune).
        api_key="bf-e2e-apikey-must-never-reach-ray-7f3a9c",
        **{**ports, **overrides},  # an override may pin a port
    )


@dataclass
class Farm:
    stack: LocalStack
    settings: Settings  # resolved: absolute state dir, credentials

    @property
    def store(self) -> ObjectStore:
        return ObjectStore.from_settings(self.settings)

    @property
    def tenants(self) -> TenantDirectory:
        return TenantDirectory.from_url(self.settings.resolved_database_url)

    @property
    def model(self) -> BaseModelInfo:
        return self.stack.base_model(self.settings)

    @property
    def files(self) -> FileCatalog:
        return FileCatalog(make_engine(self.settings.resolved_database_url))

    @property
    def jobs(self) -> JobStore:
        return JobStore(make_engine(self.settings.resolved_database_url))

    @property
    def api(self) -> str:
        return f"{self.settings.api_url}/v1"

    def new_tenant(self, name: str, **kw: object) -> str:
        return self.tenants.create_tenant(name, **kw).key

    def http(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.api, headers=headers, timeout=300)

    def all_objects(self) -> list[str]:
        return sorted(o.key for o in self.store.list(""))

    def cli_env(self, api_key: str | None = None) -> dict[str, str]:
        """Environment for `brandfarm` CLI calls against this farm (CliRunner's env=)."""
        env = self.settings.to_env()  # all of them: `up` must compute the very same argv
        if api_key:
            env["BRANDFARM_API_KEY"] = api_key
        return env

    def restart(self) -> None:
        self.stack.down()
        self.settings = self.stack.up()


@pytest.fixture(scope="session")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    stack = LocalStack(farm_settings(tmp_path_factory.mktemp("farm") / "state"))
    try:
        settings = stack.up()
        yield Farm(stack, settings)
    finally:
        stack.down()


#: A brand LoRA of the built-in model: (brand, steps) -> the trained adapter's folder.
BrandLora = Callable[..., Path]


@pytest.fixture(scope="session")
def brand_lora(tmp_path_factory: pytest.TempPathFactory) -> BrandLora:
    """Train a built-in brand's LoRA on the built-in model once per session and reuse it.

    ``brand_lora("acme", steps=400)`` trains rank 4 on 32 images of the brand (seed 0, batch 8)
    the first time it is asked for and returns the same folder afterwards, so tests that need a
    trained brand share the minutes of CPU that training costs. Only slow tests should ask.
    """
    from finetune import world
    from finetune.train import train_lora
    from registry.base_models import SHAPES

    shipped = Path(__file__).resolve().parents[1] / "registry" / "builtin" / SHAPES

    trained: dict[tuple[str, int, int], Path] = {}

    def train(brand: str, steps: int = 400, n: int = 32) -> Path:
        key = (brand, steps, n)
        if key not in trained:
            root = tmp_path_factory.mktemp(f"lora-{brand}-{steps}")
            with zipfile.ZipFile(world.write_brand_zip(root / "up.zip", brand, n=n, seed=0)) as zf:
                zf.extractall(root / "dataset")
            trained[key] = train_lora(
                shipped,
                root / "dataset",
                root / "adapter",
                steps=steps,
                rank=4,
                alpha=4.0,
                lr=4e-3,
                batch_size=8,
                seed=0,
            )
        return trained[key]

    return train


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the shared stack is an e2e test, wherever it lives (the fast tier,
    `-m "not e2e and not slow"`, never starts a stack)."""
    for item in items:
        if "farm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)
