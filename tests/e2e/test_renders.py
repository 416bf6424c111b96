"""Async renders on the real farm (Ray Serve replicas, the ingress dispatcher, SQLite, S3): the
CLI end to end with its progress stream, cancel, 404 across tenants, 409, and a render that
outlives `brandfarm down` / `up`."""

from __future__ import annotations

import concurrent.futures as cf

import pytest
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from cluster.cli import app
from registry.db import make_engine
from registry.render_limits import RenderLimiter
from registry.render_queue import RenderQueueStore, RenderTaskRow
from tests.polling import wait_for

pytestmark = pytest.mark.e2e
SMALL = {"prompt": "a red circle", "steps": 3}


def queue(farm) -> RenderQueueStore:
    return RenderQueueStore(make_engine(farm.settings.resolved_database_url))


def test_cli_render_waits_with_progress_and_saves_the_images(farm, tmp_path) -> None:
    key = farm.new_tenant("async-cli-co")
    env = farm.cli_env(key)
    runner = CliRunner()
    out = tmp_path / "out"
    argv = ["render", "a red circle", "--n", "2", "--steps", "3", "--seed", "5", "--out", str(out)]
    result = runner.invoke(app, argv, env=env)
    assert result.exit_code == 0, result.output
    assert "render succeeded" in result.output
    saved = sorted(out.glob("*.png"))
    assert [p.name.rsplit("-", 1)[1] for p in saved] == ["5.png", "6.png"]
    assert Image.open(saved[0]).size[0] == farm.model.native_size
    render_id = saved[0].name.split("-0-")[0]
    done = queue(farm).get("async-cli-co", render_id)
    # Progress came from the replica's stream; usage was charged exactly once.
    assert done.status == "succeeded" and done.progress_step == done.progress_total == 6
    assert farm.tenants.count_renders("async-cli-co") == 1
    listed = runner.invoke(app, ["renders", "list"], env=env)
    assert listed.exit_code == 0 and render_id in listed.output
    status = runner.invoke(app, ["renders", "status", render_id], env=env)
    assert status.exit_code == 0 and "succeeded" in status.output


def test_cancel_404_across_tenants_and_409(farm) -> None:
    key = farm.new_tenant("async-cancel-co")
    other = farm.new_tenant("async-other-co")
    with farm.http(key) as c, farm.http(other) as o:
        # Long enough (4 images x 100 steps) that the cancel lands while it is unfinished.
        r = c.post("/renders", json={**SMALL, "n": 4, "steps": 100})
        assert r.status_code == 202, r.text
        render_id = r.json()["id"]
        assert o.get(f"/renders/{render_id}").status_code == 404
        assert o.post(f"/renders/{render_id}/cancel").status_code == 404
        cancelled = c.post(f"/renders/{render_id}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        again = c.post(f"/renders/{render_id}/cancel")
        assert again.status_code == 409 and again.json()["error"]["code"] == "render_finished"
        # A render that runs to the end after it: the farm kept rendering for others.
        after = c.post("/renders", json=SMALL).json()["id"]
        wait_for(
            lambda: c.get(f"/renders/{after}").json()["status"] == "succeeded",
            180,
            "the next render succeeds",
        )
        finished = c.post(f"/renders/{after}/cancel")
        assert finished.status_code == 409
    # The cancelled render was never charged and left no images.
    assert farm.tenants.count_renders("async-cancel-co") == 1
    assert farm.store.list(f"tenants/async-cancel-co/renders/{render_id}") == []


@pytest.mark.slow
def test_accepted_renders_survive_down_and_up(farm) -> None:
    """One render mid-way and others behind it (queued, or just claimed) when the farm goes
    down: after `up` each succeeds once, none lost."""
    key = farm.new_tenant("async-restart-co")
    with farm.http(key) as c:
        r = c.post("/renders", json={**SMALL, "n": 4, "steps": 100, "seed": 1})
        assert r.status_code == 202, r.text
        render_id = r.json()["id"]
        wait_for(lambda: queue(farm).get_any(render_id).status != "queued", 120, "it starts")
        behind = [c.post("/renders", json={**SMALL, "seed": 10 + i}) for i in range(6)]
        assert [b.status_code for b in behind] == [202] * 6
    later = [b.json()["id"] for b in behind]
    at_down = {queue(farm).get_any(i).status for i in later}
    farm.restart()  # `brandfarm down` then `up`: the ingress and its dispatcher die mid-render
    # Leases expire (render_queue_lease_s) and the new ingress's dispatcher renders them again;
    # the queued ones were only ever rows in the database.
    with farm.http(key) as c:
        wait_for(
            lambda: all(
                c.get(f"/renders/{i}").json()["status"] == "succeeded" for i in [render_id, *later]
            ),
            300,
            "every render succeeds after the restart",
        )
        done = c.get(f"/renders/{render_id}").json()
        seeds = [c.get(f"/renders/{i}").json()["data"][0]["seed"] for i in later]
    assert [d["seed"] for d in done["data"]] == [1, 2, 3, 4]
    assert seeds == [10 + i for i in range(6)]
    assert farm.tenants.count_renders("async-restart-co") == 7  # each charged once
    assert at_down - {"succeeded"}, at_down  # some were still waiting when the farm went down


def test_sync_and_async_requests_share_the_queue_and_the_quota(farm) -> None:
    """On the real farm: 8 concurrent requests of one image, 4 synchronous and 4 async, against
    images_per_hour=4 give exactly 4 images; the synchronous ones went through the queue (their
    tickets in render_tasks), and nothing stays reserved or in flight."""
    key = farm.new_tenant("mixed-quota-co", images_per_hour=4)
    body = {**SMALL, "steps": 2}

    def one(i: int):
        with farm.http(key) as c:
            return c.post("/images/generations" if i % 2 else "/renders", json=body)

    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    codes = sorted(r.status_code for r in answers)
    assert codes.count(429) == 4 and len([c for c in codes if c in (200, 202)]) == 4, [
        r.text[:200] for r in answers
    ]
    assert {r.json()["error"]["code"] for r in answers if r.status_code == 429} == {
        "quota_exceeded"
    }
    accepted = [r.json()["id"] for r in answers if r.status_code == 202]
    with farm.http(key) as c:
        for render_id in accepted:
            wait_for(
                lambda rid=render_id: c.get(f"/renders/{rid}").json()["status"] == "succeeded",
                180,
                "the async render succeeds",
            )
    assert farm.tenants.images_in_last_hour("mixed-quota-co") == 4
    engine = make_engine(farm.settings.resolved_database_url)
    limiter = RenderLimiter(engine, farm.settings.render_lease_s)
    assert limiter.quota_used("mixed-quota-co") == 4 and limiter.inflight("mixed-quota-co") == 0

    def sync_tickets() -> list[str]:
        with Session(engine) as s:
            return s.scalars(
                select(RenderTaskRow.status).where(
                    RenderTaskRow.tenant_id == "mixed-quota-co", RenderTaskRow.sync.is_(True)
                )
            ).all()

    sync_accepted = 4 - len(accepted)
    wait_for(lambda: sync_tickets() == ["succeeded"] * sync_accepted, 60, "the sync tickets close")
