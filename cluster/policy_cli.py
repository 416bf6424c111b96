"""`brandfarm policy`: a tenant's content policy and its moderation audit trail, over the API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.table import Table

from cluster.tenant_cli import ApiKey, _client, _get, _ok, console

policy_app = typer.Typer(help="A tenant's content policy (as a tenant).", no_args_is_help=True)


@policy_app.command("show")
def show(api_key: ApiKey = None) -> None:
    """Print the tenant's policy as JSON."""
    with _client(api_key) as client:
        policy = _get(client, "/moderation/policy")
    policy.pop("object", None)
    console.print_json(json.dumps(policy))


@policy_app.command("set")
def set_policy(
    file: Annotated[Path, typer.Argument(help="JSON: blocked_terms, blocked_patterns, ...")],
    api_key: ApiKey = None,
) -> None:
    """Replace the tenant's policy with the file's (a malformed one names the rule)."""
    try:
        document = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        console.print(f"[red]error:[/red] cannot read {file} as JSON: {e}")
        raise typer.Exit(2) from e
    with _client(api_key) as client:
        try:
            _ok(client.put("/moderation/policy", json=document))
        except httpx.HTTPError as e:
            console.print(f"[red]error:[/red] the API is unreachable ({e})")
            raise typer.Exit(1) from e
    console.print(f"policy set from {file}")


@policy_app.command("events")
def events(
    after: Annotated[int, typer.Option(help="List the events after this id.")] = 0,
    limit: Annotated[int, typer.Option(help="Events to list (1..1000).")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print the page as JSON.")] = False,
    api_key: ApiKey = None,
) -> None:
    """The tenant's refused requests: when, where, which rule."""
    with _client(api_key) as client:
        page = _get(client, "/moderation/events", after=after, limit=limit)
    if as_json:
        print(json.dumps(page, indent=2))  # noqa: T201 - plain, unwrapped, for scripts
        return
    table = Table("id", "when", "source", "field", "scope", "rule", "matched")
    for e in page["data"]:
        table.add_row(
            str(e["id"]),
            str(e["created_at"]),
            e["source"],
            e["field"],
            e["scope"],
            e["rule"],
            e["matched"],
        )
    console.print(table)
