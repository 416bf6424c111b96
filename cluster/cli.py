"""The `brandfarm` command line: bring a farm up and down, manage tenants, run the demo."""

from __future__ import annotations

from typing import Annotated

import httpx
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from cluster import (
    adapter_cli,  # noqa: F401 - registers `adapters archive/expire-archived`
    edit_cli,
)
from cluster.policy_cli import policy_app
from cluster.processes import StackError
from cluster.render_cli import register as register_render_commands
from cluster.stack import LocalStack
from cluster.tenant_cli import adapters_app, finetune_app
from cluster.topology import Topology
from cluster.verify_cli import verify
from cluster.webhook_cli import webhook_admin_app, webhooks_app
from registry.base_models import BaseModelError
from registry.limits import SETTING_OF, EffectiveLimits
from registry.retention import expire_renders
from registry.settings import Settings, load_settings
from registry.storage import ObjectStore, StorageError
from registry.tenants import TenantDirectory, TenantError

app = typer.Typer(help="brandfarm: a multi-tenant text-to-image render farm.", no_args_is_help=True)
tenants_app = typer.Typer(help="Tenants and their API keys.", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")
app.add_typer(finetune_app, name="finetune")
app.add_typer(adapters_app, name="adapters")
app.add_typer(policy_app, name="policy")
app.add_typer(webhooks_app, name="webhooks")
tenants_app.add_typer(webhook_admin_app, name="webhook")
renders_app = typer.Typer(help="Async and stored renders.", no_args_is_help=True)
app.add_typer(renders_app, name="renders")
register_render_commands(app, renders_app)
base_model_app = typer.Typer(help="The built-in base model.", no_args_is_help=True)
app.add_typer(base_model_app, name="base-model")
app.command("verify")(verify)
edit_cli.register(app)
console = Console()
err = Console(stderr=True)


def _settings(**overrides: object) -> Settings:
    try:
        return load_settings(**overrides)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in p['loc']) or 'settings'}: {p['msg']}" for p in e.errors()
        )
        err.print(f"[red]invalid settings[/red]: {problems}")
        raise typer.Exit(2) from e
    except FileNotFoundError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from e


def _fail(e: Exception) -> typer.Exit:
    err.print(f"[red]error:[/red] {e}")
    return typer.Exit(1)


def _progress(msg: str) -> None:
    console.print(f"[dim]•[/dim] {msg}")


def _tenants(settings: Settings) -> TenantDirectory:
    settings.state_path.mkdir(parents=True, exist_ok=True)
    return TenantDirectory.from_url(settings.resolved_database_url)


@app.command()
def up(
    address: Annotated[
        str | None, typer.Option(help="Deploy on this existing Ray cluster (ray address).")
    ] = None,
    redeploy: Annotated[
        bool, typer.Option(help="Redeploy the Serve app even if it already answers.")
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(help="Local Ray worker nodes to start beside the head (ray_worker_nodes)."),
    ] = None,
    worker_gpus: Annotated[
        int | None, typer.Option(help="GPUs each local worker node declares (ray_worker_gpus).")
    ] = None,
    worker_cpus: Annotated[
        int | None, typer.Option(help="CPUs each local worker node declares (ray_worker_cpus).")
    ] = None,
) -> None:
    """Start the farm (idempotent): object store, MLflow, Ray head (and local worker nodes), the
    Serve app. With --address the app (and fine-tune jobs) go to that existing Ray cluster."""
    settings = _settings(
        ray_address=address,
        ray_worker_nodes=workers,
        ray_worker_gpus=worker_gpus,
        ray_worker_cpus=worker_cpus,
    )
    if settings.ray_address and settings.ray_worker_nodes:
        err.print(
            f"[red]invalid settings[/red]: ray_worker_nodes={settings.ray_worker_nodes} adds "
            "local nodes to the embedded Ray head, but ray_address="
            f"{settings.ray_address} names an existing cluster; drop --workers or --address"
        )
        raise typer.Exit(2)
    try:
        s = LocalStack(settings, _progress).up(redeploy=redeploy)
    except (StackError, StorageError, BaseModelError) as e:
        raise _fail(e) from e
    console.print(f"[bold green]brandfarm is up[/bold green] (state in {s.state_dir})")
    console.print(f"  API               {s.api_url}/v1")
    console.print(f"  MLflow dashboard  {s.resolved_mlflow_uri}")
    console.print(
        f"  Ray dashboard     {s.ray_dashboard_url if not s.ray_address else s.ray_address}"
    )
    console.print(f"  object store      {s.resolved_s3_endpoint} (bucket {s.s3_bucket})")


@app.command()
def down() -> None:
    """Stop what `up` started (by recorded PIDs); all data stays in the state directory."""
    stopped = LocalStack(_settings()).down()
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@app.command()
def status() -> None:
    """Show each component and whether it answers; then the Ray cluster's nodes, the diffusion
    replicas on each node, and the adapters each replica holds."""
    stack = LocalStack(_settings())
    rows = stack.status()
    table = Table("component", "url", "managed", "pid", "answers")
    for r in rows:
        ok = "[green]yes[/green]" if r.answers else "[red]no[/red]"
        table.add_row(r.name, r.url, "embedded" if r.managed else "external", str(r.pid or "-"), ok)
    console.print(table)
    if any(r.name == "ray" and r.answers for r in rows):
        try:
            _print_topology(stack.topology())
        except Exception as e:  # noqa: BLE001 - the component table above still stands
            err.print(f"[yellow]could not read the cluster's nodes and replicas:[/yellow] {e}")
    if not all(r.answers for r in rows):
        raise typer.Exit(1)


def _print_topology(topology: Topology) -> None:
    names = {n.node_id: n.name or n.ip for n in topology.nodes}
    nodes = Table("node", "name", "ip", "CPUs", "GPUs", "replicas", title="Ray nodes")
    for n in topology.nodes:
        replicas = len(topology.replicas_on(n.node_id))
        nodes.add_row(n.node_id[:12], n.name, n.ip, f"{n.cpus:g}", f"{n.gpus:g}", str(replicas))
    console.print(nodes)
    replicas = Table("replica", "node", "state", "adapters", "host cache", title="Replicas")
    for r in topology.replicas:
        node = f"{r.node_id[:12]} ({names.get(r.node_id, '?')})" if r.node_id else "-"
        replicas.add_row(
            "#".join(r.actor_name.split("#")[-2:]),  # DiffusionReplica#<replica id>
            node,
            r.state,
            ", ".join(r.adapters) or "-",
            ", ".join(r.host_cached) or "-",
        )
    console.print(replicas)


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Argument(help="Tenant id: [a-z0-9][a-z0-9-]{1,62}.")],
    images_per_hour: Annotated[
        int | None, typer.Option(help="Hourly image quota (default: none).")
    ] = None,
) -> None:
    """Create a tenant and print its first API key (shown once, only a hash is stored)."""
    try:
        issued = _tenants(_settings()).create_tenant(name, images_per_hour)
    except TenantError as e:
        raise _fail(e) from e
    console.print(f"tenant [bold]{issued.tenant_id}[/bold] created; key id {issued.key_id}")
    console.print("API key (shown once, store it now):")
    print(issued.key)


@tenants_app.command("add-key")
def tenants_add_key(name: Annotated[str, typer.Argument(help="Tenant id.")]) -> None:
    """Issue another API key for a tenant (shown once)."""
    try:
        issued = _tenants(_settings()).add_key(name)
    except TenantError as e:
        raise _fail(e) from e
    console.print(f"new key for [bold]{name}[/bold]; key id {issued.key_id}")
    print(issued.key)


def _limit_cell(own: float | None, effective: float | None) -> str:
    if effective is None:
        return "-"
    return f"{effective:g}" + ("" if own is not None else " (farm)")


@tenants_app.command("list")
def tenants_list() -> None:
    """List tenants with their active key count, quota and limits ("(farm)": the farm's
    setting applies; "-": no cap)."""
    settings = _settings()
    table = Table(
        "tenant",
        "created",
        "active keys",
        "images/hour",
        "concurrent fine-tunes",
        "queued jobs",
        "stored bytes",
        "render retention days",
        "renders in flight",
    )
    for t in _tenants(settings).list_tenants():
        quota = str(t.images_per_hour) if t.images_per_hour else "-"
        effective = EffectiveLimits.of(settings, t.limits)
        limits = [
            _limit_cell(getattr(t.limits, name), getattr(effective, name)) for name in SETTING_OF
        ]
        table.add_row(
            t.id, t.created_at.isoformat(timespec="seconds"), str(t.active_keys), quota, *limits
        )
    console.print(table)


@tenants_app.command("set-limits")
def tenants_set_limits(
    name: Annotated[str, typer.Argument(help="Tenant id.")],
    max_concurrent_fine_tunes: Annotated[
        int | None, typer.Option(help="Unfinished (queued or running) fine-tune jobs (429 above).")
    ] = None,
    max_queued_jobs: Annotated[
        int | None, typer.Option(help="Fine-tune jobs waiting to start (429 above).")
    ] = None,
    max_stored_bytes: Annotated[
        int | None, typer.Option(help="Bytes under tenants/<name>/ in the object store (403).")
    ] = None,
    render_retention_days: Annotated[
        float | None, typer.Option(help="Days a render's images are kept.")
    ] = None,
    max_inflight_renders: Annotated[
        int | None, typer.Option(help="Renders in flight at once, on all ingresses (429 above).")
    ] = None,
    reset: Annotated[
        list[str] | None,
        typer.Option(
            help="A limit to return to the farm's setting (repeatable), e.g. "
            "--reset max_stored_bytes; --reset all for every one."
        ),
    ] = None,
) -> None:
    """Set a tenant's own limits, overriding the farm's settings (*_per_tenant,
    render_retention_days); the limits not named stay as they are."""
    overrides: dict[str, float | None] = {}
    for limit in reset or []:
        names = list(SETTING_OF) if limit == "all" else [limit]
        overrides.update(dict.fromkeys(names))
    given = {
        "max_concurrent_fine_tunes": max_concurrent_fine_tunes,
        "max_queued_jobs": max_queued_jobs,
        "max_stored_bytes": max_stored_bytes,
        "render_retention_days": render_retention_days,
        "max_inflight_renders": max_inflight_renders,
    }
    overrides.update({k: v for k, v in given.items() if v is not None})
    if not overrides:
        err.print("[red]error:[/red] name a limit to set (see --help) or --reset one")
        raise typer.Exit(2)
    try:
        tenant = _tenants(_settings()).set_limits(name, **overrides)
    except TenantError as e:
        raise _fail(e) from e
    shown = ", ".join(
        f"{k}={getattr(tenant.limits, k) if getattr(tenant.limits, k) is not None else 'farm'}"
        for k in SETTING_OF
    )
    console.print(f"limits of [bold]{name}[/bold]: {shown}")


@tenants_app.command("revoke-key")
def tenants_revoke_key(
    key_id: Annotated[str, typer.Argument(help="Key id (the 12 hex characters after 'bf-').")],
) -> None:
    """Revoke an API key; requests with it get 401 from then on."""
    try:
        tenant = _tenants(_settings()).revoke_key(key_id)
    except TenantError as e:
        raise _fail(e) from e
    console.print(f"key {key_id} of tenant {tenant} revoked")


@renders_app.command("expire")
def renders_expire(
    dry_run: Annotated[bool, typer.Option(help="Only count what would be deleted.")] = False,
) -> None:
    """Delete renders older than their tenant's retention (render_retention_days or the
    tenant's override) from the object store; the ingress also does this periodically."""
    settings = LocalStack(_settings()).resolved_settings()
    try:
        report = expire_renders(
            settings, _tenants(settings), ObjectStore.from_settings(settings), dry_run=dry_run
        )
    except StorageError as e:
        raise _fail(e) from e
    verb = "would expire" if dry_run else "expired"
    console.print(
        f"{verb} {report.renders} renders ({report.objects} objects, {report.bytes} bytes)"
        + "".join(f"\n  {t}: {n}" for t, n in sorted(report.per_tenant.items()))
    )


@app.command()
def demo(
    tenant: Annotated[str, typer.Option(help="Tenant the demo renders for.")] = "demo",
    tune_steps: Annotated[int, typer.Option(help="Steps of the demo's brand fine-tune.")] = 500,
) -> None:
    """Bring the farm up, render prompts over HTTP, fine-tune a brand, write a contact sheet."""
    from cluster.demo import run_demo

    settings = _settings()
    try:
        run_demo(settings, tenant, console, tune_steps)
    except (StackError, StorageError, BaseModelError, TenantError, RuntimeError) as e:
        raise _fail(e) from e
    except httpx.HTTPError as e:
        raise _fail(RuntimeError(f"the API answered with an error: {e}")) from e


@base_model_app.command(
    "train",
    context_settings={
        "allow_extra_args": True,
        "ignore_unknown_options": True,
        "help_option_names": [],
    },
)
def base_model_train(ctx: typer.Context) -> None:
    """Train the built-in base model from its seed (flags: `brandfarm base-model train --help`)."""
    from finetune.base_model import main as train_main

    train_main(ctx.args)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
