"""Chaos: kill one part of a running farm under load, then check what tenants saw and what
survived. One farm (`chaos_farm`) for the whole suite; the tests run in file order and each
leaves the farm whole again. The figures (requests lost, recovery time, objects lost) are
printed (`-s`) and recorded in docs/benchmarks.md, "Chaos".

Recovery times are measured, never asserted: the machine is shared and slow. The assertions
are about outcomes: no request lost, 503 (never 500) while a dependency is down, no object
lost or changed, every record still there.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import hashlib
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field

import httpx
import openai
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from cluster.cli import app as cli
from cluster.processes import port_is_free
from cluster.stack import http_ok
from cluster.topology import replica_class_name
from finetune.synthetic_lora import register_random_lora
from finetune.world import write_brand_zip
from registry.adapters import AdapterRegistry
from registry.base_models import load_pipeline
from registry.storage import ObjectStore
from tests.conftest import Farm
from tests.polling import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

PROMPT = "a red circle on a blue background"
STEPS = 4  # few denoising steps: the suite measures the farm's recovery, not rendering


def figures(scenario: str, **values: object) -> None:
    """Print one scenario's figures in one greppable line."""
    shown = ", ".join(
        f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )
    print(f"\nCHAOS {scenario}: {shown}", flush=True)


def render_body(seed: int, **extra: object) -> dict:
    return {"prompt": PROMPT, "seed": seed, "steps": STEPS, "response_format": "b64_json", **extra}


@dataclass
class Outcome:
    started: float
    ended: float = 0.0
    ok: bool = False
    error: str = ""


@dataclass
class Responses:
    """Every HTTP response the clients saw (retries included), as (time, status, error code)."""

    seen: list[tuple[float, int, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hook(self, response: httpx.Response) -> None:
        code = None
        if response.status_code >= 400:
            response.read()
            try:
                code = response.json()["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = response.text[:80]
        with self.lock:
            self.seen.append((time.monotonic(), response.status_code, code))

    def statuses(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for _, status, _ in self.seen:
            out[status] = out.get(status, 0) + 1
        return out

    def errors(self) -> list[tuple[int, str | None]]:
        return [(status, code) for _, status, code in self.seen if status >= 400]


@pytest.fixture(scope="module")
def tenant(chaos_farm: Farm) -> tuple[str, str]:
    name = f"chaos-{uuid.uuid4().hex[:6]}"
    return name, chaos_farm.new_tenant(name)


# --- replica killed -------------------------------------------------------------------------


def replica_pids(farm: Farm) -> list[int]:
    """The pids of the farm's live diffusion replicas, from Ray's state API."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=farm.settings.ray_dashboard_url,
        filters=[("class_name", "=", replica_class_name()), ("state", "=", "ALIVE")],
        detail=True,
        raise_on_missing_output=False,
    )
    return sorted(a.pid for a in actors if a.pid)


def test_replica_killed_under_openai_stream_loses_no_request(chaos_farm, tenant):
    """SIGKILL the one diffusion replica while the real openai client (default retries: 2)
    streams renders; every request still gets its image, and errors on the way are 503."""
    farm, (_, key) = chaos_farm, tenant
    total, workers = 24, 3
    responses = Responses()
    http = httpx.Client(event_hooks={"response": [responses.hook]}, timeout=600)
    client = openai.OpenAI(base_url=farm.api, api_key=key, http_client=http)  # max_retries=2
    assert client.max_retries == 2
    size = f"{farm.model.native_size}x{farm.model.native_size}"
    outcomes: list[Outcome] = []
    done = threading.Event()
    killed_at: list[float] = []

    def one(i: int) -> Outcome:
        out = Outcome(started=time.monotonic())
        try:
            result = client.images.generate(
                prompt=PROMPT,
                size=size,
                response_format="b64_json",
                extra_body={"seed": 1000 + i, "steps": STEPS},
            )
            out.ok = len(result.data) == 1 and bool(base64.b64decode(result.data[0].b64_json))
        except openai.OpenAIError as e:
            out.error = f"{type(e).__name__}: {e}"[:300]
        out.ended = time.monotonic()
        outcomes.append(out)
        return out

    old = replica_pids(farm)
    assert len(old) == 1, old
    with cf.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(one, i) for i in range(total)]

        def kill_when_warm() -> None:
            # Kill once the stream is flowing (some renders done, others in flight).
            wait_for(lambda: sum(o.ok for o in outcomes) >= workers, 600, "first renders")
            os.kill(old[0], signal.SIGKILL)
            killed_at.append(time.monotonic())
            done.set()

        killer = threading.Thread(target=kill_when_warm, daemon=True)
        killer.start()
        cf.wait(futures)
    killer.join(timeout=5)
    http.close()
    assert done.is_set(), "the replica was never killed"

    kill_t = killed_at[0]
    lost = [o for o in outcomes if not o.ok]
    after = [o.ended for o in outcomes if o.ok and o.ended > kill_t]
    assert after, "no render succeeded after the kill"
    recovery_s = min(after) - kill_t
    in_flight = sum(1 for o in outcomes if o.started < kill_t < o.ended)
    new = replica_pids(farm)
    figures(
        "replica-killed",
        requests=total,
        in_flight_at_kill=in_flight,
        lost=len(lost),
        recovery_s=recovery_s,
        responses=responses.statuses(),
        errors=sorted(set(responses.errors())),
    )
    assert new and new != old, f"Serve did not replace the killed replica: {old} -> {new}"
    assert not lost, [o.error for o in lost]
    # What the clients retried were retryable answers, never a bare 500.
    assert all(status == 503 for status, _ in responses.errors()), responses.errors()


def test_replica_killed_under_async_renders_each_finishes_once(chaos_farm):
    """SIGKILL the diffusion replica while the render queue has renders in flight: every
    accepted render still succeeds (the lost ones are queued again), each is charged once and
    stored once."""
    farm = chaos_farm
    name = f"async-chaos-{uuid.uuid4().hex[:6]}"
    key = farm.new_tenant(name)
    total = 12
    with farm.http(key) as http:
        ids = []
        for i in range(total):
            r = http.post("/renders", json=render_body(5000 + i))
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])

        def statuses() -> list[str]:
            return [http.get(f"/renders/{i}").json()["status"] for i in ids]

        old = replica_pids(farm)
        assert len(old) == 1, old
        wait_for(
            lambda: (s := statuses()).count("succeeded") >= 2 and "in_progress" in s,
            600,
            "some renders done and others in flight",
        )
        in_flight = statuses().count("in_progress")
        os.kill(old[0], signal.SIGKILL)
        killed = time.monotonic()
        wait_for(
            lambda: all(s in ("succeeded", "failed", "cancelled") for s in statuses()),
            900,
            "every render ended",
        )
        ended = time.monotonic()
        final = [http.get(f"/renders/{i}").json() for i in ids]
    figures(
        "replica-killed-async",
        renders=total,
        in_flight_at_kill=in_flight,
        failed=sum(r["status"] != "succeeded" for r in final),
        all_done_after_kill_s=ended - killed,
    )
    assert [r["status"] for r in final] == ["succeeded"] * total, final
    assert farm.tenants.count_renders(name) == total  # charged once each
    stored = [o.key for o in farm.store.list(f"tenants/{name}/renders/")]
    assert sorted(k.split("/")[3] for k in stored) == sorted(ids), stored  # one image each
    assert replica_pids(farm) != old


# --- S3 killed ------------------------------------------------------------------------------


def all_object_shas(farm: Farm) -> dict[tuple[str, str], str]:
    """(bucket, key) -> sha256 of the content, for every object in both of the farm's buckets."""
    out = {}
    for bucket in (farm.settings.s3_bucket, farm.settings.mlflow_artifacts_bucket):
        store = ObjectStore.from_settings(farm.settings, bucket=bucket)
        for info in store.list(""):
            out[(bucket, info.key)] = hashlib.sha256(store.get_bytes(info.key)).hexdigest()
    return out


class RenderLoad:
    """Renders sent back to back from `workers` threads (plain httpx, no retries) until
    stopped; records every answer."""

    def __init__(self, farm: Farm, key: str, workers: int = 2, **body: object) -> None:
        self.farm, self.key, self.body = farm, key, body
        self.answers: list[tuple[float, int, str | None, dict | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(workers)]

    def __enter__(self) -> RenderLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=900)

    def _run(self, worker: int) -> None:
        seed = worker * 100_000
        with self.farm.http(self.key) as http:
            while not self._stop.is_set():
                seed += 1
                try:
                    r = http.post(
                        "/images/generations", json=render_body(seed, **self.body), timeout=600
                    )
                except httpx.HTTPError as e:
                    self.answers.append((time.monotonic(), 0, type(e).__name__, None))
                    continue
                body = (
                    r.json()
                    if r.headers.get("content-type", "").startswith("application/json")
                    else None
                )
                code = (body or {}).get("error", {}).get("code") if r.status_code >= 400 else None
                self.answers.append((time.monotonic(), r.status_code, code, body))

    def count(self, status: int, since: float = 0.0) -> int:
        return sum(1 for t, s, _, _ in self.answers if s == status and t > since)

    def statuses(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for _, s, _, _ in self.answers:
            out[s] = out.get(s, 0) + 1
        return out


def test_s3_killed_under_load_answers_503_and_loses_no_object(chaos_farm, tenant):
    """SIGKILL `rclone serve s3` under renders; they answer 503 (never 500) until `up`
    restarts it; every object stored before, and every render acknowledged, is still there."""
    farm, (tenant_id, key) = chaos_farm, tenant
    before = all_object_shas(farm)
    s3 = farm.stack.component("s3")
    with RenderLoad(farm, key, response_format="url") as load:
        wait_for(lambda: load.count(200) >= 2, 600, "renders flowing before the kill")
        assert s3.kill()
        killed = time.monotonic()
        wait_for(lambda: load.count(503, since=killed) >= 4, 600, "503s while S3 is down")
        healthz = httpx.get(f"{farm.settings.api_url}/healthz", timeout=60).status_code
        farm.settings = farm.stack.up()  # idempotent: restarts S3 only
        restarted = time.monotonic()
        wait_for(lambda: load.count(200, since=restarted) >= 1, 600, "a render after the restart")
    first_ok = min(t for t, s, _, _ in load.answers if s == 200 and t > restarted)
    after = all_object_shas(farm)
    lost = [k for k in before if k not in after]
    changed = [k for k in before if k in after and after[k] != before[k]]
    # Renders the farm acknowledged (200, even while S3 was going down) must be stored.
    acked = [
        url
        for t, s, _, body in load.answers
        if s == 200 and t > killed - 30 and body
        for url in (d["url"] for d in body["data"])
    ]
    unreadable = [u for u in acked if httpx.get(u, timeout=60).status_code != 200]
    others = {(s, c) for _, s, c, _ in load.answers if s not in (200, 503)}
    # Error hygiene (issue 11, point 7) is another change's; here it is only counted.
    endpoint = f":{farm.settings.s3_port}"
    leaks = sum(1 for _, s, _, body in load.answers if s == 503 and endpoint in str(body))
    figures(
        "s3-killed",
        objects_before=len(before),
        objects_lost=len(lost) + len(changed),
        acknowledged_during_outage_unreadable=len(unreadable),
        answers=load.statuses(),
        codes_503=sorted({c for _, s, c, _ in load.answers if s == 503}),
        answers_naming_the_s3_endpoint=leaks,
        recovery_s=first_ok - restarted,
        outage_s=restarted - killed,
    )
    assert healthz == 503
    assert not others, f"answers other than 200/503 while S3 was down: {others}"
    assert not lost and not changed, (lost, changed)
    assert not unreadable, unreadable
    assert tenant_id  # the tenant's renders are among the objects checked


# --- MLflow killed --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(chaos_farm, tenant, tmp_path_factory) -> dict[str, int]:
    """Two brands of the chaos tenant: `held` (rendered before MLflow goes, so a replica holds
    it and the ingress knows it) and `cold` (registered, never rendered)."""
    farm, (tenant_id, _) = chaos_farm, tenant
    registry = AdapterRegistry(farm.settings.resolved_mlflow_uri)
    mlflow = MlflowClient(farm.settings.resolved_mlflow_uri)
    unet = load_pipeline(farm.model, "cpu").unet
    root = tmp_path_factory.mktemp("chaos-loras")
    out = {}
    for seed, brand in enumerate(("held", "cold")):
        version = register_random_lora(
            registry, mlflow, tenant_id, brand, farm.model, unet, root / brand, seed=seed
        )
        out[brand] = version.version
    return out


def render(farm: Farm, key: str, seed: int, **extra: object) -> httpx.Response:
    with farm.http(key) as http:
        return http.post("/images/generations", json=render_body(seed, **extra))


def test_mlflow_killed_held_adapters_and_base_go_on_others_503(chaos_farm, tenant, adapters):
    """SIGKILL the MLflow server: base renders and renders of an adapter already in use go on
    (by alias and by version); an adapter never resolved gets 503; all recover after `up`."""
    farm, (_, key) = chaos_farm, tenant
    held, cold = adapters["held"], adapters["cold"]
    by_alias, by_version, never = "held", f"held:{held}", f"cold:{cold}"
    for i, ref in enumerate((by_alias, by_version)):
        r = render(farm, key, i, adapter=ref)
        assert r.status_code == 200, r.text
        assert r.json()["adapter"]["version"] == held
    mlflow = farm.stack.component("mlflow")
    assert mlflow.kill()
    killed = time.monotonic()
    health = f"{farm.settings.resolved_mlflow_uri}/health"
    wait_for(lambda: not http_ok(health), 60, "MLflow down")
    # Past the alias TTL, so the alias's answer can no longer come from the fresh cache.
    ttl = farm.settings.adapter_resolve_ttl_s
    wait_for(lambda: time.monotonic() - killed > ttl, ttl + 5, "the alias TTL to pass")

    during: dict[str, tuple[int, str | None]] = {}
    for i, (name, extra) in enumerate(
        {
            "base": {},
            "held_alias": {"adapter": by_alias},
            "held_version": {"adapter": by_version},
            "not_held": {"adapter": never},
        }.items()
    ):
        started = time.monotonic()
        r = render(farm, key, 10 + i, **extra)
        code = r.json().get("error", {}).get("code") if r.status_code != 200 else None
        during[name] = (r.status_code, code, round(time.monotonic() - started, 1))
        if name.startswith("held") and r.status_code == 200:
            assert r.json()["adapter"]["version"] == held
    with farm.http(key) as http:
        listed = http.get("/adapters")
        adapters_route = listed.status_code
        aliased = http.post(
            f"/adapters/{never.split('@')[0].split(':')[0]}/aliases/staging", json={"version": 1}
        )

    farm.settings = farm.stack.up()  # idempotent: restarts MLflow only
    restarted = time.monotonic()
    recovery_s = wait_for(
        lambda: render(farm, key, 20, adapter=never).status_code == 200,
        600,
        "an adapter render after MLflow is back",
        every_s=1.0,
    )
    figures(
        "mlflow-killed",
        during=during,
        adapters_route_status=adapters_route,
        lost=sum(1 for n in ("base", "held_alias", "held_version") if during[n][0] != 200),
        recovery_s=recovery_s,
        outage_s=restarted - killed,
    )
    assert during["base"][0] == 200, during
    # Every adapter route answers 503 registry_unavailable while MLflow is down, never 500.
    assert adapters_route == 503 and listed.json()["error"]["code"] == "registry_unavailable"
    assert aliased.status_code == 503, aliased.text
    assert aliased.json()["error"]["code"] == "registry_unavailable"
    assert during["held_alias"][0] == 200, during
    assert during["held_version"][0] == 200, during
    assert during["not_held"][:2] == (503, "registry_unavailable"), during


# --- Ray head restarted ---------------------------------------------------------------------


def farm_listing(farm: Farm, keys: dict[str, str]) -> dict:
    """What each tenant can list through the API, plus the tenants and every registered model
    version (MLflow)."""
    out: dict = {"tenants": sorted((t.id, t.active_keys) for t in farm.tenants.list_tenants())}
    for tenant_id, key in keys.items():
        with farm.http(key) as http:
            files = http.get("/files")
            jobs = http.get("/fine_tuning/jobs", params={"limit": 100})
            adapters = http.get("/adapters")
        for r in (files, jobs, adapters):
            assert r.status_code == 200, r.text
        out[tenant_id] = {
            "files": sorted((f["id"], f["bytes"], f["filename"]) for f in files.json()["data"]),
            "jobs": sorted((j["id"], j["status"]) for j in jobs.json()["data"]),
            "adapters": adapters.json(),
        }
    mlflow = MlflowClient(farm.settings.resolved_mlflow_uri)
    out["mlflow"] = sorted(
        (v.name, v.version, v.tags.get("sha256"))
        for m in mlflow.search_registered_models()
        for v in mlflow.search_model_versions(f"name = '{m.name}'")
    )
    return out


def test_ray_head_restarted_keeps_every_tenant_file_job_and_adapter(
    chaos_farm, tenant, adapters, tmp_path
):
    """SIGKILL the Ray head (every Ray process of the farm goes with it), run `brandfarm up`
    again; every tenant, file, job and adapter is still there, and renders work."""
    farm, (tenant_id, key) = chaos_farm, tenant
    data = write_brand_zip(tmp_path / "acme.zip", "acme", n=4, seed=1).read_bytes()
    with farm.http(key) as http:
        up = http.post("/files", files={"file": ("acme.zip", data)}, data={"purpose": "fine-tune"})
        assert up.status_code == 200, up.text
        job = http.post(
            "/fine_tuning/jobs",
            json={
                "training_file": up.json()["id"],
                "brand": "acme",
                "trigger_word": "acme style",
                "hyperparameters": {"steps": 2, "rank": 4, "alpha": 4, "batch_size": 2},
            },
        )
        assert job.status_code == 200, job.text
        job_id = job.json()["id"]
        cancel = http.post(f"/fine_tuning/jobs/{job_id}/cancel")
        assert cancel.status_code in (200, 409), cancel.text

        def ended() -> bool:
            status = http.get(f"/fine_tuning/jobs/{job_id}").json()["status"]
            return status in ("succeeded", "failed", "cancelled")

        wait_for(ended, 600, "the job to end", every_s=1.0)
    other_id = f"chaos-other-{uuid.uuid4().hex[:6]}"
    keys = {tenant_id: key, other_id: farm.new_tenant(other_id)}
    with farm.http(keys[other_id]) as http:
        up = http.post("/files", files={"file": ("b.zip", data)}, data={"purpose": "fine-tune"})
        assert up.status_code == 200, up.text
    before = farm_listing(farm, keys)
    objects_before = all_object_shas(farm)

    ray_head = farm.stack.component("ray")
    assert ray_head.kill()
    killed = time.monotonic()
    s = farm.settings
    ports = (
        s.ray_gcs_port,
        s.ray_dashboard_port,
        s.ray_client_port,
        s.ray_dashboard_agent_port,
        s.ray_metrics_export_port,
        s.api_port,
    )
    wait_for(lambda: all(port_is_free(s.host, p) for p in ports), 120, "Ray's ports freed")
    result = CliRunner().invoke(cli, ["up"], env=farm.cli_env())
    assert result.exit_code == 0, result.output
    restarted_s = time.monotonic() - killed
    after = farm_listing(farm, keys)
    objects_after = all_object_shas(farm)
    objects_lost = [k for k, sha in objects_before.items() if objects_after.get(k) != sha]
    r = render(farm, key, 30, adapter="held")
    figures(
        "ray-head-restarted",
        up_after_kill_s=restarted_s,
        tenants=len(before["tenants"]),
        files=len(before[tenant_id]["files"]),
        jobs=len(before[tenant_id]["jobs"]),
        model_versions=len(before["mlflow"]),
        records_lost=sum(
            len(set(map(str, before[k])) - set(map(str, after[k]))) for k in ("tenants", "mlflow")
        ),
        objects=len(objects_before),
        objects_lost=len(objects_lost),
        render_after=r.status_code,
    )
    assert after == before
    assert not objects_lost, objects_lost
    assert before[tenant_id]["files"] and before[tenant_id]["jobs"]
    assert {"held", "cold"} <= {a["brand"] for a in before[tenant_id]["adapters"]["data"]}
    assert r.status_code == 200, r.text
    assert r.json()["adapter"]["version"] == adapters["held"]
