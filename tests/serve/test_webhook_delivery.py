"""Webhooks end to end without Ray: the API sets a tenant's URL and secret, events enter the
outbox (a fine-tune job's transition, a render event as the queue sends it), two delivery
workers (two ingress replicas) POST them to a real receiver on 127.0.0.1 that verifies every
signature with `standardwebhooks`; it fails at first, the deliveries are retried until it
answers, each once, and a replay arrives again under the same `webhook-id`."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook

from registry.db import make_engine
from registry.jobs import JobStore
from registry.secret_box import new_key
from registry.settings import Settings
from registry.tenants import TenantDirectory
from serve.api import create_api
from serve.webhooks import WebhookDispatcher
from tests.polling import wait_for
from tests.serve.webhook_receiver import WebhookReceiver, webhook_services


@pytest.fixture
def farm_parts(tmp_path):
    settings = Settings(
        state_dir=tmp_path / "state",
        webhook_allow_hosts=["127.0.0.1"],
        webhook_retry_schedule_s=[0.2, 0.4, 0.8],
        webhook_poll_interval_s=0.05,
        webhook_timeout_s=5,
        encryption_keys=new_key(),
    )
    engine = make_engine(f"sqlite:///{tmp_path / 'farm.db'}")
    key = TenantDirectory(engine).create_tenant("acme").key
    services = webhook_services(engine, settings)
    store = services.webhooks.store
    receiver = WebhookReceiver(fail_first=3)
    # Two dispatchers on one database: what two ingress replicas run.
    stops = [WebhookDispatcher(store, settings).start() for _ in range(2)]
    with TestClient(create_api(services), headers={"Authorization": f"Bearer {key}"}) as client:
        yield client, engine, store, receiver
    for stop in stops:
        stop.set()
    receiver.close()


def test_failing_receiver_gets_each_event_once_signed_after_retries_and_a_replay(farm_parts):
    client, engine, store, receiver = farm_parts
    config = client.put("/v1/webhooks/config", json={"url": receiver.url})
    assert config.status_code == 200, config.text
    receiver.secret = config.json()["secret"]

    jobs = JobStore(engine)
    job, _ = jobs.create("acme", "logo", "file-1", "brandfarm-shapes", {"seed": 1})
    assert jobs.finish(job.id, "succeeded", adapter_version=2)
    render = store.enqueue("acme", "render.succeeded", {"id": "render-1", "images": 1})
    wanted = {"fine_tuning.job.succeeded", "adapter.version.created", "render.succeeded"}

    wait_for(
        lambda: {r.verified["type"] for r in receiver.accepted()} == wanted,
        60,
        "the receiver accepted all three events",
    )
    assert len(receiver.accepted()) == 3  # each event once, though two workers poll
    assert [r.answered for r in receiver.received[:3]] == [503, 503, 503]
    got = {r.verified["type"]: r for r in receiver.accepted()}
    assert got["fine_tuning.job.succeeded"].verified["data"]["id"] == job.id
    assert got["adapter.version.created"].verified["data"]["fine_tuned_model"] == "logo:2"

    listed = client.get("/v1/webhooks/deliveries", params={"limit": 10}).json()["data"]
    assert {d["status"] for d in listed} == {"succeeded"}
    attempts = [a["status_code"] for d in listed for a in d["attempts"]]
    assert sorted(attempts) == [200, 200, 200, 503, 503, 503]
    failed = [a for d in listed for a in d["attempts"] if a["status_code"] == 503]
    assert {a["response_body"] for a in failed} == {"try later"}
    assert all(a["error"] == "HTTP 503" for a in failed)

    replayed = client.post(f"/v1/webhooks/deliveries/{render}/replay")
    assert replayed.status_code == 200 and replayed.json()["status"] == "pending"
    wait_for(lambda: len(receiver.accepted("render.succeeded")) == 2, 30, "the replay arrived")
    first, again = receiver.accepted("render.succeeded")
    assert first.headers["webhook-id"] == again.headers["webhook-id"]  # receivers dedupe on it
    assert first.body == again.body

    # Rotation: the next delivery verifies with the new secret and, in the grace, the old one.
    old = receiver.secret
    receiver.secret = client.post("/v1/webhooks/secret").json()["secret"]
    store.enqueue("acme", "render.failed", {"id": "render-2"})
    wait_for(lambda: receiver.accepted("render.failed"), 30, "a delivery after the rotation")
    (after,) = receiver.accepted("render.failed")
    Webhook(old).verify(after.body, after.headers)
