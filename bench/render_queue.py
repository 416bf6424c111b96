"""The render queue against the synchronous path, on a real embedded farm (object store, MLflow,
Ray Serve; one replica) in a temporary folder, base model, measured in one run:

- throughput: `--requests` renders from `--concurrency` HTTP clients on
  `POST /v1/images/generations`, against the same renders queued at once on `POST /v1/renders`
  (the dispatcher keeps `render_queue_concurrency` = `--concurrency` in flight); images/s and the
  ratio (the issue's target: >= 0.95x);
- enqueue-to-start overhead: `started_at - created_at` of lone renders on an idle farm
  (median of `--lone`), for async renders and for the tickets synchronous requests take in the
  same queue, and a lone render's time to a result on each path;
- fairness: tenant A queues `--burst` renders, then tenant B queues 5; after how many finished
  renders B's last one finished, against the issue's bound 2 x (5 + concurrency).

    python bench/render_queue.py [--requests 32] [--concurrency 4] [--steps 4] [--burst 100]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import sqlalchemy as sa
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.hotswap import PROMPT  # noqa: E402
from cluster.processes import free_ports  # noqa: E402
from cluster.stack import LocalStack  # noqa: E402
from registry.db import make_engine  # noqa: E402
from registry.render_queue import RenderQueueStore, RenderTaskRow  # noqa: E402
from registry.settings import Settings  # noqa: E402
from registry.tenants import TenantDirectory  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=32, help="Renders timed per path.")
    p.add_argument("--concurrency", type=int, default=4, help="Clients / renders in flight.")
    p.add_argument("--steps", type=int, default=4, help="Denoising steps per image.")
    p.add_argument("--lone", type=int, default=7, help="Lone renders for the overhead.")
    p.add_argument("--burst", type=int, default=100, help="Tenant A's burst (fairness).")
    return p.parse_args()


class Client:
    def __init__(self, settings: Settings, key: str) -> None:
        self.http = httpx.Client(
            base_url=f"{settings.api_url}/v1",
            headers={"Authorization": f"Bearer {key}"},
            timeout=900,
        )

    def sync(self, seed: int, steps: int) -> None:
        body = {"prompt": PROMPT, "steps": steps, "seed": seed, "response_format": "b64_json"}
        self.http.post("/images/generations", json=body).raise_for_status()

    def enqueue(self, seed: int, steps: int) -> str:
        r = self.http.post("/renders", json={"prompt": PROMPT, "steps": steps, "seed": seed})
        r.raise_for_status()
        return r.json()["id"]


def wait_all(queue: RenderQueueStore, ids: list[str], timeout_s: float = 900) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        tasks = [queue.get_any(i) for i in ids]
        if all(t.status == "succeeded" for t in tasks):
            return tasks
        bad = [t for t in tasks if t.status in ("failed", "cancelled")]
        if bad or time.monotonic() > deadline:
            raise SystemExit(f"renders did not all succeed: {bad[:1] or 'timeout'}")
        time.sleep(0.1)


def latest_ticket_wait(engine: sa.Engine, tenant: str) -> float:
    """Enqueue-to-start of the tenant's latest synchronous request's ticket, in seconds."""
    c = RenderTaskRow
    with Session(engine) as s:
        created, started = s.execute(
            sa.select(c.created_at, c.started_at)
            .where(c.tenant_id == tenant, c.sync.is_(True))
            .order_by(c.created_at.desc())
            .limit(1)
        ).one()
    return (started - created).total_seconds()


def main() -> None:
    args = parse_args()
    c = args.concurrency
    with tempfile.TemporaryDirectory(prefix="bench-queue-") as tmp:
        names = Settings.service_port_fields()
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        stack = LocalStack(
            Settings(
                state_dir=Path(tmp) / "state",
                ray_num_cpus=4,
                max_inflight_per_tenant=64,
                render_queue_concurrency=c,
                render_queue_poll_s=0.05,
                max_queued_renders_per_tenant=1000,
                **ports,
            )
        )
        settings = stack.up()
        try:
            engine = make_engine(settings.resolved_database_url)
            tenants, queue = TenantDirectory(engine), RenderQueueStore(engine)
            key = tenants.create_tenant("bench-q").key
            client = Client(settings, key)
            client.sync(0, args.steps)  # warm-up: the replica's first render
            n, steps = args.requests, args.steps

            # Throughput: the sync path with c clients, then the queue with c in flight.
            started = time.perf_counter()
            with cf.ThreadPoolExecutor(c) as pool:
                list(pool.map(lambda i: client.sync(i, steps), range(n)))
            sync_rate = n / (time.perf_counter() - started)
            started = time.time()
            ids = [client.enqueue(i, steps) for i in range(n)]
            last = max(t.finished_at for t in wait_all(queue, ids))
            queue_rate = n / (last.timestamp() - started)

            # Enqueue-to-start and lone-render latency on an idle farm.
            overheads, sync_overheads, lone_queue, lone_sync = [], [], [], []
            for i in range(args.lone):
                t0 = time.perf_counter()
                client.sync(1000 + i, steps)
                lone_sync.append(time.perf_counter() - t0)
                sync_overheads.append(latest_ticket_wait(engine, "bench-q"))
                t0 = time.perf_counter()
                [task] = wait_all(queue, [client.enqueue(1000 + i, steps)])
                lone_queue.append(time.perf_counter() - t0)
                overheads.append((task.started_at - task.created_at).total_seconds())

            # Fairness: A's burst, then B's five.
            key_b = tenants.create_tenant("bench-q-b").key
            client_b = Client(settings, key_b)
            a_ids = [client.enqueue(i, steps) for i in range(args.burst)]
            b_ids = [client_b.enqueue(i, steps) for i in range(5)]
            done = wait_all(queue, a_ids + b_ids, timeout_s=1800)
            b_last = max(t.finished_at for t in done[-5:])
            first = min(t.created_at for t in done[-5:])
            # Renders that finished between B's first enqueue and B's last result (B's own
            # five included): the bound is 2 x (5 + concurrency) of them.
            finished_meanwhile = sum(1 for t in done if first < t.finished_at <= b_last)
            b_span = (b_last - first).total_seconds()
            per_render = statistics.median(lone_queue)
            burst_s = (
                max(t.finished_at for t in done) - min(t.created_at for t in done)
            ).total_seconds()
        finally:
            stack.down()

    print(f"renders: base model, {steps} steps, 1 image each; concurrency {c}")
    print(
        f"throughput: sync {sync_rate:.2f} images/s, queue {queue_rate:.2f} images/s "
        f"(queue/sync {queue_rate / sync_rate:.2f}x)"
    )
    print(
        f"enqueue-to-start (idle farm, median of {args.lone}): "
        f"async {statistics.median(overheads) * 1000:.0f} ms, sync ticket "
        f"{statistics.median(sync_overheads) * 1000:.0f} ms; lone render to result: "
        f"sync {statistics.median(lone_sync) * 1000:.0f} ms, "
        f"queue {statistics.median(lone_queue) * 1000:.0f} ms"
    )
    print(
        f"fairness: A queued {args.burst}, then B 5; from B's first enqueue to its last "
        f"result {finished_meanwhile} renders finished (bound 2 x (5 + {c}) = {2 * (5 + c)}), "
        f"in {b_span:.1f} s = the time of {b_span * queue_rate:.1f} renders at the queue's "
        f"throughput ({b_span / per_render:.1f} lone-render times); all {len(done)} took "
        f"{burst_s:.1f} s"
    )


if __name__ == "__main__":
    main()
