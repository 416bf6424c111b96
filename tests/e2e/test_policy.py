"""Content policy through the whole farm, set with the CLI: a refused render leaves only its
audit event, which the CLI lists; another tenant renders the same prompt."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cluster.cli import app as cli_app

pytestmark = pytest.mark.e2e


def test_cli_policy_refuses_renders_and_lists_the_audit_trail(farm, tmp_path):
    key = farm.new_tenant("policy-cli-co")
    other = farm.new_tenant("policy-cli-other")
    side = farm.model.native_size
    body = {"prompt": "a Initech logo", "size": f"{side}x{side}", "steps": 2}
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"protected_marks": ["Initech"]}))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"blocked_patterns": ["ok", "(oops"]}))

    runner = CliRunner()
    refused_set = runner.invoke(cli_app, ["policy", "set", str(bad)], env=farm.cli_env(key))
    assert refused_set.exit_code == 1 and "blocked_patterns[1]" in refused_set.output
    assert (
        runner.invoke(cli_app, ["policy", "set", str(policy)], env=farm.cli_env(key)).exit_code == 0
    )
    shown = runner.invoke(cli_app, ["policy", "show"], env=farm.cli_env(key))
    assert shown.exit_code == 0 and "Initech" in shown.output

    renders_before = farm.tenants.count_renders()
    with farm.http(key) as http:
        refused = http.post("/images/generations", json=body)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == "content_policy_violation"
    assert farm.tenants.count_renders() == renders_before
    assert not [o for o in farm.all_objects() if "policy-cli-co" in o]

    with farm.http(other) as http:
        assert http.post("/images/generations", json=body).status_code == 200

    table = runner.invoke(cli_app, ["policy", "events"], env=farm.cli_env(key))
    assert table.exit_code == 0, (table.output, table.exception)
    assert "Initech" in table.output
    listed = runner.invoke(cli_app, ["policy", "events", "--json"], env=farm.cli_env(key))
    assert listed.exit_code == 0, (listed.output, listed.exception)
    [event] = json.loads(listed.output)["data"]
    assert (event["rule"], event["field"], event["matched"]) == (
        "protected_marks[0]",
        "prompt",
        "Initech",
    )
