"""Managed processes: port-in-use errors name the setting; down stops only what it recorded."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cluster.cli import app
from cluster.processes import ManagedProcess, ProcessSpec, StackError, pid_alive, port_is_free
from cluster.stack import http_ok
from tests.conftest import free_ports


def _http_server(port: int) -> ProcessSpec:
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    return ProcessSpec("web", argv, port, "api_port", lambda: http_ok(f"http://127.0.0.1:{port}/"))


def test_start_is_idempotent_and_stop_kills_only_the_recorded_group(tmp_path):
    [port] = free_ports(1)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc = ManagedProcess(_http_server(port), tmp_path, "127.0.0.1")
    try:
        assert proc.start(timeout_s=30) is True
        pid = proc.recorded_pid()
        assert pid and pid_alive(pid)
        assert proc.start(timeout_s=30) is False  # already running: nothing new started
        assert proc.recorded_pid() == pid
        assert proc.stop() is True
        assert not pid_alive(pid) and port_is_free("127.0.0.1", port)
        assert bystander.poll() is None  # an unrelated process is untouched
        assert proc.stop() is False
    finally:
        bystander.kill()
        proc.stop()


def test_a_crashing_process_reports_its_log(tmp_path):
    [port] = free_ports(1)
    spec = ProcessSpec(
        "crash",
        [sys.executable, "-c", "print('boom: bad flag'); raise SystemExit(3)"],
        port,
        "api_port",
        lambda: False,
    )
    with pytest.raises(StackError, match=r"(?s)exited with code 3.*boom: bad flag"):
        ManagedProcess(spec, tmp_path, "127.0.0.1").start(timeout_s=30)


def test_port_in_use_names_port_and_setting(tmp_path):
    [port] = free_ports(1)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(StackError, match=f"port {port}.*BRANDFARM_API_PORT"):
            ManagedProcess(_http_server(port), tmp_path, "127.0.0.1").start(timeout_s=5)
        # The CLI says the same and exits non-zero before starting anything.
        env = {"BRANDFARM_STATE_DIR": str(tmp_path / "state"), "BRANDFARM_S3_PORT": str(port)}
        result = CliRunner().invoke(app, ["up"], env=env)
    assert result.exit_code == 1
    assert f"port {port}" in result.output and "BRANDFARM_S3_PORT" in result.output


def test_cli_tenants_commands(tmp_path):
    env = {"BRANDFARM_STATE_DIR": str(tmp_path / "state")}
    runner = CliRunner()
    created = runner.invoke(app, ["tenants", "create", "acme", "--images-per-hour", "10"], env=env)
    assert created.exit_code == 0, created.output
    key = created.output.strip().splitlines()[-1]
    assert key.startswith("bf-")
    listed = runner.invoke(app, ["tenants", "list"], env=env)
    assert "acme" in listed.output and "10" in listed.output
    dup = runner.invoke(app, ["tenants", "create", "acme"], env=env)
    assert dup.exit_code == 1 and "already exists" in dup.output
    revoked = runner.invoke(app, ["tenants", "revoke-key", key.split("-")[1]], env=env)
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    bad = runner.invoke(app, ["up"], env={**env, "BRANDFARM_NUM_REPLICAS": "0"})
    assert bad.exit_code == 2 and "num_replicas" in bad.output


def test_cli_base_model_train_forwards_to_the_training_script():
    result = CliRunner().invoke(app, ["base-model", "train", "--help"])
    assert result.exit_code == 0, result.output
    for flag in ("--out", "--steps", "--seed", "--batch-size"):
        assert flag in result.output
