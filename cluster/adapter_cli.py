"""`brandfarm adapters archive` and `brandfarm adapters policy get|set` (a tenant, over HTTP) and
`brandfarm adapters expire-archived` (the operator: deletes the weights of versions archived
longer than the retention)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cluster.stack import LocalStack
from cluster.tenant_cli import ApiKey, _client, _ok, adapters_app, console
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


policy_app = typer.Typer(help="A brand's promotion gate.", no_args_is_help=True)
adapters_app.add_typer(policy_app, name="policy")


@policy_app.command("get")
def policy_get(brand: str, api_key: ApiKey = None) -> None:
    """Show BRAND's promotion gate (JSON)."""
    with _client(api_key) as client:
        console.print_json(json.dumps(_ok(client.get(f"/adapters/{brand}/policy"))))


@policy_app.command("set")
def policy_set(
    brand: str,
    min_improvement: Annotated[
        float | None,
        typer.Option(help="Least improvement over production (-1..1); default: the farm's."),
    ] = None,
    max_adherence_drop: Annotated[
        float | None,
        typer.Option(help="Largest allowed prompt-adherence drop (0..1); default: the farm's."),
    ] = None,
    auto_promote: Annotated[
        bool | None,
        typer.Option(help="Make a passing version production when its job ends."),
    ] = None,
    api_key: ApiKey = None,
) -> None:
    """Replace BRAND's promotion gate (an option left out takes the farm's default)."""
    body = {
        key: value
        for key, value in (
            ("min_improvement", min_improvement),
            ("max_adherence_drop", max_adherence_drop),
            ("auto_promote", auto_promote),
        )
        if value is not None
    }
    with _client(api_key) as client:
        console.print_json(json.dumps(_ok(client.put(f"/adapters/{brand}/policy", json=body))))


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
