"""Webhooks on the real stack: a fine-tune job trained as a Ray job ends, and its signed events
reach a receiver on 127.0.0.1 (allowed by the session farm's `webhook_allow_hosts`), which
verifies them with the `standardwebhooks` package."""

from __future__ import annotations

import pytest

from finetune.world import write_brand_zip
from tests.polling import wait_for
from tests.serve.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.e2e


def test_a_finished_fine_tune_reaches_the_tenants_receiver_signed(farm, tmp_path):
    key = farm.new_tenant("hook-co")
    receiver = WebhookReceiver()
    data = write_brand_zip(tmp_path / "acme.zip", "acme", n=8, seed=3)  # a built-in brand
    try:
        with farm.http(key) as c:
            receiver.secret = c.post("/webhooks/secret").json()["secret"]
            bad = c.post(
                "/fine_tuning/jobs",
                json={"training_file": "x", "brand": "hook", "webhook_url": "https://10.0.0.1/"},
            )
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "webhook_url"
            up = c.post(
                "/files",
                files={"file": ("hook.zip", data.read_bytes())},
                data={"purpose": "fine-tune"},
            )
            assert up.status_code == 200, up.text
            job = c.post(
                "/fine_tuning/jobs",
                json={
                    "training_file": up.json()["id"],
                    "brand": "hook",
                    "seed": 3,
                    "hyperparameters": {"steps": 4, "rank": 4, "alpha": 4, "batch_size": 2},
                    "webhook_url": receiver.url,  # the job's own URL; the tenant has no default
                },
            )
            assert job.status_code == 200, job.text
            job_id = job.json()["id"]
            wait_for(
                lambda: receiver.accepted("fine_tuning.job.succeeded"),
                600,
                "the job's succeeded event at the receiver",
                every_s=1,
            )
            (done,) = receiver.accepted("fine_tuning.job.succeeded")
            assert done.verified["data"]["id"] == job_id
            assert done.verified["data"]["fine_tuned_model"] == "hook:1"
            wait_for(lambda: receiver.accepted("adapter.version.created"), 60, "the version event")
            (version,) = receiver.accepted("adapter.version.created")
            assert version.verified["data"] == {
                "object": "adapter.version",
                "brand": "hook",
                "version": 1,
                "fine_tuned_model": "hook:1",
                "base_model": farm.model.id,
                "fine_tuning_job_id": job_id,
            }
            listed = c.get("/webhooks/deliveries").json()["data"]
            assert {d["event_type"]: d["status"] for d in listed} == {
                "fine_tuning.job.succeeded": "succeeded",
                "adapter.version.created": "succeeded",
            }
            assert all(d["attempts"][-1]["status_code"] == 200 for d in listed)
        assert len(receiver.received) == 2  # each event once
    finally:
        receiver.close()
