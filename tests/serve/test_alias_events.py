"""Instant alias updates without Ray: MLflow's signature is checked with MLflow's own signer, and
an alias change learned by one ingress replica reaches another replica's cache through the farm
database's event log (SQLite here; the shared e2e farm runs the webhook through real MLflow).

The registry is the in-memory table of test_resolver (the real MLflow path is tests/e2e), and
the clock never moves, so only an invalidation can explain a new answer: the TTL never expires.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature

from registry import alias_webhook
from registry.adapter_refs import AdapterRef
from registry.alias_events import AliasEventLog
from registry.db import make_engine
from registry.settings import Settings
from serve.alias_events import AliasEvents
from serve.errors import APIError
from serve.io_pools import BlockingPool
from serve.resolver import AdapterResolver
from tests.serve.test_resolver import Clock, Registry

SECRET = "s3cr3t-for-the-test"
PROD = AdapterRef("acme", alias="production")


def delivery(body: dict, secret: str = SECRET, at: float | None = None) -> tuple[dict, bytes]:
    """Headers and body as MLflow's delivery code signs them."""
    payload = json.dumps(body)
    delivery_id, timestamp = "d-1", str(int(at if at is not None else time.time()))
    headers = {
        "x-mlflow-delivery-id": delivery_id,
        "x-mlflow-timestamp": timestamp,
        "x-mlflow-signature": _generate_hmac_signature(secret, delivery_id, timestamp, payload),
    }
    return headers, payload.encode()


ALIAS_SET = {
    "entity": "model_version_alias",
    "action": "created",
    "timestamp": "2026-11-30T00:00:00+00:00",
    "data": {"name": "t1.acme", "alias": "production", "version": "2"},
}


@pytest.fixture
def farm(tmp_path):
    """Two ingress replicas: their own resolver caches over one registry and one database."""
    registry, clock = Registry(), Clock()
    engine = make_engine(f"sqlite:///{tmp_path / 'farm.db'}")
    settings = Settings(state_dir=tmp_path, mlflow_webhook_secret=SECRET)
    pool = BlockingPool("db", 2)
    replicas = []
    for _ in range(2):
        resolver = AdapterResolver(registry, ttl_s=3600, clock=clock)
        events = AliasEvents(
            resolver, AliasEventLog(engine), settings, pool, webhook_problem=lambda: None
        )
        replicas.append((resolver, events))
    yield registry, replicas
    pool.shutdown()


def served(resolver: AdapterResolver) -> int:
    return resolver.resolve("t1", PROD, 1.0).version


def test_mlflow_signed_delivery_verifies_and_anything_else_is_refused():
    headers, body = delivery(ALIAS_SET)
    args = (headers["x-mlflow-delivery-id"], headers["x-mlflow-timestamp"])
    sig = headers["x-mlflow-signature"]
    assert alias_webhook.verify(SECRET, *args, sig, body) is None
    assert alias_webhook.sign(SECRET, *args, body) == sig  # ours equals MLflow's
    assert "does not match" in alias_webhook.verify("other", *args, sig, body)
    assert "does not match" in alias_webhook.verify(SECRET, *args, sig, body + b" ")
    assert "does not match" in alias_webhook.verify(SECRET, "d-2", args[1], sig, body)
    assert "missing" in alias_webhook.verify(SECRET, *args, None, body)
    old, body = delivery(ALIAS_SET, at=time.time() - 2 * alias_webhook.MAX_CLOCK_SKEW_S)
    stale = alias_webhook.verify(
        SECRET, old["x-mlflow-delivery-id"], old["x-mlflow-timestamp"],
        old["x-mlflow-signature"], body,
    )  # fmt: skip
    assert "from now" in stale


def test_a_webhook_to_one_replica_reaches_the_other_through_the_event_log(farm):
    registry, [(cache_a, events_a), (cache_b, events_b)] = farm
    assert served(cache_a) == served(cache_b) == 1
    registry.aliases[("acme", "production")] = 2  # moved in MLflow: both caches still say 1
    assert served(cache_a) == served(cache_b) == 1

    headers, body = delivery(ALIAS_SET)
    answer = asyncio.run(events_a.webhook(headers, body))
    assert answer == {"status": "invalidated", "tenant": "t1", "brand": "acme"}
    assert served(cache_a) == 2  # the replica that got the webhook: at once
    assert served(cache_b) == 1  # the other: not until it polls
    assert events_b.poll_once() == 1
    assert served(cache_b) == 2
    assert events_b.poll_once() == 0  # each event is applied once


def test_the_farm_api_path_records_an_event_too(farm):
    registry, [(cache_a, events_a), (cache_b, events_b)] = farm
    served(cache_b)
    registry.aliases[("acme", "production")] = 3
    asyncio.run(events_a.changed("t1", "acme", "api"))  # what AdapterService.set_alias calls
    events_b.poll_once()
    assert served(cache_a) == served(cache_b) == 3


@pytest.mark.parametrize("secret", ["wrong-secret", None])
def test_a_badly_signed_delivery_is_401_and_invalidates_nothing(farm, secret):
    registry, [(cache_a, events_a), (cache_b, events_b)] = farm
    served(cache_a)
    registry.aliases[("acme", "production")] = 2
    headers, body = delivery(ALIAS_SET, secret=secret or SECRET)
    if secret is None:
        del headers["x-mlflow-signature"]
    with pytest.raises(APIError) as refused:
        asyncio.run(events_a.webhook(headers, body))
    assert refused.value.status == 401
    assert events_b.poll_once() == 0  # nothing recorded
    assert served(cache_a) == 1  # nothing invalidated
    assert events_a.received == 0


def test_a_signed_payload_that_names_no_brand_is_ignored(farm):
    _, [(_, events_a), (_, events_b)] = farm
    # What `MlflowClient.test_webhook` sends: MLflow's example payload.
    example = {**ALIAS_SET, "data": {"name": "example_model", "alias": "a", "version": "1"}}
    assert asyncio.run(events_a.webhook(*delivery(example))) == {"status": "ignored"}
    assert events_b.poll_once() == 0


def test_without_a_webhook_the_status_says_ttl_fallback(tmp_path):
    registry = Registry()
    engine = make_engine(f"sqlite:///{tmp_path / 'farm.db'}")
    settings = Settings(state_dir=tmp_path, adapter_resolve_ttl_s=5)
    pool = BlockingPool("db", 1)
    events = AliasEvents(
        AdapterResolver(registry, ttl_s=5), AliasEventLog(engine), settings, pool
    )  # no mlflow_webhook_secret: nothing to verify with
    events.check_webhook()
    status = events.status()
    assert status["instant"] is False and status["ttl_s"] == 5
    assert "mlflow_webhook_secret" in status["fallback_reason"]
    pool.shutdown()
