"""Webhook delivery: how fast the outbox drains to a receiver, and how long an event waits.

Enqueues N events for one tenant, then runs K `WebhookDispatcher`s (as K ingress replicas would)
against a loopback receiver that verifies every signature with `standardwebhooks`, and prints
deliveries per second; then single events into the idle outbox, and their enqueue-to-receipt
latency. No Ray. Run from the
repo root:

    python bench/webhooks.py                      # SQLite, 500 events, 2 dispatchers
    python bench/webhooks.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test

docs/benchmarks.md ("Webhook delivery") records what it printed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from registry.db import make_engine
from registry.settings import Settings
from registry.tenants import TenantDirectory
from registry.webhooks import WebhookStore
from serve.webhooks import WebhookDispatcher
from tests.serve.webhook_receiver import WebhookReceiver


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=500, help="events to deliver")
    p.add_argument("--dispatchers", type=int, default=2, help="delivery workers (replicas)")
    p.add_argument("--latency-events", type=int, default=20, help="single events, one by one")
    p.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        schema = None
        if url.startswith("postgresql"):  # a scratch schema, dropped afterwards
            schema = f"bf_bench_{int(time.time())}"
            admin = sa.create_engine(url)
            with admin.begin() as c:
                c.execute(sa.text(f"CREATE SCHEMA {schema}"))
            url = f"{url}?options=-csearch_path%3D{schema}"
        engine = make_engine(url)
        try:
            run(args, engine, Path(tmp))
        finally:
            engine.dispose()
            if schema:
                with admin.begin() as c:
                    c.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))


def run(args: argparse.Namespace, engine: sa.Engine, tmp: Path) -> None:
    settings = Settings(state_dir=tmp, webhook_allow_hosts=["127.0.0.1"])
    TenantDirectory(engine).create_tenant("bench")
    store = WebhookStore(engine)
    receiver = WebhookReceiver()
    store.set_url("bench", receiver.url)
    receiver.secret = store.rotate_secret("bench", 0)

    # Throughput: a backlog of N events drained by the dispatchers.
    for i in range(args.events):
        store.enqueue("bench", "render.succeeded", {"id": f"backlog-{i}"})
    start = time.perf_counter()
    stops = [WebhookDispatcher(store, settings).start() for _ in range(args.dispatchers)]
    while len(receiver.accepted()) < args.events:
        time.sleep(0.01)
    elapsed = time.perf_counter() - start
    got = receiver.accepted()
    duplicates = len(got) - len({r.verified["data"]["id"] for r in got})

    # Latency: single events into an idle outbox (polled every webhook_poll_interval_s).
    waits = []
    for i in range(args.latency_events):
        enqueued = time.perf_counter()
        store.enqueue("bench", "render.succeeded", {"id": f"single-{i}"})
        while not receiver.accepted() or receiver.accepted()[-1].verified["data"]["id"] != (
            f"single-{i}"
        ):
            time.sleep(0.002)
        waits.append(receiver.accepted()[-1].at - enqueued)
        time.sleep(random.uniform(0, settings.webhook_poll_interval_s))
    for stop in stops:
        stop.set()
    receiver.close()
    print(
        f"{engine.dialect.name}, {args.dispatchers} dispatchers: {args.events} queued events "
        f"drained in {elapsed:.2f} s ({args.events / elapsed:.0f} deliveries/s), duplicates "
        f"{duplicates}; idle enqueue-to-receipt over {len(waits)} events (poll "
        f"{settings.webhook_poll_interval_s:g} s): median {statistics.median(waits):.3f} s, "
        f"max {max(waits):.3f} s"
    )


if __name__ == "__main__":
    main()
