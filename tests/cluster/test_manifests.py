"""The production manifests in infra/: they parse, embed the Serve config the app builds, name real
import paths and settings, and (where a validator is installed) pass Kubernetes/Ray schemas."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from registry.settings import CONFIG_FILE_ENV, Settings
from serve.serve_config import IMPORT_PATH, serve_config

INFRA = Path(__file__).resolve().parents[2] / "infra"
ROOT = INFRA.parent
YAML_FILES = sorted([*INFRA.glob("*.yaml"), *INFRA.glob("*.yml"), *INFRA.glob("kuberay/*.yaml")])
MANIFESTS = [*YAML_FILES, INFRA / "Dockerfile"]
ENV_NAME = re.compile(r"\bBRANDFARM_[A-Z0-9_]+\b")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """The manifests hold production defaults: compare them with settings read from no env."""
    for name in list(os.environ):
        if name.startswith("BRANDFARM_") or name == "RAY_ADDRESS":
            monkeypatch.delenv(name)


def render():
    spec = importlib.util.spec_from_file_location("infra_render", INFRA / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(name: str) -> list[dict]:
    return list(yaml.safe_load_all((INFRA / name).read_text()))


def test_the_manifests_exist():
    names = {p.relative_to(INFRA).as_posix() for p in MANIFESTS}
    assert {
        "Dockerfile",
        "docker-compose.yml",
        "ray-cluster.yaml",
        "serve-config.yaml",
        "kuberay/rayservice.yaml",
        "kuberay/rayjob-finetune.yaml",
        "kuberay/storage.yaml",
    } <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_every_yaml_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(doc, dict) for doc in docs)


def test_rayservice_embeds_the_serve_config_of_production_settings():
    [service] = load("kuberay/rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded == serve_config(render().production_settings())


def test_serve_config_file_is_the_same_config():
    [config] = load("serve-config.yaml")
    assert config == serve_config(render().production_settings())


def test_render_is_idempotent():
    r = render()
    text = (INFRA / "kuberay/rayservice.yaml").read_text()
    assert r.embed(text, r.config_yaml(r.production_settings())) == text


def test_production_settings_are_real_fields():
    assert set(render().PRODUCTION) <= set(Settings.model_fields)


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity ("48Gi", "512Mi") in bytes."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity.removesuffix(suffix)) * factor
    return int(quantity)


def test_rayservice_has_gpu_workers_and_autoscaling():
    [service] = load("kuberay/rayservice.yaml")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    [gpu] = cluster["workerGroupSpecs"]
    [container] = gpu["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    gpus_per_pod = int(limits["nvidia.com/gpu"])
    assert gpus_per_pod >= 1
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    [_, replica] = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0][
        "deployments"
    ]
    # Serve scales the replicas with load; the node group can grow to hold the most of them.
    scaling = replica["autoscaling_config"]
    assert "num_replicas" not in replica
    assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"]
    options = replica["ray_actor_options"]
    replicas_per_pod = gpus_per_pod // options["num_gpus"]
    assert scaling["max_replicas"] <= gpu["maxReplicas"] * replicas_per_pod
    # A replica (CPUs, GPUs, memory) fits on one GPU worker pod.
    assert options["num_gpus"] <= gpus_per_pod
    assert options["num_cpus"] <= float(limits["cpu"])
    assert options["memory"] < quantity_bytes(limits["memory"])


def test_import_paths_in_manifests_resolve():
    module, _, attr = IMPORT_PATH.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    [job] = load("kuberay/rayjob-finetune.yaml")
    assert job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"] == "python -m finetune.job JOB_ID"
    job_module = importlib.import_module("finetune.job")
    assert callable(job_module.main)
    for path in YAML_FILES:
        for dotted in re.findall(r"-m ([a-z_]+(?:\.[a-z_]+)+)", path.read_text()):
            assert importlib.util.find_spec(dotted) is not None, (path.name, dotted)


def test_every_brandfarm_env_name_is_a_settings_field():
    fields = set(Settings.model_fields)
    for path in [*MANIFESTS, ROOT / "docs" / "deploy.md"]:
        for name in set(ENV_NAME.findall(path.read_text())):
            if name == CONFIG_FILE_ENV:
                continue
            assert name.removeprefix("BRANDFARM_").lower() in fields, (path.name, name)


def test_compose_services_are_consistent():
    [compose] = load("docker-compose.yml")
    services = compose["services"]
    assert {"minio", "postgres", "mlflow", "ray-head", "ray-gpu-worker", "serve-deploy"} <= set(
        services
    )
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (name, dependency)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).exists(), (name, source)
            else:
                assert source in compose["volumes"], (name, source)
    built = {s["image"] for s in services.values() if "build" in s}
    assert built == {"brandfarm:0.1.0"}
    ours = [n for n, s in services.items() if s.get("image") in built]
    assert set(ours) == {"mlflow", "ray-head", "ray-gpu-worker", "serve-deploy"}
    assert (ROOT / services["mlflow"]["build"]["dockerfile"]).is_file()

    head = services["ray-head"]["command"]
    assert "--head" in head and "--block" in head and "--port=6380" in head
    assert "--address=ray-head:6380" in services["ray-gpu-worker"]["command"]
    devices = services["ray-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    mlflow = " ".join(services["mlflow"]["command"])
    assert "--artifacts-destination=s3://mlflow" in mlflow and "--serve-artifacts" in mlflow
    assert "postgresql" in mlflow and "MLFLOW_S3_ENDPOINT_URL" in services["mlflow"]["environment"]
    deploy = services["serve-deploy"]
    assert deploy["command"][-1] == "/etc/brandfarm/serve-config.yaml"
    assert any(v.startswith("./serve-config.yaml:/etc/brandfarm/") for v in deploy["volumes"])
    # The API port the Serve config listens on is the one published.
    port = serve_config(render().production_settings())["http_options"]["port"]
    assert f"{port}:{port}" in services["ray-head"]["ports"]


def test_dockerfile_basics():
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", text, re.M)
    assert "python3.11" in text and "pip install ." in text
    assert re.search(r"pip install \"torch==\$\{TORCH_VERSION\}\" --index-url", text)
    assert re.search(r"^USER (?!root)\S+", text, re.M)
    assert 'ENTRYPOINT ["brandfarm"]' in text
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for part in source.split():
            assert (ROOT / part).exists(), part


def test_cluster_launcher_matches_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema_file = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    [config] = load("ray-cluster.yaml")
    jsonschema.validate(config, json.loads(schema_file.read_text()))
    assert config["head_node_type"] in config["available_node_types"]
    commands = " ".join(config["setup_commands"] + config["head_start_ray_commands"])
    assert "pip install" in commands and "serve deploy" in commands
    assert "infra/serve-config.yaml" in commands


def pods(doc: dict) -> list[dict]:
    """Every pod template of a KubeRay resource, as a standalone `v1 Pod`."""
    spec = doc["spec"].get("rayClusterConfig") or doc["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p"},
            "spec": g["template"]["spec"],
        }
        for g in groups
    ]


def test_kubernetes_schemas_when_a_validator_is_installed():
    """`kubernetes-validate` ships the Kubernetes schemas (works offline) but not KubeRay's CRDs,
    so built-in kinds are checked whole and each KubeRay pod template as a strict v1 Pod."""
    kv = pytest.importorskip("kubernetes_validate")
    version = kv.latest_version()
    checked = 0
    for path in INFRA.glob("kuberay/*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["apiVersion"].startswith("ray.io/"):
                for pod in pods(doc):
                    kv.validate(pod, version, strict=True)
                    checked += 1
            else:
                kv.validate(doc, version, strict=True)
                checked += 1
    assert checked >= 5


def test_kuberay_pods_take_each_credential_from_a_secret_key():
    """Credentials reach Ray's pods only as `secretKeyRef` env (a fine-tune job reads them from
    its node's env, never from its runtime env); no pod names a secret setting by value or pulls
    a whole Secret in with `envFrom`."""
    from registry.settings import SECRET_FIELDS

    needed = {"s3_access_key", "s3_secret_key", "database_url", "mlflow_tracking_uri"}
    checked = 0
    for path in INFRA.glob("kuberay/*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc["apiVersion"].startswith("ray.io/"):
                continue
            for pod in pods(doc):
                for container in pod["spec"]["containers"]:
                    assert all("secretRef" not in e for e in container.get("envFrom", [])), path
                    env = {
                        e["name"].removeprefix("BRANDFARM_").lower(): e for e in container["env"]
                    }
                    for name in SECRET_FIELDS & set(env):
                        assert "value" not in env[name], (path.name, name)
                        assert env[name]["valueFrom"]["secretKeyRef"]["name"], (path.name, name)
                    assert needed <= set(env), (path.name, needed - set(env))
                    if doc["kind"] == "RayService":  # the ingress seals webhook secrets
                        assert "encryption_keys" in env, path.name
                    checked += 1
    assert checked >= 4
