"""Fine-tune jobs on the real stack: Ray job → checkpoints → MLflow run → registered adapter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import psutil
import pytest
from ray.job_submission import JobSubmissionClient
from ray.util.state import get_log, list_logs, list_nodes
from typer.testing import CliRunner

from cluster.cli import app as cli_app
from finetune.job import experiment_name
from finetune.world import write_brand_zip
from registry.adapters import AdapterRegistry

pytestmark = pytest.mark.e2e
TRIGGER = "acme style"


@pytest.fixture(scope="module")
def tenant(farm, tmp_path_factory):
    key = farm.new_tenant("tune-co")
    data = write_brand_zip(tmp_path_factory.mktemp("ds") / "acme.zip", "acme", n=8, seed=2)
    with farm.http(key) as c:
        up = c.post(
            "/files", files={"file": ("acme.zip", data.read_bytes())}, data={"purpose": "fine-tune"}
        )
    assert up.status_code == 200, up.text
    return key, up.json()["id"]


def _create(farm, key, file_id, steps, headers=None, **extra):
    body = {
        "training_file": file_id,
        "brand": extra.pop("brand", "acme"),
        "trigger_word": TRIGGER,
        "seed": 7,
        "hyperparameters": {"steps": steps, "rank": 4, "alpha": 4, "batch_size": 2},
        **extra,
    }
    with farm.http(key) as c:
        r = c.post("/fine_tuning/jobs", json=body, headers=headers or {})
    assert r.status_code == 200, r.text
    return r.json()


def _wait(farm, key, job_id, until, timeout=900.0):
    deadline = time.monotonic() + timeout
    with farm.http(key) as c:
        while time.monotonic() < deadline:
            job = c.get(f"/fine_tuning/jobs/{job_id}").json()
            events = c.get(f"/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()
            if until(job, events["data"]):
                return job, events["data"]
            time.sleep(1)
    raise AssertionError(f"job {job_id} did not reach the condition: {job}")


def _done(job, _events):
    return job["status"] in ("succeeded", "failed", "cancelled")


def _job_versions(farm, tenant_id, brand, job_id):
    registry = AdapterRegistry(farm.settings.resolved_mlflow_uri)
    if brand not in registry.brands(tenant_id):
        return []
    return [v for v in registry.versions(tenant_id, brand) if v.tags.get("job_id") == job_id]


def test_job_trains_logs_and_registers(farm, tenant, tmp_path):
    key, file_id = tenant
    headers = {"Idempotency-Key": "first-try"}
    job = _create(
        farm,
        key,
        file_id,
        8,
        headers=headers,
        validation_prompts=["acme style, a orange circle on a teal background"],
    )
    again = _create(farm, key, file_id, 8, headers=headers)
    assert again["id"] == job["id"]  # a retried create returns the same job
    assert job["object"] == "fine_tuning.job" and job["status"] in ("queued", "running")

    job, events = _wait(farm, key, job["id"], _done)
    assert job["status"] == "succeeded", (job, events[-5:])
    assert job["adapter_version"] == 1 and job["fine_tuned_model"] == "acme:1"
    steps = [e["data"]["step"] for e in events if e["message"].startswith("step ")]
    assert steps[-1] == 8 and all(e["data"]["loss"] > 0 for e in events if e["data"]["loss"])
    saved = [e["data"]["step"] for e in events if e["message"].startswith("checkpoint saved")]
    assert saved == [4, 8]
    # The job ended: its checkpoints are gone, only the registered adapter stays.
    with farm.http(key) as c:
        ckpts = c.get(f"/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    assert ckpts == [] and farm.store.list(f"tenants/tune-co/jobs/{job['id']}/") == []

    # It ran as a Ray job, and nothing Ray keeps or shows about it holds a secret.
    ray_jobs = JobSubmissionClient(farm.settings.ray_dashboard_url).list_jobs()
    assert any(j.submission_id == job["id"] for j in ray_jobs)
    _assert_no_secret_in_ray(farm, job["id"])

    # MLflow: one experiment per tenant, one run per job, the loss curve, validation images.
    client = mlflow.MlflowClient(farm.settings.resolved_mlflow_uri)
    exp = client.get_experiment_by_name(experiment_name("tune-co"))
    [run] = client.search_runs([exp.experiment_id], f"tags.job_id = '{job['id']}'")
    assert run.data.params["rank"] == "4" and run.data.params["steps"] == "8"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 8
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "validation")]
    assert artifacts and artifacts[0].endswith("base-vs-adapter.png")
    # The evaluation (issue 15): 2 of the 8 images held out, scored for base and candidate (no
    # production yet), the grid in the run, the figures as version tags.
    assert "dataset loaded: 8 images, 2 held out for evaluation" in [e["message"] for e in events]
    assert run.data.params["images"] == "6" and run.data.params["heldout_images"] == "2"
    for variant in ("base", "candidate"):
        for score in ("heldout_denoise_loss", "brand_score", "prompt_adherence"):
            assert f"eval.{variant}.{score}" in run.data.metrics, (variant, score)
    evaluated = [a.path for a in client.list_artifacts(run.info.run_id, "eval")]
    assert "eval/grid-base-production-candidate.png" in evaluated, evaluated

    # The registry: every tag, alias staging, the weights download with a matching checksum.
    [version] = _job_versions(farm, "tune-co", "acme", job["id"])
    for tag in (
        "tenant",
        "brand",
        "base_model",
        "base_model_revision",
        "dataset_sha256",
        "job_id",
        "trigger_word",
        "rank",
        "alpha",
        "steps",
        "sha256",
    ):
        assert version.tags.get(tag), tag
    assert version.tags["trigger_word"] == TRIGGER and "staging" in version.aliases
    assert version.tags["eval.reference"] == "base" and version.tags["eval.heldout_images"] == "2"
    assert float(version.tags["eval.candidate.brand_score"]) >= 0
    assert version.tags["eval.gate"] in ("pass", "fail")
    registry = AdapterRegistry(farm.settings.resolved_mlflow_uri)
    assert registry.download(version, tmp_path).stat().st_size > 0


def _assert_no_secret_in_ray(farm, job_id):
    secrets = farm.settings.secret_values()
    assert {"s3_access_key", "s3_secret_key", "api_key"} <= set(secrets)
    dashboard = farm.settings.ray_dashboard_url
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_ADDRESS": dashboard}
    views = {
        "GET /api/jobs/": httpx.get(f"{dashboard}/api/jobs/", timeout=30).json(),
        "ray list jobs --format json": json.loads(
            subprocess.run(
                [ray_bin, "list", "jobs", "--detail", "--format", "json", "--limit", "1000"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
                timeout=120,
            ).stdout
        ),
        "ray job list": subprocess.run(
            [ray_bin, "job", "list"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout,
        "job logs": JobSubmissionClient(dashboard).get_job_logs(job_id),
        # The Ingress holds the settings (secrets included) as its init args: Serve must not
        # show them either.
        "GET /api/serve/applications/": httpx.get(
            f"{dashboard}/api/serve/applications/", timeout=30
        ).json(),
    }
    # Ray's own logs of setting up runtime envs (the probe found the key there before).
    gcs = f"{farm.settings.host}:{farm.settings.ray_gcs_port}"
    [head] = [n for n in list_nodes(address=dashboard) if n.is_head_node]
    logs = list_logs(address=gcs, node_id=head.node_id)
    agent_logs = [f for files in logs.values() for f in files if "runtime_env" in f]
    assert agent_logs, logs
    for name in agent_logs:
        views[name] = "".join(get_log(address=gcs, node_id=head.node_id, filename=name))
    for where, view in views.items():
        text = view if isinstance(view, str) else json.dumps(view)
        if where.startswith(("GET /api/jobs", "ray ")):
            assert job_id in text, where  # the view does show the job
        leaked = [name for name, value in secrets.items() if value in text]
        assert leaked == [], f"{leaked} in {where}"


def test_killed_training_process_resumes_from_checkpoint(farm, tenant):
    key, file_id = tenant
    job = _create(farm, key, file_id, 24, brand="acme-resume")

    def after_second_checkpoint(j, events):
        return any(e["message"] == "checkpoint saved at step 8" for e in events) or _done(j, events)

    job, _ = _wait(farm, key, job["id"], after_second_checkpoint)
    pid = farm.jobs.get_any(job["id"]).worker_pid
    assert pid, "the worker records its pid while running"
    os.kill(pid, signal.SIGKILL)  # the training process dies mid-run

    job, events = _wait(farm, key, job["id"], _done)
    assert job["status"] == "succeeded", events[-5:]
    assert job["attempts"] == 2
    messages = [e["message"] for e in events]
    resumed = [i for i, m in enumerate(messages) if m.startswith("resuming from the checkpoint")]
    assert len(resumed) == 1
    ckpt_step = events[resumed[0]]["data"]["step"]
    assert ckpt_step >= 8
    first_step_after = next(
        e["data"]["step"] for e in events[resumed[0] :] if e["message"].startswith("step ")
    )
    assert ckpt_step < first_step_after <= ckpt_step + 5  # continued, not restarted from 0
    assert len(_job_versions(farm, "tune-co", "acme-resume", job["id"])) == 1


def test_cancel_stops_quickly_and_registers_nothing(farm, tenant):
    key, file_id = tenant
    job = _create(farm, key, file_id, 5000, brand="acme-cancel")
    _wait(farm, key, job["id"], lambda j, ev: any(e["message"].startswith("step ") for e in ev))
    with farm.http(key) as c:
        r = c.post(f"/fine_tuning/jobs/{job['id']}/cancel")
    assert r.status_code == 200, r.text
    asked = time.monotonic()
    job, _ = _wait(farm, key, job["id"], _done, timeout=60)
    assert job["status"] == "cancelled" and job["adapter_version"] is None
    assert time.monotonic() - asked < 30
    assert _job_versions(farm, "tune-co", "acme-cancel", job["id"]) == []
    with farm.http(key) as c:
        again = c.post(f"/fine_tuning/jobs/{job['id']}/cancel")
    assert again.status_code == 409


def test_failed_job_registers_nothing(farm, tenant):
    key, _ = tenant
    data = write_brand_zip(farm.settings.state_dir / "bad.zip", "acme", n=4, seed=9)
    with farm.http(key) as c:
        up = c.post(
            "/files", files={"file": ("b.zip", data.read_bytes())}, data={"purpose": "fine-tune"}
        ).json()
    # The stored dataset no longer matches its recorded sha256: the worker must refuse it.
    record = farm.files.get("tune-co", up["id"])
    farm.store.put_bytes(record.object_key, b"tampered")
    job = _create(farm, key, up["id"], 4, brand="acme-fail")
    job, _ = _wait(farm, key, job["id"], _done)
    assert job["status"] == "failed" and "sha256" in job["error"]["message"]
    assert job["error"]["code"] == "invalid_training_file"
    assert _job_versions(farm, "tune-co", "acme-fail", job["id"]) == []


def test_a_failure_shows_tenants_no_internals_and_operators_everything(farm, tenant):
    key, _ = tenant
    data = write_brand_zip(farm.settings.state_dir / "gone.zip", "acme", n=4, seed=11)
    with farm.http(key) as c:
        up = c.post(
            "/files", files={"file": ("g.zip", data.read_bytes())}, data={"purpose": "fine-tune"}
        ).json()
    record = farm.files.get("tune-co", up["id"])
    farm.store.delete(record.object_key)  # the store lost the dataset: the SDK raises NoSuchKey
    job = _create(farm, key, up["id"], 4, brand="acme-gone")
    job, events = _wait(farm, key, job["id"], _done)
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_training_file"
    assert "upload it again" in job["error"]["message"]
    internals = [
        record.object_key,
        "tenants/",
        "NoSuchKey",
        "ObjectNotFound",
        "TrainingFileError",
        "Traceback",
        farm.settings.host,
        str(farm.settings.s3_port),
        str(farm.settings.state_dir),
        "http://",
    ]
    tenant_view = json.dumps([job, events])
    assert [x for x in internals if x in tenant_view] == []
    # Operators: the MLflow run holds the exception and its traceback.
    client = mlflow.MlflowClient(farm.settings.resolved_mlflow_uri)
    exp = client.get_experiment_by_name(experiment_name("tune-co"))
    [run] = client.search_runs([exp.experiment_id], f"tags.job_id = '{job['id']}'")
    assert "TrainingFileError" in run.data.tags["error_detail"]
    traceback = client.download_artifacts(run.info.run_id, "error/traceback.txt")
    assert "NoSuchKey" in Path(traceback).read_text()


def test_reconciler_fails_jobs_whose_supervisor_or_ray_job_died(farm, tenant):
    key, file_id = tenant
    killed = _create(farm, key, file_id, 5000, brand="acme-lost")
    stopped = _create(farm, key, file_id, 5000, brand="acme-stopped")
    for job in (killed, stopped):
        _wait(farm, key, job["id"], lambda j, ev: any(e["message"].startswith("step ") for e in ev))
    worker = psutil.Process(farm.jobs.get_any(killed["id"]).worker_pid)
    supervisor = worker.parent()
    assert (
        "finetune.job" in " ".join(supervisor.cmdline()) and "--worker" not in supervisor.cmdline()
    )
    supervisor.kill()  # its node's process dies: nobody is left to record the outcome
    JobSubmissionClient(farm.settings.ray_dashboard_url).stop_job(stopped["id"])  # `ray job stop`

    for job, ray_status in ((killed, "FAILED"), (stopped, "STOPPED")):
        job, events = _wait(farm, key, job["id"], _done, timeout=120)
        assert job["status"] == "failed", events[-3:]
        assert job["error"]["code"] == "cluster_job_lost", job
        status = JobSubmissionClient(farm.settings.ray_dashboard_url).get_job_status(job["id"])
        assert str(status.value) == ray_status
        assert _job_versions(farm, "tune-co", job["brand"], job["id"]) == []
    # The orphaned training process sees its job ended and stops; nothing of the job is left.
    worker.wait(timeout=120)
    deadline = time.monotonic() + 60
    while farm.store.list(f"tenants/tune-co/jobs/{killed['id']}/") and time.monotonic() < deadline:
        time.sleep(1)
    assert farm.store.list(f"tenants/tune-co/jobs/{killed['id']}/") == []


@pytest.mark.parametrize(
    ("override", "param", "status"),
    [
        ({"brand": "Bad_Brand"}, "brand", 400),
        ({"hyperparameters": {"steps": 10**6}}, "hyperparameters.steps", 400),
        ({"hyperparameters": {"rank": 0}}, "hyperparameters.rank", 400),
        ({"hyperparameters": {"learning_rate": 5}}, "hyperparameters.learning_rate", 400),
        ({"hyperparameters": {"resolution": 1000}}, "hyperparameters.resolution", 400),
        ({"validation_prompts": ["p"] * 9}, "validation_prompts", 400),
        ({"eval_prompts": []}, "eval_prompts", 400),
        ({"eval_prompts": ["p"] * 9}, "eval_prompts", 400),
        ({"eval_prompts": [" "]}, "eval_prompts", 400),
        ({"training_file": "file-nope"}, "training_file", 404),
        ({"base_model": "sdxl"}, "base_model", 404),
        ({"unknown": 1}, "unknown", 400),
    ],
)
def test_bad_job_requests(farm, tenant, override, param, status):
    key, file_id = tenant
    body = {"training_file": file_id, "brand": "acme", **override}
    before = farm.jobs.count()
    with farm.http(key) as c:
        r = c.post("/fine_tuning/jobs", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    assert farm.jobs.count() == before


def test_another_tenants_jobs_and_files_are_404(farm, tenant):
    key, file_id = tenant
    with farm.http(key) as c:
        job_id = c.get("/fine_tuning/jobs").json()["data"][0]["id"]
    other = farm.new_tenant("tune-other")
    with farm.http(other) as c:
        for path in ("", "/events", "/checkpoints"):
            assert c.get(f"/fine_tuning/jobs/{job_id}{path}").status_code == 404
        assert c.post(f"/fine_tuning/jobs/{job_id}/cancel").status_code == 404
        assert c.get("/fine_tuning/jobs").json()["data"] == []
        r = c.post("/fine_tuning/jobs", json={"training_file": file_id, "brand": "acme"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "training_file"


def test_cli_submit_wait_and_adapters_api(farm, tenant, tmp_path):
    key, _ = tenant
    # The promotion gate (issue 15): with auto_promote and a gate that lets anything through,
    # the next version becomes production by itself when its job ends.
    policy = ["adapters", "policy", "set", "acme", "--auto-promote", "--min-improvement", "-1"]
    policy += ["--max-adherence-drop", "1"]
    set_policy = CliRunner().invoke(cli_app, policy, env=farm.cli_env(key))
    assert set_policy.exit_code == 0 and '"auto_promote": true' in set_policy.output, set_policy
    # A second version of acme (the first came from test_job_trains_logs_and_registers),
    # submitted the way a person would: `brandfarm finetune submit --wait`.
    data = write_brand_zip(tmp_path / "acme.zip", "acme", n=6, seed=4)
    argv = [
        "finetune",
        "submit",
        str(data),
        "--brand",
        "acme",
        "--trigger-word",
        TRIGGER,
        "--steps",
        "4",
        "--rank",
        "4",
        "--alpha",
        "4",
        "--batch-size",
        "2",
        "--wait",
    ]
    result = CliRunner().invoke(cli_app, argv, env=farm.cli_env(key))
    assert result.exit_code == 0, result.output
    assert "job succeeded: adapter acme:" in result.output
    v2 = int(result.output.split("adapter acme:")[1].split()[0])
    assert v2 >= 2
    with farm.http(key) as c:
        job = c.get("/fine_tuning/jobs").json()["data"][0]
        brands = {b["brand"]: b for b in c.get("/adapters").json()["data"]}
        acme = {v["version"]: v for v in brands["acme"]["versions"]}
        assert "staging" in acme[v2]["aliases"] and acme[v2]["tags"]["job_id"] == job["id"]
        assert "production" in acme[v2]["aliases"]  # auto_promote
        events = c.get(f"/fine_tuning/jobs/{job['id']}/events", params={"limit": 1000}).json()
        assert f"promoted v{v2} to production (auto_promote)" in [
            e["message"] for e in events["data"]
        ]
        # A strict gate: a few-step version cannot gain 0.5 brand_score over the base model.
        strict = c.put("/adapters/acme/policy", json={"min_improvement": 0.5})
        assert strict.status_code == 200 and strict.json()["auto_promote"] is False, strict.text
        assert c.get("/adapters/acme/policy").json()["min_improvement"] == 0.5
        refused = c.post("/adapters/acme/aliases/production", json={"version": 1})
        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert error["code"] == "evaluation_failed" and error["gate"]["reference"] == "base"
        assert error["gate"]["metric"] == "brand_score" and error["gate"]["improvement"] < 0.5
        for version in (1, v2, 1):  # promote, promote, roll back: the same call
            r = c.post(
                "/adapters/acme/aliases/production", json={"version": version, "force": True}
            )
            assert r.status_code == 200 and "production" in r.json()["aliases"], r.text
        forced = c.get("/adapters/acme/versions/1").json()
        assert (
            forced["tags"]["promotion.forced_at"]
            and "0.5" in forced["tags"]["promotion.forced_reason"]
        )
        listed = CliRunner().invoke(cli_app, ["adapters", "list"], env=farm.cli_env(key))
        assert listed.exit_code == 0 and "production" in listed.output
        gated = CliRunner().invoke(
            cli_app, ["adapters", "promote", "acme", str(v2)], env=farm.cli_env(key)
        )
        assert gated.exit_code == 1 and "error 409" in gated.output, gated.output
        promoted = CliRunner().invoke(
            cli_app, ["adapters", "promote", "acme", "1", "--force"], env=farm.cli_env(key)
        )
        assert promoted.exit_code == 0 and "acme@production → version 1" in promoted.output
        shown = CliRunner().invoke(
            cli_app, ["adapters", "policy", "get", "acme"], env=farm.cli_env(key)
        )
        assert shown.exit_code == 0 and '"min_improvement": 0.5' in shown.output
        unknown = c.put("/adapters/acme/policy", json={"min_improvment": 0.1})
        assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "min_improvment"
        out_of_range = c.put("/adapters/acme/policy", json={"min_improvement": 2})
        assert out_of_range.status_code == 400
        assert out_of_range.json()["error"]["param"] == "min_improvement"
        acme = {v["version"]: v for v in c.get("/adapters").json()["data"][0]["versions"]}
        assert "production" in acme[1]["aliases"] and "production" not in acme[v2]["aliases"]
        assert c.post("/adapters/acme/aliases/production", json={"version": 99}).status_code == 404
        bad = c.post("/adapters/acme/aliases/Bad Alias!", json={"version": 1})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "alias"
    other = farm.new_tenant("tune-adapters-other")
    with farm.http(other) as c:
        assert c.get("/adapters").json()["data"] == []
        r = c.post("/adapters/acme/aliases/production", json={"version": 1})
        missing = c.post("/adapters/no-such-brand/aliases/production", json={"version": 1})
        foreign_policy = c.get("/adapters/acme/policy")
        put_foreign = c.put("/adapters/acme/policy", json={"auto_promote": True})
        missing_policy = c.get("/adapters/no-such-brand/policy")
    assert (
        foreign_policy.status_code == put_foreign.status_code == missing_policy.status_code == 404
    )
    assert r.status_code == missing.status_code == 404
    assert r.json()["error"]["message"].replace("acme", "X") == missing.json()["error"][
        "message"
    ].replace("no-such-brand", "X")


def test_data_parallel_job_on_two_ray_train_workers(farm, tenant):
    key, file_id = tenant
    job = _create(
        farm,
        key,
        file_id,
        8,
        brand="acme-dp",
        hyperparameters={"steps": 8, "rank": 4, "alpha": 4, "batch_size": 2, "workers": 2},
    )
    job, events = _wait(farm, key, job["id"], _done)
    assert job["status"] == "succeeded", events[-5:]
    messages = [e["message"] for e in events]
    assert "training data-parallel on 2 Ray Train workers" in messages
    assert "checkpoint saved at step 8" in messages  # rank 0 reports for the group
    assert len(_job_versions(farm, "tune-co", "acme-dp", job["id"])) == 1
    # Two Ray Train workers really ran on the cluster (Ray's state API, not our bookkeeping).
    from ray.util.state import list_actors

    workers = list_actors(
        address=farm.settings.ray_dashboard_url,
        filters=[("class_name", "=", "RayTrainWorker")],
        limit=100,
    )
    assert len(workers) >= 2
