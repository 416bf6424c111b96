"""The Serve config file: valid for Ray Serve's own schema, names the real builder and deployments,
follows settings, and deploys the same options the app sets in code."""

from __future__ import annotations

import importlib

import pytest
from ray.serve.schema import DeploymentSchema, ServeDeploySchema

from registry.base_models import BaseModelInfo
from registry.settings import Settings
from serve import app as serve_app
from serve.serve_config import APP_NAME, IMPORT_PATH, secret_fields, serve_config, settings_args

FAKE_MODEL = BaseModelInfo("m", "/nowhere", "0" * 64, 64, 8, 1024, 20, 5.0)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Settings read the environment: these tests see only what they set."""
    import os

    for name in list(os.environ):
        if name.startswith("BRANDFARM_") or name == "RAY_ADDRESS":
            monkeypatch.delenv(name)


def application(config: dict) -> dict:
    [app] = config["applications"]
    return app


def deployments(config: dict) -> dict[str, dict]:
    return {d["name"]: d for d in application(config)["deployments"]}


def test_validates_against_ray_serves_schema():
    config = serve_config(Settings())
    parsed = ServeDeploySchema.model_validate(config)
    assert parsed.applications[0].import_path == IMPORT_PATH
    # DeploymentSchema ignores unknown keys, so check ours are all real options.
    for deployment in application(config)["deployments"]:
        assert set(deployment) <= set(DeploymentSchema.model_fields)


def test_names_match_the_app():
    config = serve_config(Settings())
    assert APP_NAME == serve_app.APP_NAME == application(config)["name"]
    assert set(deployments(config)) == {
        serve_app.Ingress.name,
        serve_app.DiffusionReplica.name,
    }


def test_import_path_resolves_to_a_one_argument_builder():
    import inspect

    module, _, attr = IMPORT_PATH.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert callable(builder)
    assert len(inspect.signature(builder).parameters) == 1


def test_settings_changes_show_up():
    s = Settings(
        num_replicas=3,
        cpus_per_replica=6,
        gpus_per_replica=2,
        max_ongoing_requests=9,
        api_port=8123,
        host="0.0.0.0",
    )
    config = serve_config(s)
    replica = deployments(config)["DiffusionReplica"]
    assert replica["num_replicas"] == 3
    assert replica["max_ongoing_requests"] == 9
    assert replica["ray_actor_options"] == {
        "num_cpus": 6.0,
        "num_gpus": 2.0,
        "runtime_env": {"env_vars": s.mlflow_client_env()},
    }
    # The ingress lets through what the replicas hold (they batch from it), not Serve's 5.
    assert deployments(config)["Ingress"]["max_ongoing_requests"] == max(
        s.ingress_max_ongoing_requests, 27
    )
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8123, "request_timeout_s": 300.0}
    assert application(config)["args"]["num_replicas"] == 3


def test_args_are_non_default_fields_without_secrets():
    s = Settings(
        base_model="some/hub-id",
        s3_endpoint="http://minio:9000",
        s3_access_key="AK",
        s3_secret_key="SK",
        api_key="bf-x",
        database_url="postgresql://u:pw@db/x",
    )
    args = settings_args(s)
    assert args == {"base_model": "some/hub-id", "s3_endpoint": "http://minio:9000"}
    assert {"s3_access_key", "s3_secret_key", "api_key", "database_url"} <= secret_fields()
    assert "pw" not in str(serve_config(s)) and "SK" not in str(serve_config(s))
    assert settings_args(Settings()) == {}


def test_args_rebuild_the_same_settings():
    s = Settings(num_replicas=2, state_dir="/var/lib/x", device="cpu", gpus_per_replica=0.5)
    assert Settings(**settings_args(s)) == s


def options_in_code(app) -> dict[str, dict]:
    """{deployment name: the options `build_app` set on it}, as Ray Serve itself reports them
    (`deployment_to_schema` keeps exactly the options the code configured)."""
    from ray.serve._private.build_app import build_app as ray_build_app
    from ray.serve.deployment import deployment_to_schema

    built = ray_build_app(app, name=APP_NAME)
    return {
        d.name: deployment_to_schema(d).model_dump(mode="json", exclude_unset=True)
        for d in built.deployments
    }


def options_in_config(config: dict) -> dict[str, dict]:
    """The same view of the config file's deployments, parsed by Ray Serve's schema."""
    return {
        name: DeploymentSchema.model_validate(d).model_dump(mode="json", exclude_unset=True)
        for name, d in deployments(config).items()
    }


def assert_config_matches_code(config: dict, app) -> None:
    assert options_in_config(config) == options_in_code(app)


PLACEMENTS = {
    "fixed": dict(num_replicas=3, cpus_per_replica=2, gpus_per_replica=1, max_ongoing_requests=7),
    "shared-gpu": dict(num_replicas=4, gpus_per_replica=0.25, memory_per_replica_mb=2048),
    "multi-gpu": dict(num_replicas=2, cpus_per_replica=6, gpus_per_replica=4),
    "one-per-node": dict(num_replicas=3, gpus_per_replica=1, max_replicas_per_node=1),
    "autoscale": dict(
        autoscale=True,
        min_replicas=1,
        max_replicas=6,
        target_ongoing_requests=1.5,
        autoscale_upscale_delay_s=5,
        autoscale_downscale_delay_s=60,
        gpus_per_replica=1,
    ),
}


@pytest.mark.parametrize("overrides", PLACEMENTS.values(), ids=PLACEMENTS)
def test_config_deploys_the_options_build_app_sets(overrides):
    s = Settings(**overrides)
    assert_config_matches_code(serve_config(s), serve_app.build_app(s, FAKE_MODEL))


def test_autoscaling_replaces_the_fixed_count():
    s = Settings(
        autoscale=True,
        num_replicas=5,
        min_replicas=2,
        max_replicas=8,
        target_ongoing_requests=3,
        max_ongoing_requests=6,
        autoscale_upscale_delay_s=4,
        autoscale_downscale_delay_s=90,
        autoscale_look_back_s=12,
    )
    replica = deployments(serve_config(s))["DiffusionReplica"]
    assert "num_replicas" not in replica  # Serve refuses both; autoscale wins, as documented
    assert replica["autoscaling_config"] == {
        "min_replicas": 2,
        "max_replicas": 8,
        "target_ongoing_requests": 3.0,
        "upscale_delay_s": 4.0,
        "downscale_delay_s": 90.0,
        "look_back_period_s": 12.0,
    }
    assert replica["max_ongoing_requests"] == 6


def test_metrics_interval_is_written_only_when_changed():
    from ray.serve.config import DEFAULT_METRICS_INTERVAL_S

    from serve.placement import RAY_DEFAULT_METRICS_INTERVAL_S, autoscaling_config

    assert RAY_DEFAULT_METRICS_INTERVAL_S == DEFAULT_METRICS_INTERVAL_S
    assert Settings().autoscale_metrics_interval_s == DEFAULT_METRICS_INTERVAL_S
    assert "metrics_interval_s" not in autoscaling_config(Settings(autoscale=True))
    fast = Settings(autoscale=True, autoscale_metrics_interval_s=0.5, autoscale_look_back_s=2)
    assert autoscaling_config(fast)["metrics_interval_s"] == 0.5


def test_a_multi_gpu_replica_gets_one_strict_pack_bundle_holding_the_actor():
    s = Settings(gpus_per_replica=2, cpus_per_replica=3, memory_per_replica_mb=1024)
    replica = deployments(serve_config(s))["DiffusionReplica"]
    assert replica["ray_actor_options"] == {
        "num_cpus": 3.0,
        "num_gpus": 2.0,
        "memory": 1 << 30,
        "runtime_env": {"env_vars": s.mlflow_client_env()},
    }
    assert replica["placement_group_strategy"] == "STRICT_PACK"
    assert replica["placement_group_bundles"] == [{"CPU": 3.0, "GPU": 2.0, "memory": 1 << 30}]
    # One GPU or a share of one: a plain actor, no placement group.
    for gpus in (0, 0.5, 1):
        options = deployments(serve_config(Settings(gpus_per_replica=gpus)))["DiffusionReplica"]
        assert (
            "placement_group_bundles" not in options and "placement_group_strategy" not in options
        )
    # The bundle lists only what it reserves.
    bare = deployments(serve_config(Settings(gpus_per_replica=3, cpus_per_replica=0)))
    assert bare["DiffusionReplica"]["placement_group_bundles"] == [{"GPU": 3.0}]


def test_builder_builds_that_app_from_the_configs_args(tmp_path):
    from serve.builder import app as builder

    # tiny-sd-random is built into <state_dir>/models: its folder proves the args were honoured.
    s = Settings(
        state_dir=tmp_path / "state",
        base_model="tiny-sd-random",
        num_replicas=2,
        max_ongoing_requests=5,
    )
    config = serve_config(s)
    built = builder(application(config)["args"])
    assert_config_matches_code(config, built)
    assert (tmp_path / "state" / "models").is_dir()


def test_http_options_carry_the_request_timeout_and_ray_accepts_them():
    from ray.serve.config import HTTPOptions

    options = serve_config(Settings(request_timeout_s=42))["http_options"]
    assert HTTPOptions(**options).request_timeout_s == 42


def test_the_ingress_admits_more_than_one_tenants_inflight_limit():
    s = Settings(max_inflight_per_tenant=8)
    ingress = deployments(serve_config(s))["Ingress"]
    assert ingress["max_ongoing_requests"] > s.max_inflight_per_tenant
    with pytest.raises(ValueError, match="ingress_max_ongoing_requests"):
        Settings(max_inflight_per_tenant=16, ingress_max_ongoing_requests=16)
