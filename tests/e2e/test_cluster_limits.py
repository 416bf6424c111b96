"""Cluster-wide limits and the render queue on a real farm with two ingress replicas: the hourly
quota and the in-flight limit hold across them, because both replicas admit through the same
database (registry.render_limits), not through their own memory; and the async renders both
replicas' dispatchers take from the one queue are each rendered, charged and announced once."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from ray.util.state import get_log
from typer.testing import CliRunner

from cluster.cli import app as cli_app
from cluster.stack import LocalStack
from registry.db import make_engine
from registry.render_limits import RenderLimiter
from registry.render_queue import RenderQueueStore
from serve.serve_config import APP_NAME, INGRESS
from tests.conftest import Farm, farm_settings
from tests.polling import wait_for
from tests.serve.webhook_receiver import WebhookReceiver

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RENDER = "/images/generations"
QUICK = {"prompt": "a red circle", "n": 1, "steps": 2, "response_format": "b64_json"}
# Long enough that a burst sent while it renders arrives before it ends (checked, not assumed);
# the test cancels it after the burst.
LONG = {"prompt": "a blue square", "n": 4, "steps": 1000, "response_format": "b64_json"}


@pytest.fixture(scope="module")
def farm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    settings = farm_settings(
        tmp_path_factory.mktemp("farm2") / "state",
        ingress_replicas=2,
        # Above the bursts below, so that only the limit under test refuses.
        max_inflight_per_tenant=32,
        max_steps=1000,
        # Fewer than the async burst below: one dispatcher cannot claim all of it at once, so
        # both replicas' dispatchers take some (with 16, one poll could take the lot).
        render_queue_concurrency=4,
    )
    stack = LocalStack(settings)
    try:
        yield Farm(stack, stack.up())
    finally:
        stack.down()


def limiter(farm: Farm) -> RenderLimiter:
    return RenderLimiter(farm.tenants.engine, farm.settings.render_lease_s)


def ingress_replicas(farm: Farm) -> list[dict]:
    """The running Ingress replicas, as Serve's REST API reports them."""
    apps = httpx.get(f"{farm.settings.ray_dashboard_url}/api/serve/applications/", timeout=30)
    replicas = apps.json()["applications"][APP_NAME]["deployments"][INGRESS]["replicas"]
    return [r for r in replicas if r["state"] == "RUNNING"]


def replicas_that_answered(farm: Farm, request_ids: list[str]) -> set[str]:
    """Which Ingress replicas logged these requests (Serve's access log names the request id
    the client sent as X-Request-Id)."""
    gcs = f"{farm.settings.host}:{farm.settings.ray_gcs_port}"
    answered = set()
    for replica in ingress_replicas(farm):
        log = "".join(
            get_log(
                address=gcs,
                node_id=replica["node_id"],
                filename=replica["log_file_path"].lstrip("/"),
            )
        )
        if any(rid in log for rid in request_ids):
            answered.add(replica["replica_id"])
    return answered


def burst(farm: Farm, key: str, body: dict, count: int) -> list[httpx.Response]:
    """`count` concurrent renders, each with its own X-Request-Id."""

    def one(i: int) -> httpx.Response:
        with farm.http(key) as c:
            rid = f"req_{secrets.token_hex(8)}"
            return c.post(RENDER, json=body, headers={"X-Request-Id": rid})

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def test_the_farm_runs_two_ingress_replicas(farm2):
    assert len(ingress_replicas(farm2)) == 2


def test_twenty_concurrent_renders_against_a_quota_of_ten_give_exactly_ten_images(farm2):
    key = farm2.new_tenant("quota2-co", images_per_hour=10)
    answers = burst(farm2, key, QUICK, 20)
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200] * 10 + [429] * 10, [r.text[:200] for r in answers]
    for r in answers:
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "quota_exceeded", r.text
        else:
            assert len(r.json()["data"]) == 1
    assert farm2.tenants.images_in_last_hour("quota2-co") == 10
    assert farm2.tenants.count_renders("quota2-co") == 10
    assert limiter(farm2).inflight("quota2-co") == 0  # every slot given back
    ids = [r.headers["x-request-id"] for r in answers]
    assert len(replicas_that_answered(farm2, ids)) == 2  # both ingress replicas admitted


def test_the_inflight_limit_holds_across_both_ingress_replicas(farm2):
    """A long async render holds the tenant's only in-flight slot; a burst of synchronous
    requests through both ingress replicas is refused by both. Cancelling the long render gives
    the slot back (it is cancelled rather than waited for: minutes of CPU otherwise)."""
    key = farm2.new_tenant("inflight2-co")
    result = CliRunner().invoke(
        cli_app,
        ["tenants", "set-limits", "inflight2-co", "--max-inflight-renders", "1"],
        env=farm2.cli_env(),
    )
    assert result.exit_code == 0 and "max_inflight_renders=1" in result.output, result.output
    slots = limiter(farm2)
    with farm2.http(key) as c:
        holder = c.post("/renders", json=LONG)
        assert holder.status_code == 202, holder.text
        render = f"/renders/{holder.json()['id']}"
        wait_for(lambda: slots.inflight("inflight2-co") == 1, 120, "the long render running")
        refused = burst(farm2, key, QUICK, 8)
        assert c.get(render).json()["status"] == "in_progress", "it ended before the burst"
        assert c.post(f"{render}/cancel").status_code == 200
    assert [r.status_code for r in refused] == [429] * 8, [r.text[:200] for r in refused]
    for r in refused:
        error = r.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "limit 1" in error["message"]
    ids = [r.headers["x-request-id"] for r in refused]
    assert len(replicas_that_answered(farm2, ids)) == 2  # refused by both, not by one
    wait_for(lambda: slots.inflight("inflight2-co") == 0, 60, "the slot given back")


def test_async_renders_are_shared_by_both_dispatchers_and_each_done_once(farm2):
    """Renders accepted through both replicas are claimed by both replicas' dispatchers from the
    one queue; each ends with one result, one usage row and one signed webhook, none lost."""
    key = farm2.new_tenant("queue2-co")
    receiver = WebhookReceiver()
    count = 16
    try:
        with farm2.http(key) as c:
            receiver.secret = c.post("/webhooks/secret").json()["secret"]
            set_url = c.put("/webhooks/config", json={"url": receiver.url})
            assert set_url.status_code == 200, set_url.text

            def submit(i: int) -> httpx.Response:
                rid = f"req_{secrets.token_hex(8)}"
                body = {**QUICK, "steps": 8, "seed": 100 + i}
                return c.post("/renders", json=body, headers={"X-Request-Id": rid})

            with ThreadPoolExecutor(max_workers=8) as pool:
                accepted = list(pool.map(submit, range(count)))
            assert [r.status_code for r in accepted] == [202] * count, accepted[0].text
            ids = [r.json()["id"] for r in accepted]
            wait_for(
                lambda: len(receiver.accepted("render.succeeded")) >= count,
                600,
                "every render's succeeded webhook",
                every_s=1,
            )
            done = [c.get(f"/renders/{i}").json() for i in ids]
        assert [d["status"] for d in done] == ["succeeded"] * count
        assert [[x["seed"] for x in d["data"]] for d in done] == [[100 + i] for i in range(count)]
        tasks = [
            RenderQueueStore(make_engine(farm2.settings.resolved_database_url)).get_any(i)
            for i in ids
        ]
        # One claim each (no render ran twice), and both replicas' dispatchers took some.
        assert [t.attempts for t in tasks] == [1] * count
        by = {t.claimed_by for t in tasks}
        assert len(by) == 2, by
        assert (
            len(replicas_that_answered(farm2, [r.headers["x-request-id"] for r in accepted])) == 2
        )
        assert farm2.tenants.count_renders("queue2-co") == count  # charged once each
        stored = [o.key for o in farm2.store.list("tenants/queue2-co/renders/")]
        assert len(stored) == count and {k.split("/")[3] for k in stored} == set(ids)
        announced = [r.verified["data"]["id"] for r in receiver.accepted("render.succeeded")]
        assert sorted(announced) == sorted(ids)  # one webhook per render, verified
        assert len(receiver.received) == count  # and nothing else, no retry
    finally:
        receiver.close()
