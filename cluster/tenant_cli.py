"""The tenant side of the CLI: `brandfarm finetune ...` and `brandfarm adapters ...` over HTTP.

They act as one tenant, with the key in `BRANDFARM_API_KEY` (or `--api-key`), against the API.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from registry.settings import load_settings

finetune_app = typer.Typer(help="Fine-tune brand adapters (as a tenant).", no_args_is_help=True)
adapters_app = typer.Typer(help="A tenant's brand adapters.", no_args_is_help=True)
console = Console()
ApiKey = Annotated[str | None, typer.Option(help="Tenant API key (default: BRANDFARM_API_KEY).")]
TERMINAL = ("succeeded", "failed", "cancelled")


def _client(api_key: str | None) -> httpx.Client:
    settings = load_settings()
    key = api_key or (settings.api_key.get_secret_value() if settings.api_key else None)
    if not key:
        console.print("[red]error:[/red] no API key: pass --api-key or set BRANDFARM_API_KEY")
        raise typer.Exit(2)
    return httpx.Client(
        base_url=f"{settings.api_url}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=600
    )


def _ok(resp: httpx.Response) -> dict:
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text
        console.print(f"[red]error {resp.status_code}:[/red] {message}")
        raise typer.Exit(1)
    return resp.json()


def _get(client: httpx.Client, path: str, **params: object) -> dict:
    try:
        return _ok(client.get(path, params=params))
    except httpx.HTTPError as e:
        console.print(
            f"[red]error:[/red] the API at {client.base_url} is unreachable ({e}); "
            "is the farm up (`brandfarm status`)?"
        )
        raise typer.Exit(1) from e


def follow_job(client: httpx.Client, job: dict) -> dict:
    """Show a live progress bar from the job's events until it ends."""
    total = job["hyperparameters"]["steps"]
    after = 0
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(f"training {job['brand']}", total=total, loss="-")
        while True:
            events = _get(client, f"/fine_tuning/jobs/{job['id']}/events", after=after, limit=1000)
            for e in events["data"]:
                after = int(e["id"])
                if e["data"]["loss"] is not None:  # checkpoint events carry a step only
                    bar.update(task, loss=f"{e['data']['loss']:.4f}")
                if e["data"]["step"] is not None:
                    bar.update(task, completed=e["data"]["step"])
                if not e["message"].startswith("step "):
                    bar.console.print(f"[dim]{e['message']}[/dim]")
            job = _get(client, f"/fine_tuning/jobs/{job['id']}")
            if job["status"] in TERMINAL and not events["has_more"]:
                return job
            time.sleep(1)


@finetune_app.command("submit")
def submit(
    data: Annotated[Path, typer.Argument(help="Dataset zip: images + same-name .txt captions.")],
    brand: Annotated[str, typer.Option(help="Adapter name: [a-z0-9][a-z0-9-]{1,62}.")],
    trigger_word: Annotated[str | None, typer.Option(help="Word the captions use.")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 200,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    alpha: Annotated[float, typer.Option(help="LoRA alpha.")] = 8.0,
    learning_rate: Annotated[float, typer.Option(help="Learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 4,
    wait: Annotated[bool, typer.Option(help="Follow the job with a progress bar.")] = False,
    api_key: ApiKey = None,
) -> None:
    """Upload a dataset and start a fine-tune job for BRAND."""
    if not data.is_file():
        console.print(f"[red]error:[/red] {data} is not a file")
        raise typer.Exit(2)
    with _client(api_key) as client:
        upload = _ok(
            client.post(
                "/files",
                files={"file": (data.name, data.read_bytes())},
                data={"purpose": "fine-tune"},
            )
        )
        console.print(f"uploaded {data.name}: {upload['id']} ({upload['images']} images)")
        job = _ok(
            client.post(
                "/fine_tuning/jobs",
                json={
                    "training_file": upload["id"],
                    "brand": brand,
                    "trigger_word": trigger_word,
                    "hyperparameters": {
                        "steps": steps,
                        "rank": rank,
                        "alpha": alpha,
                        "learning_rate": learning_rate,
                        "batch_size": batch_size,
                    },
                },
            )
        )
        console.print(f"job {job['id']} {job['status']}")
        if wait:
            job = follow_job(client, job)
            colour = "green" if job["status"] == "succeeded" else "red"
            console.print(
                f"[{colour}]job {job['status']}[/{colour}]"
                + (f": adapter {job['fine_tuned_model']}" if job["adapter_version"] else "")
                + (f" ({job['error']['message']})" if job["error"] else "")
            )
            if job["status"] != "succeeded":
                raise typer.Exit(1)


@finetune_app.command("list")
def list_jobs(api_key: ApiKey = None) -> None:
    """The tenant's fine-tune jobs, newest first."""
    with _client(api_key) as client:
        jobs = _get(client, "/fine_tuning/jobs", limit=100)["data"]
    table = Table("job", "brand", "status", "adapter", "created")
    for j in jobs:
        table.add_row(
            j["id"],
            j["brand"],
            j["status"],
            j["fine_tuned_model"] or "-",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(j["created_at"])),
        )
    console.print(table)


@finetune_app.command("status")
def status(job_id: str, api_key: ApiKey = None) -> None:
    """One job with its latest events."""
    with _client(api_key) as client:
        job = _get(client, f"/fine_tuning/jobs/{job_id}")
        events = _get(client, f"/fine_tuning/jobs/{job_id}/events", limit=1000)["data"]
    console.print(
        f"{job['id']}  brand {job['brand']}  [bold]{job['status']}[/bold]  "
        f"attempts {job['attempts']}  adapter {job['fine_tuned_model'] or '-'}"
    )
    for e in events[-10:]:
        console.print(f"  {e['message']}")


@finetune_app.command("cancel")
def cancel(job_id: str, api_key: ApiKey = None) -> None:
    """Stop a job; it ends `cancelled` within seconds and registers nothing."""
    with _client(api_key) as client:
        job = _ok(client.post(f"/fine_tuning/jobs/{job_id}/cancel"))
    console.print(f"job {job['id']}: {job['status']} (cancellation requested)")


@adapters_app.command("list")
def adapters_list(api_key: ApiKey = None) -> None:
    """Brands with their versions, aliases and key tags."""
    with _client(api_key) as client:
        brands = _get(client, "/adapters")["data"]
    table = Table("brand", "version", "aliases", "renders", "job", "steps", "rank")
    for b in brands:
        for v in b["versions"]:
            table.add_row(
                b["brand"],
                str(v["version"]),
                ", ".join(v["aliases"]) or "-",
                str(v.get("renders", "-")),
                v["tags"].get("job_id", "-"),
                v["tags"].get("steps", "-"),
                v["tags"].get("rank", "-"),
            )
    console.print(table)


@adapters_app.command("promote")
def adapters_promote(
    brand: str,
    version: int,
    alias: Annotated[str, typer.Option(help="Alias to move.")] = "production",
    force: Annotated[
        bool,
        typer.Option(help="Promote past a failing promotion gate (recorded on the version)."),
    ] = False,
    api_key: ApiKey = None,
) -> None:
    """Point ALIAS (default production) of BRAND at VERSION: promotion and rollback alike.
    Production takes only a version that passes the brand's promotion gate, unless --force."""
    body = {"version": version, **({"force": True} if force else {})}
    with _client(api_key) as client:
        v = _ok(client.post(f"/adapters/{brand}/aliases/{alias}", json=body))
    console.print(f"{brand}@{alias} → version {v['version']}")
