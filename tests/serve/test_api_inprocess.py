"""The API in-process over real parts (engine, SQLite, object store; MLflow refusing or hung):
bad input, isolation from a hung registry, admission limits, cancellation, error hygiene."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3

import pytest

from registry.adapter_refs import MAX_VERSION
from serve.adapter_cache import AdapterFetcher, AdapterLoadError, parse_weights
from serve.errors import error_body
from serve.protocol import AdapterSpec, ImageGenerationRequest
from tests.polling import async_wait_for
from tests.serve.conftest import LocalParts, SilentServer, client

RENDER = "/v1/images/generations"
TINY = {"prompt": "a red circle", "steps": 1, "size": "64x64"}
INTERNAL_CLASS = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception|Timeout)\b")


def new_tenant(services, name: str) -> str:
    return services.tenants.create_tenant(name).key


def assert_no_internals(parts: LocalParts, body: str, *urls: str) -> None:
    """Nothing of the farm's insides in a tenant's answer: endpoints, paths, exception classes."""
    assert "http://" not in body and "https://" not in body, body
    for url in (parts.settings.resolved_s3_endpoint, *urls):
        assert url.split("://")[-1] not in body, body
    assert str(parts.state) not in body and "/tmp/" not in body, body
    assert not INTERNAL_CLASS.search(body), body


def run(coro):
    return asyncio.run(coro)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ('{"prompt": "\\ud800"}', "prompt"),
        ('{"prompt": "a", "negative_prompt": "x\\udfff"}', "negative_prompt"),
        ('{"prompt": "a", "n": true}', "n"),
        ('{"prompt": "a", "adapter": "acme:99999999999999999999"}', "adapter"),
        ('{"prompt": "a", "adapter": "acme:' + str(MAX_VERSION + 1) + '"}', "adapter"),
        # A lone surrogate in a field *name* cannot name the field: the body is refused.
        ('{"prompt": "a", "\\ud800": 1}', "body"),
    ],
)
def test_bad_bodies_are_400_naming_the_field(local_parts, raw, param):
    mlflow = SilentServer()  # an adapter lookup would hang here: none may be made
    services = local_parts.services(mlflow.url)
    key = new_tenant(services, "bad-body-co")

    async def go():
        async with client(services, key) as c:
            return await c.post(RENDER, content=raw, headers={"content-type": "application/json"})

    try:
        r = run(go())
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["code"] == "invalid_value"
        assert mlflow.accepted == []  # refused before any registry call
    finally:
        mlflow.close()


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("after=" + "1" + "0" * 30, "after"),
        ("after=-" + "1" + "0" * 30, "after"),
        ("after=-1", "after"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=true", "limit"),
    ],
)
def test_event_paging_bounds_are_400(local_parts, query, param):
    services = local_parts.services()
    key = new_tenant(services, "paging-co")

    async def go():
        async with client(services, key) as c:
            return await c.get(f"/v1/fine_tuning/jobs/ftjob-x/events?{query}")

    r = run(go())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_alias_version_is_strict_and_bounded(local_parts):
    services = local_parts.services()
    key = new_tenant(services, "alias-co")

    async def go():
        async with client(services, key) as c:
            out = []
            for version in (True, "3", 0, MAX_VERSION + 1):
                out.append(
                    await c.post("/v1/adapters/acme/aliases/production", json={"version": version})
                )
            return out

    for r in run(go()):
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "version"


# --- the services in-process ----------------------------------------------------------------


def test_base_render_stores_records_and_names_its_request(local_parts):
    services = local_parts.services()
    key = new_tenant(services, "render-co")

    async def go():
        async with client(services, key) as c:
            return await c.post(RENDER, json={**TINY, "n": 2, "seed": 5}), await c.get("/v1/files")

    r, files = run(go())
    assert r.status_code == 200, r.text
    assert re.fullmatch(r"req_[0-9a-f]{16}", r.headers["x-request-id"])
    body = r.json()
    assert [d["seed"] for d in body["data"]] == [5, 6]
    assert services.tenants.count_renders() == 1
    assert files.status_code == 200 and files.json()["data"] == []


def test_unknown_adapter_with_mlflow_refusing_is_503_on_every_adapter_route(local_parts):
    refused = local_parts.refused_url()
    services = local_parts.services(refused)
    key = new_tenant(services, "adapter-down-co")

    async def go():
        async with client(services, key) as c:
            return [
                await c.get("/v1/adapters"),
                await c.post("/v1/adapters/acme/aliases/production", json={"version": 1}),
                await c.post(RENDER, json={**TINY, "adapter": "acme"}),
                await c.post(RENDER, json={**TINY, "adapter": "acme@staging"}),
                await c.post(RENDER, json={**TINY, "adapter": "acme:3"}),
                await c.get("/v1/adapters/acme/policy"),
                await c.put("/v1/adapters/acme/policy", json={"auto_promote": True}),
            ]

    for r in run(go()):
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "registry_unavailable"
        assert r.headers["retry-after"]
        assert_no_internals(local_parts, r.text, refused)


def test_a_hung_registry_does_not_stall_base_model_renders(local_parts):
    """Eight adapter renders hang on MLflow (more than the registry pool's two threads, and more
    than asyncio's default pool on this box); another tenant's base-model render completes
    meanwhile. Once MLflow drops the connections, every adapter render answers 503."""
    mlflow = SilentServer()
    services = local_parts.services(mlflow.url, registry_io_threads=2, mlflow_request_timeout_s=600)
    hanging_key = new_tenant(services, "hung-co")
    base_key = new_tenant(services, "base-co")

    async def go():
        async with client(services, hanging_key) as hung, client(services, base_key) as base:
            stuck = [
                asyncio.create_task(hung.post(RENDER, json={**TINY, "adapter": f"brand-{i}"}))
                for i in range(8)
            ]
            await async_wait_for(
                lambda: len(mlflow.accepted) >= 2, 60, "the registry pool's calls reach MLflow"
            )
            rendered = await base.post(RENDER, json=TINY)
            pending = sum(not t.done() for t in stuck)
            mlflow.close()  # MLflow "comes back" refusing: the lookups fail instead of hanging
            answers = await asyncio.wait_for(asyncio.gather(*stuck), 120)
            return rendered, pending, answers

    try:
        rendered, pending, answers = run(go())
    finally:
        mlflow.close()
    assert rendered.status_code == 200, rendered.text
    assert pending == 8  # every adapter render was still stuck when the base render finished
    assert len(mlflow.accepted) == 2  # the pool bounded the calls in flight to MLflow
    for r in answers:
        assert r.status_code == 503 and r.json()["error"]["code"] == "registry_unavailable"
        assert_no_internals(local_parts, r.text, mlflow.url)


def test_a_registry_that_never_answers_times_out_into_503(local_parts):
    mlflow = SilentServer()
    services = local_parts.services(mlflow.url, mlflow_request_timeout_s=1)
    key = new_tenant(services, "timeout-co")

    async def go():
        async with client(services, key) as c:
            return await c.post(RENDER, json={**TINY, "adapter": "acme"})

    try:
        r = run(go())
    finally:
        mlflow.close()
    assert r.status_code == 503 and r.json()["error"]["code"] == "registry_unavailable"
    assert len(mlflow.accepted) == 1  # no retries (mlflow_max_retries=0)
    assert_no_internals(local_parts, r.text, mlflow.url)


# --- admission ------------------------------------------------------------------------------


def test_a_burst_over_the_tenant_limit_gets_429_with_retry_after(local_parts):
    services = local_parts.services(max_inflight_per_tenant=2)
    key = new_tenant(services, "burst-co")
    other = new_tenant(services, "calm-co")
    engine_lock = local_parts.engine._lock  # held: renders wait in the engine, in flight

    async def go():
        async with client(services, key) as c, client(services, other) as o:
            engine_lock.acquire()
            try:
                burst = [asyncio.create_task(c.post(RENDER, json=TINY)) for _ in range(6)]
                await async_wait_for(
                    lambda: sum(t.done() for t in burst) == 4, 60, "four answered at once"
                )
                answered_at_once = [t for t in burst if t.done()]
                calm = asyncio.create_task(o.post(RENDER, json=TINY))  # its own limit
                await async_wait_for(
                    lambda: services.images.limiter.inflight("calm-co") == 1, 60, "calm-co admitted"
                )
            finally:
                engine_lock.release()
            admitted = [await t for t in burst if t not in answered_at_once]
            return [t.result() for t in answered_at_once], admitted, await calm

    refused, admitted, calm = run(go())
    assert [r.status_code for r in refused] == [429] * 4
    for r in refused:
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert "limit 2" in r.json()["error"]["message"] and r.headers["retry-after"]
    assert [r.status_code for r in admitted] == [200, 200]
    assert calm.status_code == 200


def test_a_cancelled_render_frees_its_slot(local_parts):
    """What Serve does when a client disconnects: the request's task is cancelled. The slot is
    given back at once, so the tenant is not locked out by renders no one waits for."""
    services = local_parts.services(max_inflight_per_tenant=1)
    tenant = "cancel-co"
    services.tenants.create_tenant(tenant)
    engine_lock = local_parts.engine._lock
    req = ImageGenerationRequest(**TINY)

    async def go():
        engine_lock.acquire()
        try:
            task = asyncio.create_task(services.images.generate(tenant, req))
            await async_wait_for(
                lambda: services.images.limiter.inflight(tenant) == 1, 60, "admitted"
            )
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            freed = services.images.limiter.inflight(tenant)
        finally:
            engine_lock.release()
        return freed, await services.images.generate(tenant, req)

    freed, again = run(go())
    assert freed == 0
    assert len(again.data) == 1


# --- error hygiene --------------------------------------------------------------------------


def test_an_unexpected_error_is_a_generic_500_with_a_request_id_in_the_logs(local_parts, caplog):
    services = local_parts.services()
    key = new_tenant(services, "broken-db-co")
    with sqlite3.connect(services.tenants.engine.url.database) as db:
        db.execute("DROP TABLE renders")  # the usage record fails after the render

    async def go():
        async with client(services, key) as c:
            return await c.post(RENDER, json=TINY)

    with caplog.at_level(logging.ERROR):
        r = run(go())
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    rid = r.headers["x-request-id"]
    assert err["code"] == "internal_error" and rid in err["message"]
    assert_no_internals(local_parts, r.text)
    logged = [rec for rec in caplog.records if rid in rec.getMessage()]
    assert logged and logged[0].exc_info is not None  # the detail is in the log, under the id


def test_adapter_failures_tell_the_tenant_what_to_do_and_nothing_internal(local_parts):
    store_settings = local_parts.settings
    from registry.storage import ObjectStore

    store = ObjectStore.from_settings(store_settings, bucket=store_settings.mlflow_artifacts_bucket)
    store.put_bytes("hygiene/garbage.safetensors", b"not safetensors at all")
    fetcher = AdapterFetcher(store)

    def spec(uri: str, sha: str) -> AdapterSpec:
        return AdapterSpec("acme", "brand", 3, 1.0, sha, uri, "brand:3")

    import hashlib

    garbage_sha = hashlib.sha256(b"not safetensors at all").hexdigest()
    failures = []
    for s in (
        spec("mlflow-artifacts:/hygiene/garbage.safetensors", garbage_sha),  # corrupt file
        spec("mlflow-artifacts:/hygiene/garbage.safetensors", "0" * 64),  # checksum mismatch
        spec("mlflow-artifacts:/hygiene/missing.safetensors", garbage_sha),  # object gone
        spec("https://elsewhere.example/w.safetensors", garbage_sha),  # no way to read it
    ):
        with pytest.raises(AdapterLoadError) as e:
            parse_weights(s, fetcher.fetch(s))
        failures.append(e.value)
    # The store down: the internal endpoint must not reach the tenant.
    dead = ObjectStore(local_parts.refused_url(), "k", "s", store_settings.mlflow_artifacts_bucket)
    with pytest.raises(AdapterLoadError) as e:
        AdapterFetcher(dead).fetch(spec("mlflow-artifacts:/hygiene/x", garbage_sha))
    failures.append(e.value)

    assert [f.code for f in failures] == [
        "adapter_corrupt",
        "adapter_corrupt",
        "adapter_corrupt",
        "storage_unavailable",
        "storage_unavailable",
    ]
    for f in failures:
        api = f.as_api_error()
        body = json.dumps(error_body(api.status, api.message, api.param, api.code))
        assert "brand" in body and "version 3" in body
        assert_no_internals(local_parts, body, dead.endpoint, "elsewhere.example")


def test_object_store_down_is_503_without_its_address(local_parts):
    services = local_parts.services()
    key = new_tenant(services, "s3-down-co")
    local_parts.stack.component("s3").stop()

    async def go():
        async with client(services, key) as c:
            return [
                await c.post(RENDER, json=TINY),
                await c.get("/healthz"),
            ]

    try:
        answers = run(go())
    finally:
        local_parts.stack.start("s3")
    for r in answers:
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "storage_unavailable"
        assert_no_internals(local_parts, r.text)
    assert services.tenants.count_renders() == 0  # nothing recorded for a render not stored


# --- the schema -----------------------------------------------------------------------------


def test_every_route_documents_its_errors_with_the_openai_error_model(local_parts):
    from serve.api import create_api

    schema = create_api(local_parts.services()).openapi()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            responses = op["responses"]
            assert "422" not in responses, (method, path)
            for status in ("400", "401", "413", "500"):
                ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorResponse"), (method, path, status)
    render = schema["paths"][RENDER]["post"]["responses"]
    assert {"404", "429", "503"} <= set(render)
    assert "503" in schema["paths"]["/v1/adapters"]["get"]["responses"]


def test_files_and_jobs_in_process_with_the_cluster_unreachable(local_parts, tmp_path):
    """Upload a real dataset, then create a job while no Ray cluster answers: 503
    `cluster_unavailable`, the job recorded as failed, and no cluster address in either."""
    from finetune.world import write_brand_zip

    data = write_brand_zip(tmp_path / "acme.zip", "acme", n=4, seed=1).read_bytes()
    services = local_parts.services()
    key = new_tenant(services, "files-co")

    async def go():
        async with client(services, key) as c:
            up = await c.post(
                "/v1/files",
                files={"file": ("acme.zip", data, "application/zip")},
                data={"purpose": "fine-tune"},
            )
            listed = await c.get("/v1/files")
            job = await c.post(
                "/v1/fine_tuning/jobs",
                json={
                    "training_file": up.json()["id"],
                    "brand": "acme",
                    "hyperparameters": {"steps": 2},
                },
            )
            jobs = await c.get("/v1/fine_tuning/jobs")
            return up, listed, job, jobs

    up, listed, job, jobs = run(go())
    assert up.status_code == 200, up.text
    assert [f["id"] for f in listed.json()["data"]] == [up.json()["id"]]
    assert job.status_code == 503, job.text
    assert job.json()["error"]["code"] == "cluster_unavailable"
    assert_no_internals(local_parts, job.text, local_parts.settings.ray_dashboard_url)
    [record] = jobs.json()["data"]
    assert record["status"] == "failed"
    assert_no_internals(local_parts, json.dumps(record), local_parts.settings.ray_dashboard_url)


def test_an_upstream_request_id_is_reused_and_not_duplicated(local_parts, caplog):
    """Behind Ray Serve the proxy names the request (and returns the id itself): the ingress
    answers and logs under that id and adds no second header. An unsafe id is not used."""
    services = local_parts.services()
    key = new_tenant(services, "upstream-id-co")
    with sqlite3.connect(services.tenants.engine.url.database) as db:
        db.execute("DROP TABLE api_keys")  # authentication fails unexpectedly: a 500

    async def go():
        async with client(services, key) as c:
            reused = await c.get("/v1/models", headers={"X-Request-Id": "serve-abc-123"})
            unsafe = await c.get("/v1/models", headers={"X-Request-Id": "not an id; DROP"})
            return reused, unsafe

    with caplog.at_level(logging.ERROR):
        reused, unsafe = run(go())
    assert reused.status_code == 500 and "serve-abc-123" in reused.json()["error"]["message"]
    assert reused.headers.get_list("x-request-id") == []  # Serve's proxy adds it
    assert any("serve-abc-123" in rec.getMessage() for rec in caplog.records)
    assert unsafe.status_code == 500 and "DROP" not in unsafe.json()["error"]["message"]
    assert re.search(r"req_[0-9a-f]{16}", unsafe.json()["error"]["message"])
