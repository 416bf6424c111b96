"""What the retention sweep of the render queue and the webhook outbox costs, on SQLite (a file in
a temporary folder) and Postgres (`--postgres URL`, a fresh schema, dropped afterwards):

- prune rate: `--rows` finished render tasks and as many finished deliveries (one attempt each)
  deleted by `prune_queue_rows` in batches of `--batch`; rows/s, and the longest batch
  transaction (how long the sweep holds SQLite's writer lock at a time);
- how long a claim by the render dispatcher waits while a sweep runs (its p50/max during the
  sweep, against an idle database);
- sealing: webhook secrets sealed per second (`WebhookStore.reseal_secrets`, plain rows).

    python bench/queue_retention.py [--rows 20000] [--batch 500] [--postgres URL]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from registry import queue_retention  # noqa: E402
from registry.db import make_engine  # noqa: E402
from registry.render_queue import RenderQueueStore, RenderTaskRow  # noqa: E402
from registry.secret_box import SecretBox, new_key  # noqa: E402
from registry.sql_base import utcnow  # noqa: E402
from registry.tenants import TenantDirectory  # noqa: E402
from registry.webhooks import (  # noqa: E402
    WebhookAttemptRow,
    WebhookDeliveryRow,
    WebhookEventRow,
    WebhookStore,
    WebhookTenantRow,
    new_secret,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20000, help="Finished rows of each table.")
    p.add_argument("--batch", type=int, default=500, help="Rows per retention transaction.")
    p.add_argument("--secrets", type=int, default=200, help="Plain webhook secrets to seal.")
    p.add_argument("--postgres", help="Also measure on this Postgres URL (a fresh schema).")
    return p.parse_args()


def fill(engine: sa.Engine, rows: int) -> None:
    """`rows` finished render tasks and as many finished deliveries, 40 days old."""
    old = utcnow() - dt.timedelta(days=40)
    tasks, events, deliveries, attempts = [], [], [], []
    for i in range(rows):
        rid = f"render-{i:024x}"
        tasks.append(
            {
                "id": rid,
                "tenant_id": "acme",
                "status": "succeeded",
                "priority": "fast",
                "tier": 0,
                "request": "{}",
                "images": 1,
                "cost": 4.0,
                "progress_total": 4,
                "created_at": old,
                "finished_at": old,
                "event_pending": False,
            }
        )
        eid, did = f"msg_{i:024x}", f"whdel_{i:024x}"
        events.append(
            {"id": eid, "tenant_id": "acme", "type": "render.succeeded", "payload": "{}",
             "created_at": old}
        )  # fmt: skip
        deliveries.append(
            {"id": did, "event_id": eid, "tenant_id": "acme", "url": "https://h/x",
             "status": "succeeded", "attempts": 1, "created_at": old, "finished_at": old}
        )  # fmt: skip
        attempts.append(
            {"delivery_id": did, "started_at": old, "duration_ms": 3.0, "status_code": 200}
        )
    with engine.begin() as c:
        for table, values in (
            (RenderTaskRow, tasks),
            (WebhookEventRow, events),
            (WebhookDeliveryRow, deliveries),
            (WebhookAttemptRow, attempts),
        ):
            for start in range(0, len(values), 5000):
                c.execute(sa.insert(table), values[start : start + 5000])


def timed_batches() -> list[float]:
    """Wrap the module's batch selection to time each batch transaction (select to commit)."""
    durations: list[float] = []
    original = queue_retention._batch_ids

    def batch_ids(s, column, condition, batch):  # noqa: ANN001, ANN202
        started = time.perf_counter()
        ids = original(s, column, condition, batch)

        @sa.event.listens_for(s, "after_commit", once=True)
        def done(_s) -> None:  # noqa: ANN001
            durations.append(time.perf_counter() - started)

        return ids

    queue_retention._batch_ids = batch_ids
    return durations


def claim_latency(engine: sa.Engine, stop: threading.Event, out: list[float]) -> None:
    q = RenderQueueStore(engine)
    while not stop.is_set():
        started = time.perf_counter()
        q.claim("bench", 30, 1)  # nothing queued: the dispatcher's idle poll
        out.append(time.perf_counter() - started)
        time.sleep(0.02)


def measure(name: str, engine: sa.Engine, args: argparse.Namespace) -> dict:
    TenantDirectory(engine).create_tenant("acme")
    fill(engine, args.rows)
    idle: list[float] = []
    stop = threading.Event()
    t = threading.Thread(target=claim_latency, args=(engine, stop, idle))
    t.start()
    time.sleep(1.0)
    stop.set()
    t.join()
    during: list[float] = []
    stop = threading.Event()
    t = threading.Thread(target=claim_latency, args=(engine, stop, during))
    batches = timed_batches()
    t.start()
    started = time.perf_counter()
    report = queue_retention.prune_queue_rows(engine, 30, 30, args.batch)
    took = time.perf_counter() - started
    stop.set()
    t.join()
    assert report.render_tasks == report.deliveries == args.rows, report
    tenants = TenantDirectory(engine)
    for i in range(args.secrets):
        tenants.create_tenant(f"sealed-{i}")
    with Session(engine) as s, s.begin():  # plain rows, as written before encryption
        s.add_all(
            WebhookTenantRow(tenant_id=f"sealed-{i}", secret=new_secret())
            for i in range(args.secrets)
        )
    store = WebhookStore(engine, SecretBox([new_key()]))
    seal_started = time.perf_counter()
    sealed = store.reseal_secrets()
    seal_took = time.perf_counter() - seal_started

    def ms(seconds: float) -> float:
        return round(1000 * seconds, 1)

    return {
        "db": name,
        "rows_per_table": args.rows,
        "prune_s": round(took, 2),
        "rows_per_s": round(2 * args.rows / took),
        "longest_batch_ms": ms(max(batches)) if batches else None,
        "claim_idle_p50_ms": ms(statistics.median(idle)),
        "claim_during_p50_ms": ms(statistics.median(during)) if during else None,
        "claim_during_max_ms": ms(max(during)) if during else None,
        "sealed": sealed,
        "seal_ms": round(1000 * seal_took, 1),
    }


def main() -> None:
    args = parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        results.append(measure("sqlite", make_engine(f"sqlite:///{tmp}/bench.db"), args))
    if args.postgres:
        schema = f"bf_bench_{secrets.token_hex(4)}"
        admin = sa.create_engine(args.postgres)
        with admin.begin() as c:
            c.execute(sa.text(f"CREATE SCHEMA {schema}"))
        try:
            engine = make_engine(f"{args.postgres}?options=-csearch_path%3D{schema}")
            results.append(measure("postgres", engine, args))
            engine.dispose()
        finally:
            with admin.begin() as c:
                c.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
