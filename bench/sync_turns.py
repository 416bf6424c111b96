"""What riding the render queue adds to one synchronous render: the turn of
`POST /v1/images/generations` (`serve.render_queue.RenderDispatcher.turn`) with nothing to render,
on SQLite and Postgres, one request at a time on an idle dispatcher.

A turn writes the request's ticket (plan read, enqueue with its fair-queuing tags), wakes the
dispatcher's thread, which claims the ticket and hands the turn back to the request's loop; the
request then renders (nothing here) and closes the ticket. Reports the median and p95 of the
whole turn, and of enqueue-to-start (the ticket's `started_at - created_at`, as the dispatcher's
claim recorded it). Postgres is skipped where 127.0.0.1:5432 does not answer.

    python bench/sync_turns.py [--turns 200]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import sqlalchemy as sa
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.render_limits import PG_URL  # noqa: E402
from registry.db import make_engine  # noqa: E402
from registry.render_limits import RenderLimiter  # noqa: E402
from registry.render_queue import RenderQueueStore, RenderTaskRow  # noqa: E402
from registry.tenants import TenantDirectory  # noqa: E402
from serve.io_pools import BlockingPool  # noqa: E402
from serve.protocol import RenderJob  # noqa: E402
from serve.render_queue import RenderDispatcher  # noqa: E402


def p95(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.95)]


def turns(engine: sa.Engine, count: int) -> tuple[list[float], list[float]]:
    tenant = TenantDirectory(engine).create_tenant(f"turns-{time.monotonic_ns()}").tenant_id
    queue = RenderQueueStore(engine)
    images = SimpleNamespace(limiter=RenderLimiter(engine, 60), max_inflight=64)
    service = SimpleNamespace(db=BlockingPool("db", 8), default_plan="fast")
    dispatcher = RenderDispatcher(
        queue, images, None, service, concurrency=4, lease_s=30, max_attempts=3, poll_s=0.2
    )
    stop = dispatcher.start()
    job = RenderJob("a red circle", None, 64, 64, 20, 5.0, (1,))

    async def run() -> list[float]:
        seconds = []
        for _ in range(count):
            t0 = time.perf_counter()
            async with dispatcher.turn(tenant, job):
                pass
            seconds.append(time.perf_counter() - t0)
        return seconds

    try:
        whole = asyncio.run(run())
    finally:
        stop()
    with Session(engine) as s:
        rows = s.execute(
            sa.select(RenderTaskRow.created_at, RenderTaskRow.started_at).where(
                RenderTaskRow.tenant_id == tenant
            )
        ).all()
    return whole, [(started - created).total_seconds() for created, started in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--turns", type=int, default=200, help="Turns per database.")
    args = p.parse_args()
    ms = 1000

    def report(name: str, engine: sa.Engine) -> None:
        whole, to_start = turns(engine, args.turns)
        print(
            f"{name}: turn median {statistics.median(whole) * ms:.1f} ms, "
            f"p95 {p95(whole) * ms:.1f} ms; enqueue-to-start median "
            f"{statistics.median(to_start) * ms:.1f} ms, p95 {p95(to_start) * ms:.1f} ms "
            f"({args.turns} turns, one at a time)"
        )
        engine.dispose()

    with tempfile.TemporaryDirectory() as tmp:
        report("sqlite", make_engine(f"sqlite:///{tmp}/turns.db"))
    schema = f"bf_bench_{secrets.token_hex(4)}"
    try:
        admin = sa.create_engine(PG_URL)
        with admin.begin() as c:
            c.execute(sa.text(f"CREATE SCHEMA {schema}"))
    except Exception as e:  # noqa: BLE001 - any connection failure means: skip
        print(f"postgres: skipped, {PG_URL} does not answer ({type(e).__name__})")
        return
    try:
        report("postgres", make_engine(f"{PG_URL}?options=-csearch_path%3D{schema}"))
    finally:
        with admin.begin() as c:
            c.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


if __name__ == "__main__":
    main()
