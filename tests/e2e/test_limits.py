"""Tenant limits and render retention on the real farm: the operator sets a tenant's limits with
the CLI, the tenant meets them over HTTP (openai client), and `brandfarm renders expire`
deletes an old render's objects from the real store."""

from __future__ import annotations

import datetime as dt

import openai
import pytest
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from cluster.cli import app as cli_app
from registry.retention import render_prefix
from registry.tenants import RenderRow

pytestmark = pytest.mark.e2e


def cli(farm, *argv: str) -> str:  # noqa: ANN001
    result = CliRunner().invoke(cli_app, list(argv), env=farm.cli_env())
    assert result.exit_code == 0, result.output
    return result.output


def test_storage_cap_set_by_cli_answers_403_then_retention_frees_it(farm) -> None:  # noqa: ANN001
    key = farm.new_tenant("limits-co")
    client = openai.OpenAI(base_url=farm.api, api_key=key, max_retries=0, timeout=300)
    first = client.images.generate(prompt="a red circle", n=1, response_format="b64_json")
    stored = farm.store.list(render_prefix("limits-co", first.id))
    assert len(stored) == 1

    cap = str(stored[0].size)
    assert f"max_stored_bytes={cap}" in cli(
        farm, "tenants", "set-limits", "limits-co", "--max-stored-bytes", cap
    )
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.images.generate(prompt="a red circle", n=1, response_format="b64_json")
    error = refused.value.body
    assert refused.value.status_code == 403 and error["code"] == "max_stored_bytes_exceeded"
    assert (
        f"stores {stored[0].size} bytes of its max_stored_bytes={stored[0].size}"
        in (error["message"])
    )

    # The render is three days old; a two-day retention expires it (objects go, the row stays).
    with Session(farm.files.engine) as s, s.begin():
        s.get(RenderRow, first.id).created_at -= dt.timedelta(days=3)
    cli(farm, "tenants", "set-limits", "limits-co", "--render-retention-days", "2")
    assert "expired 1 renders (1 objects" in cli(farm, "renders", "expire")
    assert farm.store.list(render_prefix("limits-co", first.id)) == []
    assert farm.tenants.count_renders("limits-co") == 1
    # Back to the farm's setting (no cap): renders are stored again.
    cli(farm, "tenants", "set-limits", "limits-co", "--reset", "max_stored_bytes")
    again = client.images.generate(prompt="a blue square", n=1, response_format="b64_json")
    assert len(farm.store.list(render_prefix("limits-co", again.id))) == 1
