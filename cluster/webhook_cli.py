"""Webhooks on the command line.

`brandfarm webhooks ...` acts as one tenant over HTTP (key in `BRANDFARM_API_KEY`): its URL, its
signing secret, its deliveries and replays. `brandfarm tenants webhook ...` is the operator's,
straight on the farm database: rotate a tenant's secret, set its URL, reseal the secrets under
the farm key.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer
from pydantic import SecretStr
from rich.table import Column, Table

from cluster.stack import LocalStack
from cluster.tenant_cli import ApiKey, _client, _get, _ok, console
from registry.db import make_engine
from registry.secret_box import SecretBox, SecretKeyError, new_key
from registry.settings import load_settings
from registry.webhooks import WebhookError, WebhookStore
from serve.errors import InvalidField
from serve.webhook_urls import check_webhook_url

webhooks_app = typer.Typer(help="Signed webhooks of a tenant's events.", no_args_is_help=True)
webhook_admin_app = typer.Typer(
    help="A tenant's webhook secret and URL (operator, on the database).", no_args_is_help=True
)


def _print_secret(secret: str, grace_s: float | None) -> None:
    console.print("webhook signing secret (shown once, store it now):")
    print(secret)
    if grace_s:
        console.print(f"[dim]the previous secret also signs for {grace_s:g} s[/dim]")


# --- the tenant's commands (HTTP) ---------------------------------------------------------------
@webhooks_app.command("show")
def show(api_key: ApiKey = None) -> None:
    """The tenant's webhook URL, secret age and any disabled endpoints."""
    with _client(api_key) as client:
        config = _get(client, "/webhooks/config")
    console.print(
        f"url: {config['url'] or '-'}   secret: {'yes' if config['has_secret'] else 'no'}"
    )
    for endpoint in config["disabled_endpoints"]:
        console.print(f"[red]disabled[/red] {endpoint['url']}: {endpoint['reason']}")


@webhooks_app.command("set-url")
def set_url(
    url: Annotated[str | None, typer.Argument(help="https URL; omit with --clear.")] = None,
    clear: Annotated[bool, typer.Option(help="Remove the default URL.")] = False,
    api_key: ApiKey = None,
) -> None:
    """Set the default URL of the tenant's events (re-enables it if it was disabled)."""
    if (url is None) == (not clear):
        console.print("[red]error:[/red] give a URL, or --clear")
        raise typer.Exit(2)
    with _client(api_key) as client:
        config = _ok(client.put("/webhooks/config", json={"url": url}))
    console.print(f"webhook url: {config['url'] or '-'}")
    if "secret" in config:
        _print_secret(config["secret"], None)


@webhooks_app.command("rotate-secret")
def rotate_secret(api_key: ApiKey = None) -> None:
    """Create or rotate the signing secret (printed once)."""
    with _client(api_key) as client:
        answer = _ok(client.post("/webhooks/secret"))
    expires = answer["previous_secret_expires_at"]
    _print_secret(answer["secret"], expires - time.time() if expires else None)


@webhooks_app.command("deliveries")
def deliveries(
    limit: Annotated[int, typer.Option(help="How many, newest first (1..100).")] = 20,
    api_key: ApiKey = None,
) -> None:
    """Recent deliveries with their attempts."""
    with _client(api_key) as client:
        found = _get(client, "/webhooks/deliveries", limit=limit)["data"]
    # Ids are for copying (into `replay`): never wrapped.
    table = Table(Column("delivery", no_wrap=True), "event", "status", "attempts", "last")
    for d in found:
        last = d["attempts"][-1] if d["attempts"] else None
        table.add_row(
            d["id"],
            d["event_type"],
            d["status"],
            str(len(d["attempts"])),
            (last["error"] or str(last["status_code"])) if last else "-",
        )
    console.print(table)


@webhooks_app.command("replay")
def replay(delivery_id: str, api_key: ApiKey = None) -> None:
    """Send a finished delivery again (same event, same webhook-id)."""
    with _client(api_key) as client:
        d = _ok(client.post(f"/webhooks/deliveries/{delivery_id}/replay"))
    console.print(f"delivery {d['id']}: {d['status']}")


# --- the operator's commands (database) ---------------------------------------------------------
def _store() -> WebhookStore:
    """The farm's outbox with its key: the setting, else (the embedded farm's own database) the
    key in its credentials file, made there if this is the farm's first use of one."""
    settings = load_settings()
    if settings.encryption_keys is None and settings.database_url is None:
        key = LocalStack(settings).encryption_keys(create=True)
        settings = settings.model_copy(update={"encryption_keys": SecretStr(key)})
    box = SecretBox.of_settings(settings)
    return WebhookStore(make_engine(settings.resolved_database_url), box)


@webhook_admin_app.command("reseal-secrets")
def admin_reseal_secrets() -> None:
    """Encrypt every tenant's webhook secrets with the first farm key (plain rows from before
    encryption, and rows under an older key, which can be dropped afterwards)."""
    try:
        n = _store().reseal_secrets()
    except SecretKeyError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from e
    console.print(f"resealed {n} webhook secrets with the first key")


@webhook_admin_app.command("new-key")
def admin_new_key() -> None:
    """Print a new farm key (put it first in BRANDFARM_ENCRYPTION_KEYS to rotate)."""
    typer.echo(new_key())


@webhook_admin_app.command("rotate-secret")
def admin_rotate_secret(
    tenant: Annotated[str, typer.Argument(help="Tenant id.")],
    grace_s: Annotated[
        float | None,
        typer.Option(help="Seconds the old secret still signs (default: webhook_secret_grace_s)."),
    ] = None,
) -> None:
    """Create or rotate a tenant's webhook signing secret (printed once)."""
    grace = load_settings().webhook_secret_grace_s if grace_s is None else grace_s
    try:
        secret = _store().rotate_secret(tenant, grace)
    except (WebhookError, SecretKeyError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from e
    _print_secret(secret, grace)


@webhook_admin_app.command("set-url")
def admin_set_url(
    tenant: Annotated[str, typer.Argument(help="Tenant id.")],
    url: Annotated[str | None, typer.Argument(help="https URL; omit to clear.")] = None,
) -> None:
    """Set a tenant's default webhook URL (checked as the API checks it)."""
    try:
        checked = check_webhook_url(url, load_settings(), "url") if url else None
        store = _store()
        config = store.set_url(tenant, checked)
    except (InvalidField, WebhookError) as e:
        console.print(f"[red]error:[/red] {getattr(e, 'message', e)}")
        raise typer.Exit(1) from e
    console.print(f"{tenant}: webhook url {config.url or '-'}")
    try:
        created = store.ensure_secret(tenant) if checked else None
    except SecretKeyError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from e
    if created:  # events to a URL need a secret to be signed with
        _print_secret(created, None)
