"""The farm's MLflow registry webhook for alias events (MLflow 3.3+): MLflow posts to an
ingress whenever an alias of a registered model is set or removed, signed with
`mlflow_webhook_secret`, so promotions reach serving without waiting for a cache to expire.

`register` runs at `brandfarm up` and is idempotent: it finds the farm's webhook by name and
puts the URL, events and secret it should have, or creates it. `problem` is what an ingress asks
at start: None when the webhook is registered and active, else why not (the ingress then keeps
the `adapter_resolve_ttl_s` fallback). A file store or a server older than 3.3 has no webhook
API; a server that refuses plain-http or private URLs refuses the registration.

The signature (`X-MLflow-Signature`) is ``v1,<base64 HMAC-SHA256 of "<delivery id>.<timestamp>.
<body>">``, as `mlflow.webhooks.delivery` computes it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.webhooks.constants import (
    WEBHOOK_DELIVERY_ID_HEADER,
    WEBHOOK_SIGNATURE_HEADER,
    WEBHOOK_SIGNATURE_VERSION,
    WEBHOOK_TIMESTAMP_HEADER,
)

from registry.settings import Settings

NAME = "brandfarm-alias-events"
EVENTS = ("model_version_alias.created", "model_version_alias.deleted")
PATH = "/internal/mlflow/alias-events"
#: A delivery older (or newer) than this is refused: a captured request cannot be replayed later.
MAX_CLOCK_SKEW_S = 300
SIGNATURE_HEADER = WEBHOOK_SIGNATURE_HEADER
TIMESTAMP_HEADER = WEBHOOK_TIMESTAMP_HEADER
DELIVERY_ID_HEADER = WEBHOOK_DELIVERY_ID_HEADER


class WebhookUnavailable(RuntimeError):
    """The MLflow server cannot hold the farm's webhook (no webhook API, or it refuses it)."""


def webhook_url(settings: Settings) -> str:
    return settings.alias_webhook_url or f"{settings.api_url}{PATH}"


def _webhooks(client: MlflowClient) -> list:
    found, token = [], None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def _ours(settings: Settings) -> tuple[MlflowClient, list]:
    """A client of the farm's MLflow and the webhooks named `NAME` it holds."""
    try:
        client = MlflowClient(settings.resolved_mlflow_uri, settings.resolved_mlflow_uri)
        return client, [w for w in _webhooks(client) if w.name == NAME]
    # A file store refuses at the client, an old server answers 404, a down one times out.
    except Exception as e:  # noqa: BLE001 - every way of having no webhook API
        raise WebhookUnavailable(f"MLflow lists no webhooks ({type(e).__name__}: {e})") from None


def register(settings: Settings) -> str:
    """Create or update the farm's alias webhook; returns its id (`WebhookUnavailable`)."""
    if settings.mlflow_webhook_secret is None:
        raise WebhookUnavailable("no mlflow_webhook_secret to sign deliveries with")
    want = {
        "url": webhook_url(settings),
        "events": list(EVENTS),
        "secret": settings.mlflow_webhook_secret.get_secret_value(),
        "status": "ACTIVE",
    }
    client, ours = _ours(settings)
    try:
        for extra in ours[1:]:  # one is enough: each would invalidate again
            client.delete_webhook(extra.webhook_id)
        if ours:
            return client.update_webhook(ours[0].webhook_id, **want).webhook_id
        return client.create_webhook(
            NAME, description="brandfarm: drop cached alias answers at once", **want
        ).webhook_id
    except (MlflowException, OSError) as e:
        raise WebhookUnavailable(f"MLflow refused the webhook ({type(e).__name__}: {e})") from None


def problem(settings: Settings) -> str | None:
    """Why alias events will not arrive from MLflow (None: the farm's webhook is active)."""
    if not settings.alias_webhook:
        return "alias_webhook is off"
    if settings.mlflow_webhook_secret is None:
        return "no mlflow_webhook_secret (set by `brandfarm up`)"
    try:
        _, ours = _ours(settings)
    except WebhookUnavailable as e:
        return str(e)
    url = webhook_url(settings)
    for w in ours:
        if w.url == url and w.status.is_active() and set(EVENTS) <= {str(e) for e in w.events}:
            return None
    return f"no active MLflow webhook {NAME!r} for {url} (run `brandfarm up`)"


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's signature of one delivery."""
    content = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), content, hashlib.sha256).digest()
    return f"{WEBHOOK_SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def verify(
    secret: str,
    delivery_id: str | None,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    now: float | None = None,
) -> str | None:
    """Why a delivery is not MLflow's (None: it is)."""
    if not (delivery_id and timestamp and signature):
        return f"missing {SIGNATURE_HEADER}, {TIMESTAMP_HEADER} or {DELIVERY_ID_HEADER} header"
    if not timestamp.isdigit():
        return f"{TIMESTAMP_HEADER} is not a Unix time"
    if abs((now if now is not None else time.time()) - int(timestamp)) > MAX_CLOCK_SKEW_S:
        return f"{TIMESTAMP_HEADER} is more than {MAX_CLOCK_SKEW_S}s from now"
    expected = sign(secret, delivery_id, timestamp, body)
    # Several signatures may be sent, space-separated (Standard Webhooks, rotation).
    if not any(hmac.compare_digest(expected, s) for s in signature.split()):
        return "signature does not match"
    return None
