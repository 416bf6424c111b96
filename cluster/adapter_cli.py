"""`brandfarm adapters archive`, `policy get|set`, `promote` and `canary ...` (a tenant, over
HTTP), `brandfarm adapters expire-archived` (the operator: deletes the weights of versions
archived longer than the retention) and `brandfarm adapters register-webhook` (the operator:
MLflow's alias webhook)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cluster.stack import LocalStack
from cluster.tenant_cli import ApiKey, _client, _get, _ok, adapters_app, console
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


canary_app = typer.Typer(
    help="A canary: production split between the champion and a challenger version.",
    no_args_is_help=True,
)
adapters_app.add_typer(canary_app, name="canary")


def _print_canary(c: dict) -> None:
    champion, challenger = c["champion"] or {}, c["challenger"]
    console.print(
        f"{c['brand']} canary {c['status']}: challenger version {challenger['version']} at "
        f"{c['share']:.0%} ({challenger['renders']} renders), champion version "
        f"{champion.get('version', '-')} ({champion.get('renders', 0)} renders)"
    )


@canary_app.command("start")
def canary_start(
    brand: str,
    version: int,
    share: Annotated[
        float, typer.Option(help="The challenger's share of production renders, 0..1.")
    ] = 0.1,
    api_key: ApiKey = None,
) -> None:
    """Send SHARE of BRAND's production renders to VERSION (or change a running canary)."""
    with _client(api_key) as client:
        c = _ok(client.put(f"/adapters/{brand}/canary", json={"version": version, "share": share}))
    _print_canary(c)


@canary_app.command("status")
def canary_status(brand: str, api_key: ApiKey = None) -> None:
    """BRAND's running canary, with each side's renders since it started."""
    with _client(api_key) as client:
        _print_canary(_get(client, f"/adapters/{brand}/canary"))


@canary_app.command("promote")
def canary_promote(
    brand: str,
    force: Annotated[
        bool, typer.Option(help="Promote even past a failing promotion gate (recorded).")
    ] = False,
    api_key: ApiKey = None,
) -> None:
    """Make the challenger BRAND's production version and end the canary (through the brand's
    promotion gate, unless --force)."""
    with _client(api_key) as client:
        c = _ok(client.post(f"/adapters/{brand}/canary/promote", json={"force": force}))
    console.print(f"{brand}@production → version {c['challenger']['version']}; canary ended")


@canary_app.command("drop")
def canary_drop(brand: str, api_key: ApiKey = None) -> None:
    """End the canary: the champion keeps every production render."""
    with _client(api_key) as client:
        c = _ok(client.delete(f"/adapters/{brand}/canary"))
    console.print(f"{brand} canary dropped; production stays version {c['champion']['version']}")


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
