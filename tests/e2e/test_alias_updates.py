"""Instant alias updates on the shared farm: real MLflow posts its signed alias webhook to the
real ingress, which drops its cached alias answers; the farm's own alias API does the same.

The farm runs one ingress replica, so "the webhook's event is in the farm database" means "the
ingress that serves the next render has invalidated" (it invalidates before recording). How
the event reaches other ingress replicas is tests/serve/test_alias_events.py; how long the whole
path takes is bench/alias_update.py (no timed assertions here).
"""

from __future__ import annotations

import json
import stat
import time
import uuid

import httpx
import pytest
from mlflow import MlflowClient

from finetune.synthetic_lora import register_random_lora
from registry import alias_webhook
from registry.adapters import PRODUCTION, AdapterRegistry, registered_model_name
from registry.alias_events import AliasEventLog
from registry.base_models import load_pipeline
from registry.db import make_engine
from tests.polling import wait_for

pytestmark = pytest.mark.e2e


class Brand:
    def __init__(self, farm, tmp_path_factory) -> None:
        self.farm = farm
        self.tenant = f"au-{uuid.uuid4().hex[:6]}"
        self.key = farm.new_tenant(self.tenant)
        self.registry = AdapterRegistry(farm.settings.resolved_mlflow_uri)
        self.mlflow = MlflowClient(farm.settings.resolved_mlflow_uri)
        self.events = AliasEventLog(make_engine(farm.settings.resolved_database_url))
        self.unet = load_pipeline(farm.model, "cpu").unet
        self.root = tmp_path_factory.mktemp("alias-updates")

    def register(self, brand: str, seed: int, alias: str | None = PRODUCTION) -> int:
        return register_random_lora(
            self.registry,
            self.mlflow,
            self.tenant,
            brand,
            self.farm.model,
            self.unet,
            self.root / f"{brand}-{seed}",
            seed=seed,
            alias=alias,
        ).version

    def served(self, brand: str) -> int:
        """The version the next render of `brand@production` uses."""
        body = {"prompt": "a red circle", "seed": 1, "steps": 2, "adapter": brand}
        with self.farm.http(self.key) as http:
            r = http.post("/images/generations", json=body)
        assert r.status_code == 200, r.text
        return r.json()["adapter"]["version"]

    def move_in_mlflow(self, brand: str, version: int) -> None:
        """Point production at `version` in MLflow itself: the farm's API is not involved."""
        name = registered_model_name(self.tenant, brand)
        self.mlflow.set_registered_model_alias(name, PRODUCTION, str(version))

    def events_for(self, brand: str, after: int) -> list:
        return [e for e in self.events.after(after) if e[1:] == (self.tenant, brand)]

    def alias_updates(self) -> dict:
        return httpx.get(f"{self.farm.settings.api_url}/healthz", timeout=30).json()[
            "alias_updates"
        ]


@pytest.fixture(scope="module")
def au(farm, tmp_path_factory) -> Brand:
    return Brand(farm, tmp_path_factory)


def test_an_alias_moved_in_mlflow_is_served_by_the_first_render_after_its_webhook(au):
    assert au.alias_updates()["instant"] is True, au.alias_updates()
    # The webhook's secret and MLflow's encryption key are credentials: 0600, like the others.
    assert stat.S_IMODE(au.farm.stack.webhook_keys_file.stat().st_mode) == 0o600
    assert au.register("hot", seed=500) == 1
    assert au.register("hot", seed=501, alias=None) == 2
    assert au.served("hot") == 1  # the ingress now holds "hot@production → 1"

    before = au.events.latest()
    au.move_in_mlflow("hot", 2)  # promotion, in MLflow: only its webhook can tell the ingress
    wait_for(lambda: au.events_for("hot", before), 30, "MLflow's alias webhook at the ingress")
    assert au.served("hot") == 2

    # Rollback through the farm's API: the call itself invalidates before it answers.
    with au.farm.http(au.key) as http:
        r = http.post("/adapters/hot/aliases/production", json={"version": 1})
    assert r.status_code == 200, r.text
    assert au.served("hot") == 1
    assert au.alias_updates()["deliveries_received"] >= 1


@pytest.mark.parametrize("signed_with", ["another-secret", None])
def test_a_delivery_not_signed_by_mlflow_is_refused_and_invalidates_nothing(au, signed_with):
    before, received = au.events.latest(), au.alias_updates()["deliveries_received"]
    payload = json.dumps(
        {
            "entity": "model_version_alias",
            "action": "created",
            "timestamp": "2026-11-30T00:00:00+00:00",
            "data": {"name": f"{au.tenant}.hot", "alias": PRODUCTION, "version": "2"},
        }
    ).encode()
    delivery_id, timestamp = str(uuid.uuid4()), str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        alias_webhook.DELIVERY_ID_HEADER: delivery_id,
        alias_webhook.TIMESTAMP_HEADER: timestamp,
    }
    if signed_with:
        headers[alias_webhook.SIGNATURE_HEADER] = alias_webhook.sign(
            signed_with, delivery_id, timestamp, payload
        )
    url = f"{au.farm.settings.api_url}{alias_webhook.PATH}"
    r = httpx.post(url, content=payload, headers=headers, timeout=30)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "invalid_signature"
    assert au.events.latest() == before
    assert au.alias_updates()["deliveries_received"] == received


def test_with_mlflow_webhooks_off_an_alias_change_still_serves_after_the_ttl(au):
    settings = au.farm.settings
    [webhook] = [w for w in au.mlflow.list_webhooks() if w.name == alias_webhook.NAME]
    au.mlflow.update_webhook(webhook.webhook_id, status="DISABLED")
    try:
        assert alias_webhook.problem(settings) is not None  # what the ingress would report
        assert au.register("cold", seed=600) == 1
        assert au.register("cold", seed=601, alias=None) == 2
        assert au.served("cold") == 1
        au.move_in_mlflow("cold", 2)
        ttl = settings.adapter_resolve_ttl_s
        wait_for(lambda: au.served("cold") == 2, ttl + 30, "the TTL to expire the old answer")
    finally:
        au.mlflow.update_webhook(webhook.webhook_id, status="ACTIVE")
    assert alias_webhook.problem(settings) is None
