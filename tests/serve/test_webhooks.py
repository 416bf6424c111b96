"""Webhooks without Ray: Standard Webhooks signatures (checked with the `standardwebhooks`
package), the SSRF guard at set time and at delivery time, and the `/v1/webhooks` routes, in
process over a SQLite database. Every request goes to an in-memory transport; none leaves."""

from __future__ import annotations

import datetime as dt
import json
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from registry.db import make_engine
from registry.secret_box import SecretBox, new_key
from registry.settings import Settings
from registry.sql_base import utcnow
from registry.tenants import TenantDirectory
from registry.webhooks import WebhookStore, new_secret
from serve import webhook_urls
from serve.api import create_api
from serve.errors import InvalidField
from serve.jobs import FineTuneJobRequest, JobService
from serve.webhook_urls import check_webhook_url
from serve.webhooks import WebhookDispatcher, signature_headers
from tests.serve.webhook_receiver import webhook_services

#: A global address, only ever a resolver's (monkeypatched) answer here: nothing is sent to it.
GLOBAL = "93.184.215.14"


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(
        state_dir=tmp_path / "state",
        webhook_retry_schedule_s=[5, 25],
        webhook_disable_after_failures=3,
        encryption_keys=new_key(),
    )


@pytest.fixture
def resolved(monkeypatch) -> dict[str, list[str]]:
    """Host → addresses the guard sees; any other name fails the test, not a real lookup."""
    answers: dict[str, list[str]] = {}

    def resolve(host: str, port: int) -> list[str]:
        assert host in answers, f"test resolved an unexpected host {host!r}"
        return answers[host]

    monkeypatch.setattr(webhook_urls, "resolve", resolve)
    return answers


# --- signatures ----------------------------------------------------------------------------------
def test_signatures_verify_with_the_standardwebhooks_package():
    secret = new_secret()
    body = json.dumps({"type": "render.succeeded", "timestamp": "x", "data": {"id": "r1"}})
    headers = signature_headers([secret], "msg_1", utcnow(), body)
    assert Webhook(secret).verify(body, headers)["data"] == {"id": "r1"}
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)  # another secret
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace("r1", "r2"), headers)  # a changed body
    stale = signature_headers([secret], "msg_1", utcnow() - dt.timedelta(minutes=10), body)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(body, stale)  # replayed by an attacker later


def test_during_a_rotation_both_secrets_verify():
    old, new = new_secret(), new_secret()
    body = '{"type":"render.failed"}'
    headers = signature_headers([new, old], "msg_2", utcnow(), body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        Webhook(secret).verify(body, headers)


# --- the SSRF guard ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://hooks.example.com/x", "must use https"),
        ("ftp://hooks.example.com/x", "https:// URL"),
        ("https:///path-only", "https:// URL"),
        ("https://user:pw@hooks.example.com/x", "credentials"),
        ("https://127.0.0.1/x", "loopback"),
        ("https://[::1]/x", "loopback"),
        ("https://10.1.2.3/x", "private"),
        ("https://192.168.0.10/x", "private"),
        ("https://169.254.169.254/latest/meta-data", "link-local"),
        ("https://[::ffff:127.0.0.1]/x", "loopback"),
        ("https://0.0.0.0/x", "unspecified"),
        ("https://100.64.0.1/x", "non-public"),
        ("https://hooks.example.com:99999/x", "not a valid URL"),
        ("https://internal.example.com/x", "private"),  # a name that resolves inside
        ("https://rebind.example.com/x", "loopback"),  # one public and one loopback answer
        (f"https://h.example.com/{'a' * 2100}", "at most 2048"),
    ],
)
def test_unsafe_webhook_urls_are_refused_naming_the_field(settings, resolved, url, says):
    resolved.update({"internal.example.com": ["10.0.0.5"], "rebind.example.com": [GLOBAL, "::1"]})
    with pytest.raises(InvalidField) as refused:
        check_webhook_url(url, settings)
    assert refused.value.status == 400 and refused.value.param == "webhook_url"
    assert says in refused.value.message


def test_public_https_urls_and_allowed_hosts_pass(settings, resolved):
    resolved["hooks.example.com"] = [GLOBAL]
    assert check_webhook_url("https://hooks.example.com/x", settings)
    assert check_webhook_url(f"https://{GLOBAL}:8443/x", settings)
    allowed = settings.model_copy(update={"webhook_allow_hosts": ["127.0.0.1", "Receiver.Local"]})
    assert check_webhook_url("http://127.0.0.1:9/x", allowed)  # plain http too, for the tests
    assert check_webhook_url("https://receiver.local/x", allowed)
    with pytest.raises(InvalidField):
        check_webhook_url("https://127.0.0.2/x", allowed)  # only the hosts named


def test_a_job_request_checks_its_webhook_url(settings):
    model = SimpleNamespace(id="brandfarm-shapes", native_size=32)
    jobs = JobService(settings, model, jobs=None, files=None, store=None, launcher=None)
    request = FineTuneJobRequest(training_file="f", brand="acme", webhook_url="https://[::1]/")
    with pytest.raises(InvalidField, match="loopback") as refused:
        jobs.create("acme", request, None)
    assert refused.value.param == "webhook_url"


# --- delivery --------------------------------------------------------------------------------
@pytest.fixture
def db(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'farm.db'}")
    tenants = TenantDirectory(engine)
    keys = {name: tenants.create_tenant(name).key for name in ("acme", "globex")}
    return engine, keys


def _transport(log: list[httpx.Request], status: int = 200) -> httpx.Client:
    def handle(request: httpx.Request) -> httpx.Response:
        log.append(request)
        return httpx.Response(status, text="received" if status < 300 else "busy")

    return httpx.Client(transport=httpx.MockTransport(handle), follow_redirects=False)


def test_delivery_time_check_refuses_a_host_that_now_resolves_inside(settings, resolved, db):
    engine, _ = db
    store = WebhookStore(engine, SecretBox.of_settings(settings))
    resolved["hooks.example.com"] = [GLOBAL]
    store.set_url("acme", check_webhook_url("https://hooks.example.com/x", settings))
    store.rotate_secret("acme", 0)
    delivery = store.enqueue("acme", "render.succeeded", {"id": "r1"})
    resolved["hooks.example.com"] = ["10.9.8.7"]  # DNS changed since the URL was set
    sent: list[httpx.Request] = []
    assert WebhookDispatcher(store, settings, _transport(sent)).deliver_once() == 1
    assert sent == []  # nothing was sent
    (attempt,) = store.get("acme", delivery).attempts
    assert attempt.status_code is None and "private address 10.9.8.7" in attempt.error


def test_a_delivery_is_signed_posted_and_recorded(settings, resolved, db):
    engine, _ = db
    store = WebhookStore(engine, SecretBox.of_settings(settings))
    resolved["hooks.example.com"] = [GLOBAL]
    store.set_url("acme", "https://hooks.example.com/x")
    secret = store.rotate_secret("acme", 0)
    delivery = store.enqueue("acme", "render.succeeded", {"id": "r1"})
    sent: list[httpx.Request] = []
    WebhookDispatcher(store, settings, _transport(sent)).deliver_once()
    (request,) = sent
    # Sent to the address just checked (a later DNS answer cannot redirect it), by name.
    assert request.url.host == GLOBAL and request.headers["host"] == "hooks.example.com"
    assert request.extensions["sni_hostname"] == "hooks.example.com"  # TLS checks the name
    body = Webhook(secret).verify(request.content, dict(request.headers))
    assert body["type"] == "render.succeeded" and body["data"] == {"id": "r1"}
    assert request.headers["webhook-id"] == store.get("acme", delivery).event_id
    shown = store.get("acme", delivery)
    assert shown.status == "succeeded" and shown.attempts[0].response_body == "received"


@pytest.mark.parametrize(
    ("raised", "says"),
    [
        (httpx.ConnectError("[Errno 111] Connection refused"), "could not connect"),
        (httpx.ReadTimeout("read timed out"), "timed out after 10 s"),
        (httpx.RemoteProtocolError("peer closed connection"), "the request failed"),
    ],
)
def test_a_failing_endpoint_is_recorded_in_plain_words_and_retried(
    settings, resolved, db, raised, says
):
    engine, _ = db
    store = WebhookStore(engine, SecretBox.of_settings(settings))
    resolved["hooks.example.com"] = [GLOBAL]
    store.set_url("acme", "https://hooks.example.com/x")
    store.rotate_secret("acme", 0)
    delivery = store.enqueue("acme", "render.succeeded", {})

    def handle(request: httpx.Request) -> httpx.Response:
        raise raised

    client = httpx.Client(transport=httpx.MockTransport(handle))
    WebhookDispatcher(store, settings, client).deliver_once()
    shown = store.get("acme", delivery)
    assert shown.status == "pending" and shown.last_error.startswith(says)
    assert type(raised).__name__ not in shown.last_error
    assert 4 < (shown.next_attempt_at - shown.attempts[0].started_at).total_seconds() < 7


def test_a_tenant_without_a_secret_gets_no_unsigned_delivery(settings, resolved, db):
    engine, _ = db
    store = WebhookStore(engine, SecretBox.of_settings(settings))
    resolved["hooks.example.com"] = [GLOBAL]
    store.set_url("acme", "https://hooks.example.com/x")
    delivery = store.enqueue("acme", "render.succeeded", {})
    sent: list[httpx.Request] = []
    WebhookDispatcher(store, settings, _transport(sent)).deliver_once()
    assert sent == []
    shown = store.get("acme", delivery)
    assert shown.status == "pending" and "no webhook secret" in shown.last_error


# --- the routes ----------------------------------------------------------------------------------
@pytest.fixture
def api(settings, db, resolved):
    engine, keys = db
    resolved["hooks.example.com"] = [GLOBAL]
    services = webhook_services(engine, settings)
    with TestClient(create_api(services)) as client:
        yield client, keys, services.webhooks.store


def _as(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_config_secret_rotation_and_deliveries_over_http(api):
    client, keys, store = api
    acme = _as(keys["acme"])
    assert client.get("/v1/webhooks/config").status_code == 401
    first = client.put(
        "/v1/webhooks/config", json={"url": "https://hooks.example.com/x"}, headers=acme
    )
    assert first.status_code == 200, first.text
    secret = first.json()["secret"]  # the first URL brings the first secret, shown once
    assert secret.startswith("whsec_") and first.json()["has_secret"]
    again = client.put(
        "/v1/webhooks/config", json={"url": "https://hooks.example.com/y"}, headers=acme
    )
    assert "secret" not in again.json()
    shown = client.get("/v1/webhooks/config", headers=acme).json()
    assert shown["url"] == "https://hooks.example.com/y" and "secret" not in shown
    rotated = client.post("/v1/webhooks/secret", headers=acme).json()
    assert rotated["secret"] != secret and rotated["previous_secret_expires_at"] is not None
    assert store.signing_secrets("acme") == [rotated["secret"], secret]

    delivery = store.enqueue("acme", "fine_tuning.job.succeeded", {"id": "ftjob-1"})
    listed = client.get("/v1/webhooks/deliveries", headers=acme).json()
    assert [d["id"] for d in listed["data"]] == [delivery] and not listed["has_more"]
    assert listed["data"][0]["payload"]["data"] == {"id": "ftjob-1"}
    replay = client.post(f"/v1/webhooks/deliveries/{delivery}/replay", headers=acme)
    assert replay.status_code == 409  # still being attempted

    globex = _as(keys["globex"])  # another tenant's delivery reads as missing
    for answer in (
        client.get(f"/v1/webhooks/deliveries/{delivery}", headers=globex),
        client.post(f"/v1/webhooks/deliveries/{delivery}/replay", headers=globex),
        client.post("/v1/webhooks/deliveries/whdel_nope/replay", headers=acme),
    ):
        assert answer.status_code == 404 and answer.json()["error"]["param"] == "delivery_id"
    assert client.get("/v1/webhooks/deliveries", headers=globex).json()["data"] == []


@pytest.mark.parametrize(
    ("request_", "param", "says"),
    [
        (("put", "/v1/webhooks/config", {"url": "https://127.0.0.1/x"}), "url", "loopback"),
        (("put", "/v1/webhooks/config", {"url": "http://hooks.example.com/"}), "url", "https"),
        (("put", "/v1/webhooks/config", {"url": "https://10.0.0.1/"}), "url", "private"),
        (("put", "/v1/webhooks/config", {"url": 5}), "url", ""),
        (("put", "/v1/webhooks/config", {"url": "https://a.example/", "x": 1}), "x", ""),
        (("get", "/v1/webhooks/deliveries?limit=0", None), "limit", ""),
        (("get", "/v1/webhooks/deliveries?limit=101", None), "limit", ""),
        (("get", "/v1/webhooks/deliveries?after=whdel_x", None), "after", "no webhook delivery"),
        (("get", "/v1/webhooks/deliveries?event_type=render.boom", None), "event_type", "one of"),
    ],
)
def test_bad_webhook_requests_get_400_naming_the_field(api, request_, param, says):
    client, keys, _ = api
    method, path, body = request_
    answer = client.request(method, path, json=body, headers=_as(keys["acme"]))
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert param in (error["param"] or "") and says in error["message"]


def test_webhook_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="webhook_lease_s=5 must exceed webhook_timeout_s=10"):
        Settings(state_dir=tmp_path, webhook_lease_s=5)
    with pytest.raises(ValueError, match="webhook_retry_schedule_s"):
        Settings(state_dir=tmp_path, webhook_retry_schedule_s=[])
    default = Settings(state_dir=tmp_path).webhook_retry_schedule_s
    assert sum(default) >= 3600  # retries span at least an hour
    assert all(b == 3 * a for a, b in zip(default, default[1:], strict=False))  # exponential
