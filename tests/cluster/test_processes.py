"""Managed processes: port-in-use errors name the setting; down stops only what it recorded;
local Ray worker nodes are specified to join the embedded head."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cluster.cli import app
from cluster.processes import (
    ManagedProcess,
    ProcessSpec,
    StackError,
    free_ports,
    pid_alive,
    port_is_free,
)
from cluster.stack import LocalStack, http_ok
from cluster.topology import local_worker_resource, node_name
from registry.settings import Settings


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


def test_kill_is_a_crash_and_start_brings_it_back(tmp_path):
    """`kill` (the chaos suite's crash) SIGKILLs the group at once; the next `start`, as `up`
    does, sees the recorded process dead and starts a new one on the same port."""
    [port] = free_ports(1)
    proc = ManagedProcess(_http_server(port), tmp_path, "127.0.0.1")
    try:
        proc.start(timeout_s=30)
        pid = proc.recorded_pid()
        assert proc.kill() is True
        assert not pid_alive(pid) and proc.recorded_pid() is None
        assert proc.kill() is False
        assert proc.start(timeout_s=30) is True
        assert proc.recorded_pid() not in (None, pid) and proc.spec.probe()
    finally:
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


def test_local_worker_nodes_join_the_embedded_head(tmp_path):
    s = Settings(
        state_dir=tmp_path / "state",
        ray_gcs_port=26380,
        ray_worker_nodes=2,
        ray_worker_gpus=2,
        ray_worker_cpus=3,
        ray_min_worker_port=30000,
        ray_max_worker_port=30999,
    )
    stack = LocalStack(s)
    components = {c.spec.name: c.spec for c in stack._components(stack.resolved_settings(True))}
    assert list(components) == ["s3", "mlflow", "ray", "ray-worker-1", "ray-worker-2"]
    for i in (1, 2):
        spec = components[f"ray-worker-{i}"]
        argv = " ".join(spec.argv)
        assert spec.port is None  # no fixed port of its own: nothing to check or collide with
        assert "start --block --address 127.0.0.1:26380" in argv and "--head" not in argv
        assert "--num-cpus 3 --num-gpus 2" in argv
        assert f'--resources {{"{local_worker_resource(i)}": 1}}' in argv
        assert "--dashboard-agent-listen-port 0" in argv
        assert "--min-worker-port 30000 --max-worker-port 30999" in argv
        assert node_name({local_worker_resource(i): 1.0, "GPU": 2.0}, False) == f"ray-worker-{i}"
    # Every node of the stack shares Ray's worker port range, which Settings keeps clear.
    assert "--min-worker-port 30000 --max-worker-port 30999" in " ".join(components["ray"].argv)
    assert node_name({"CPU": 4.0}, True) == "head"

    # An existing cluster: no head, no local workers; `up --address` deploys there.
    external = LocalStack(Settings(state_dir=tmp_path / "other", ray_address="10.0.0.5:6380"))
    names = [c.spec.name for c in external._components(external.resolved_settings(True))]
    assert names == ["s3", "mlflow"]
    assert external.ray_address(external.resolved_settings()) == "10.0.0.5:6380"


def test_cli_worker_flags_reach_the_settings(tmp_path):
    env = {"BRANDFARM_STATE_DIR": str(tmp_path / "state")}
    bad = CliRunner().invoke(app, ["up", "--workers", "2", "--address", "10.0.0.5:6380"], env=env)
    assert bad.exit_code == 2
    assert "ray_worker_nodes=2" in bad.output and "ray_address=10.0.0.5:6380" in bad.output
    result = CliRunner().invoke(app, ["up", "--help"])
    for flag in ("--workers", "--worker-gpus", "--worker-cpus", "--address"):
        assert flag in result.output


def test_down_also_stops_worker_nodes_recorded_by_an_earlier_up(tmp_path):
    state = tmp_path / "state"
    two = LocalStack(Settings(state_dir=state, ray_worker_nodes=2))
    two.resolved_settings(create=True)
    worker = two.component("ray-worker-2")
    [port] = free_ports(1)
    worker.spec.argv = _http_server(port).argv  # a stand-in process recorded as ray-worker-2
    worker.spec.probe = lambda: http_ok(f"http://127.0.0.1:{port}/")
    worker.start(timeout_s=30)
    pid = worker.recorded_pid()
    # Settings now ask for fewer workers: `down` still stops the recorded one.
    stopped = LocalStack(Settings(state_dir=state, ray_worker_nodes=1)).down()
    assert stopped == ["ray-worker-2"] and not pid_alive(pid)


def test_up_refuses_unreachable_external_dependencies_naming_each_setting(tmp_path):
    from cluster.processes import StackError

    dead = [f"127.0.0.1:{p}" for p in free_ports(3)]  # nothing listens on these
    s = Settings(
        state_dir=tmp_path / "state",
        database_url=f"postgresql+psycopg://bf:secret-pw@{dead[0]}/farm",
        s3_endpoint=f"http://{dead[1]}",
        s3_access_key="ak",
        s3_secret_key="sk",
        mlflow_tracking_uri=f"http://{dead[2]}",
        ray_address="127.0.0.1:1",  # never reached: `up` stops before starting anything
    )
    with pytest.raises(StackError) as e:
        LocalStack(s).up()
    message = str(e.value)
    for setting in ("database_url", "s3_endpoint", "mlflow_tracking_uri"):
        assert setting in message
    assert "secret-pw" not in message
    assert not (tmp_path / "state" / "logs").exists()  # nothing was started
