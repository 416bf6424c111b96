"""`brandfarm adapters archive` (a tenant, over HTTP), `brandfarm adapters expire-archived`
(the operator: deletes the weights of versions archived longer than the retention) and
`brandfarm adapters register-webhook` (the operator: MLflow's alias webhook)."""

from __future__ import annotations

from typing import Annotated

import typer

from cluster.stack import LocalStack
from cluster.tenant_cli import ApiKey, _client, _ok, adapters_app, console
from registry import alias_webhook
from registry.adapter_retention import expire_archived_adapters
from registry.adapters import AdapterRegistry, RegistryError
from registry.settings import load_settings
from registry.tenants import TenantDirectory


@adapters_app.command("archive")
def adapters_archive(brand: str, version: int, api_key: ApiKey = None) -> None:
    """Archive VERSION of BRAND: hidden from listings and renders; refused while an alias points
    at it. Its weights stay until adapter_archive_retention_days passes."""
    with _client(api_key) as client:
        v = _ok(client.delete(f"/adapters/{brand}/versions/{version}"))
    console.print(f"{brand} version {v['version']} archived")


@adapters_app.command("expire-archived")
def adapters_expire_archived(
    dry_run: Annotated[bool, typer.Option(help="Only list what would be deleted.")] = False,
) -> None:
    """Delete the weights of adapter versions archived longer than
    adapter_archive_retention_days (operator command; the versions and lineage stay)."""
    settings = LocalStack(load_settings()).resolved_settings()
    tenants = TenantDirectory.from_url(settings.resolved_database_url)
    try:
        report = expire_archived_adapters(
            settings, tenants, AdapterRegistry(settings.resolved_mlflow_uri), dry_run=dry_run
        )
    except RegistryError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from e
    verb = "would delete" if dry_run else "deleted"
    console.print(
        f"{verb} the weights of {len(report.versions)} archived versions"
        + "".join(f"\n  {v}" for v in report.versions)
    )


@adapters_app.command("register-webhook")
def adapters_register_webhook() -> None:
    """Register (or repair) the MLflow alias webhook that makes promotions reach serving at once
    (operator command; `brandfarm up` does it too). Where the farm runs without `up` (KubeRay),
    run it once with the farm's settings and mlflow_webhook_secret."""
    settings = LocalStack(load_settings()).resolved_settings()
    try:
        webhook_id = alias_webhook.register(settings)
    except alias_webhook.WebhookUnavailable as e:
        console.print(
            f"[red]error:[/red] {e}; alias changes made outside the farm's API reach serving "
            f"within adapter_resolve_ttl_s={settings.adapter_resolve_ttl_s:g}s"
        )
        raise typer.Exit(1) from e
    console.print(f"MLflow webhook {webhook_id} → {alias_webhook.webhook_url(settings)}")
