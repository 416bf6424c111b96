"""Async renders from the command line: `brandfarm render PROMPT` and `brandfarm renders list |
status | cancel` act as a tenant over HTTP (the key in `BRANDFARM_API_KEY`); `brandfarm renders
plan` sets a tenant's render plan in the farm database (an operator's command).
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cluster.tenant_cli import ApiKey, _client, _get, _ok, console
from registry.db import make_engine
from registry.render_queue import PLANS, RenderQueueStore
from registry.settings import load_settings

TERMINAL = ("succeeded", "failed", "cancelled")


def _events(client: httpx.Client, render_id: str):  # noqa: ANN202 - an iterator of dicts
    """The render objects its server-sent event stream carries, until it ends."""
    with client.stream("GET", f"/renders/{render_id}/events", timeout=None) as resp:
        if resp.status_code >= 400:
            resp.read()
            _ok(resp)
        for line in resp.iter_lines():
            if line.startswith("data:"):
                yield json.loads(line[5:])


def follow_render(client: httpx.Client, render: dict) -> dict:
    """A live progress bar (queue position, then image-steps) until the render ends."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(),
    )
    render_id = render["id"]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("queued", total=render["progress"]["total"])
        try:
            for update in _events(client, render_id):
                label = (
                    f"queued (position {update['queue_position']})"
                    if update["status"] == "queued"
                    else update["status"]
                )
                bar.update(task, description=label, completed=update["progress"]["step"])
        except httpx.HTTPError:  # the stream broke (an ingress restart): poll instead
            while (update := _get(client, f"/renders/{render_id}"))["status"] not in TERMINAL:
                bar.update(task, description=update["status"], completed=update["progress"]["step"])
                time.sleep(1)
    return _get(client, f"/renders/{render_id}")


def save_images(render: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(render["data"] or []):
        path = out / f"{render['id']}-{i}-{image['seed']}.png"
        if "b64_json" in image:
            path.write_bytes(base64.b64decode(image["b64_json"]))
        else:
            path.write_bytes(httpx.get(image["url"], timeout=60).raise_for_status().content)
        paths.append(path)
    return paths


def render(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    adapter: Annotated[
        str | None, typer.Option(help="Brand adapter: acme, acme@staging, acme:3.")
    ] = None,
    n: Annotated[int, typer.Option(help="How many images.")] = 1,
    size: Annotated[str | None, typer.Option(help="WxH; default: the model's native size.")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the first image.")] = None,
    priority: Annotated[
        str | None, typer.Option(help="fast or relax (default: the plan's).")
    ] = None,
    webhook_url: Annotated[str | None, typer.Option(help="https URL told when it ends.")] = None,
    wait: Annotated[
        bool, typer.Option(help="Follow it with a progress bar until it ends.")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="Save the images here (implies --wait).")] = None,
    api_key: ApiKey = None,
) -> None:
    """Queue an async render; with --wait follow it, with --out save its images."""
    body: dict = {"prompt": prompt, "n": n}
    for name, value in {
        "adapter": adapter,
        "size": size,
        "steps": steps,
        "seed": seed,
        "priority": priority,
        "webhook_url": webhook_url,
    }.items():
        if value is not None:
            body[name] = value
    if out is not None:
        body["response_format"] = "b64_json"  # the images come back through the API itself
    with _client(api_key) as client:
        created = _ok(client.post("/renders", json=body))
        console.print(
            f"render {created['id']} {created['status']} ({created['priority']}, "
            f"queue position {created['queue_position']})"
        )
        if not (wait or out):
            return
        done = follow_render(client, created)
    colour = "green" if done["status"] == "succeeded" else "red"
    console.print(
        f"[{colour}]render {done['status']}[/{colour}]"
        + (f": {done['error']['message']}" if done["error"] else "")
    )
    if done["status"] != "succeeded":
        raise typer.Exit(1)
    if out is not None:
        for path in save_images(done, out):
            console.print(f"saved {path}")
    else:
        for image in done["data"]:
            console.print(image.get("url", f"seed {image['seed']} (inline)"))


def renders_list(
    limit: Annotated[int, typer.Option(help="How many (newest first).")] = 20,
    api_key: ApiKey = None,
) -> None:
    """The tenant's async renders, newest first."""
    with _client(api_key) as client:
        renders = _get(client, "/renders", limit=limit)["data"]
    table = Table(box=None)
    table.add_column("render", no_wrap=True, min_width=31)  # ids are never cut
    for name in ("status", "priority", "progress", "created"):
        table.add_column(name)
    for r in renders:
        table.add_row(
            r["id"],
            r["status"],
            r["priority"],
            f"{r['progress']['step']}/{r['progress']['total']}",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"])),
        )
    console.print(table)


def renders_status(render_id: str, api_key: ApiKey = None) -> None:
    """One render: status, queue position, progress, error or image URLs."""
    with _client(api_key) as client:
        r = _get(client, f"/renders/{render_id}")
    position = f"  queue position {r['queue_position']}" if r["status"] == "queued" else ""
    console.print(
        f"{r['id']}  [bold]{r['status']}[/bold]  {r['priority']}  "
        f"progress {r['progress']['step']}/{r['progress']['total']}  attempts {r['attempts']}"
        + position
    )
    if r["error"]:
        console.print(f"  error: {r['error']['message']} ({r['error']['code']})")
    for image in r["data"] or []:
        console.print(f"  seed {image['seed']}: {image.get('url', '(inline)')}")


def renders_cancel(render_id: str, api_key: ApiKey = None) -> None:
    """Cancel a queued or running render (it is never charged)."""
    with _client(api_key) as client:
        r = _ok(client.post(f"/renders/{render_id}/cancel"))
    console.print(f"render {r['id']}: {r['status']}")


def renders_plan(
    tenant: Annotated[str, typer.Argument(help="Tenant id.")],
    plan: Annotated[str, typer.Option(help=f"One of {sorted(PLANS)}: the tiers it may use.")],
    weight: Annotated[float, typer.Option(help="Fair-share weight against other tenants.")] = 1.0,
    max_queued: Annotated[
        int | None, typer.Option(help="Unfinished async renders (429 above); unset: the farm's.")
    ] = None,
) -> None:
    """Set a tenant's render plan: its priority tiers, fair-share weight and queue length."""
    settings = load_settings()
    try:
        got = RenderQueueStore(make_engine(settings.resolved_database_url)).set_plan(
            tenant, plan, weight, max_queued
        )
    except (ValueError, KeyError) as e:
        message = f"no tenant {tenant!r}" if isinstance(e, KeyError) else str(e)
        console.print(f"[red]error:[/red] {message}")
        raise typer.Exit(1) from e
    console.print(
        f"tenant {tenant}: plan {got.plan} (tiers {', '.join(got.tiers)}), weight {got.weight}, "
        f"max_queued {got.max_queued if got.max_queued is not None else 'farm default'}"
    )


def register(app: typer.Typer, renders_app: typer.Typer) -> None:
    """Add these commands to the `brandfarm` app and its `renders` group."""
    app.command("render")(render)
    renders_app.command("list")(renders_list)
    renders_app.command("status")(renders_status)
    renders_app.command("cancel")(renders_cancel)
    renders_app.command("plan")(renders_plan)
