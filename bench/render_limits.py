"""The cost of cluster-wide render admission (registry.render_limits): what one render adds to
the farm database, on SQLite and Postgres.

Each of `--threads` threads (ingress DB-pool threads, as on one or several ingress replicas)
runs `--renders` cycles of admit (slot + quota reservation) → commit (usage row; slot and
reservation dropped) → release (a no-op after commit, as on the ingress), the transactions one
successful render makes; and, for comparison, the DB calls of the former in-memory check (read
the tenant, read its hourly usage, write the usage row). Half the threads use tenant A, half
tenant B, so the figure includes waiting on one tenant's lock. Reports cycles/s and the median
and p99 of one cycle. Postgres is skipped where 127.0.0.1:5432 does not answer.

    python bench/render_limits.py [--threads 8] [--renders 200]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import sqlalchemy as sa

from registry.db import make_engine
from registry.render_limits import RenderLimiter
from registry.tenants import TenantDirectory

LABEL = {True: "in-memory", False: "leased"}
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def cycles(
    engine: sa.Engine, threads: int, renders: int, before: bool
) -> tuple[float, list[float]]:
    tenants = TenantDirectory(engine)
    names = [f"bench-{secrets.token_hex(3)}" for _ in range(2)]
    for name in names:
        tenants.create_tenant(name, images_per_hour=10**9)
    limiter = RenderLimiter(engine, 60.0)

    def admitted(tenant: str) -> None:
        admission = limiter.admit(tenant, 1, max_inflight=threads)
        limiter.commit(admission, secrets.token_hex(12), 1, "bench")
        limiter.release(admission)

    def in_memory(tenant: str) -> None:  # the former path: its DB calls, without the race fix
        tenants.get_tenant(tenant)
        tenants.images_in_last_hour(tenant)
        tenants.record_render(secrets.token_hex(12), tenant, 1, "bench")

    def worker(i: int) -> list[float]:
        tenant, took = names[i % 2], []
        for _ in range(renders):
            t0 = time.perf_counter()
            (in_memory if before else admitted)(tenant)
            took.append(time.perf_counter() - t0)
        return took

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        per_thread = list(pool.map(worker, range(threads)))
    return time.perf_counter() - start, [t for ts in per_thread for t in ts]


def report(label: str, wall: float, took: list[float]) -> None:
    took.sort()
    p99 = took[min(len(took) - 1, int(0.99 * len(took)))]
    median = statistics.median(took)
    print(
        f"{label:18s} {len(took) / wall:8.0f} renders/s   median {median * 1e3:6.2f} ms"
        f"   p99 {p99 * 1e3:6.2f} ms   ({len(took)} cycles)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=8, help="Concurrent admitting threads.")
    parser.add_argument("--renders", type=int, default=200, help="Cycles per thread.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{Path(tmp) / 'bench.db'}")
        for before in (True, False):
            report(f"sqlite {LABEL[before]}", *cycles(engine, args.threads, args.renders, before))
        engine.dispose()
    schema = f"bf_bench_{secrets.token_hex(4)}"
    try:
        admin = sa.create_engine(PG_URL)
        with admin.begin() as c:
            c.execute(sa.text(f"CREATE SCHEMA {schema}"))
    except Exception as e:  # noqa: BLE001 - any connection failure means: skip
        print(f"postgres  skipped: {PG_URL} does not answer ({type(e).__name__})")
        return
    try:
        engine = make_engine(f"{PG_URL}?options=-csearch_path%3D{schema}")
        for before in (True, False):
            report(f"postgres {LABEL[before]}", *cycles(engine, args.threads, args.renders, before))
        engine.dispose()
    finally:
        with admin.begin() as c:
            c.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


if __name__ == "__main__":
    main()
