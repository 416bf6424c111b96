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
        num_replicas=3, replica_num_cpus=6, replica_num_gpus=2, max_ongoing_requests=9,
        api_port=8123, host="0.0.0.0",
    )
    config = serve_config(s)
    replica = deployments(config)["DiffusionReplica"]
    assert replica["num_replicas"] == 3
    assert replica["max_ongoing_requests"] == 9
    assert replica["ray_actor_options"] == {"num_cpus": 6.0, "num_gpus": 2.0}
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8123}
    assert application(config)["args"]["num_replicas"] == 3


def test_args_are_non_default_fields_without_secrets():
    s = Settings(
        base_model="some/hub-id", s3_endpoint="http://minio:9000", s3_access_key="AK",
        s3_secret_key="SK", api_key="bf-x", database_url="postgresql://u:pw@db/x",
    )
    args = settings_args(s)
    assert args == {"base_model": "some/hub-id", "s3_endpoint": "http://minio:9000"}
    assert {"s3_access_key", "s3_secret_key", "api_key", "database_url"} <= secret_fields()
    assert "pw" not in str(serve_config(s)) and "SK" not in str(serve_config(s))
    assert settings_args(Settings()) == {}


def test_args_rebuild_the_same_settings():
    s = Settings(num_replicas=2, state_dir="/var/lib/x", device="cpu", replica_num_gpus=0.5)
    assert Settings(**settings_args(s)) == s


def options_in_code(app) -> dict[str, dict]:
    """{deployment name: the options `build_app` gave it} from an Application's bound graph."""
    from ray.serve._private.build_app import build_app as ray_build_app

    built = ray_build_app(app, name=APP_NAME)
    return {
        d.name: {
            "num_replicas": d.num_replicas,
            "max_ongoing_requests": d.max_ongoing_requests,
            "ray_actor_options": d.ray_actor_options,
        }
        for d in built.deployments
    }


def assert_config_matches_code(config: dict, app) -> None:
    code = options_in_code(app)
    assert set(code) == set(deployments(config))
    for name, deployment in deployments(config).items():
        for key, value in deployment.items():
            if key == "name":
                continue
            if key == "ray_actor_options":
                assert {k: code[name][key].get(k) for k in value} == value, name
            else:
                assert code[name][key] == value, (name, key)


def test_config_deploys_the_options_build_app_sets():
    s = Settings(num_replicas=3, replica_num_cpus=2, replica_num_gpus=1, max_ongoing_requests=7)
    assert_config_matches_code(serve_config(s), serve_app.build_app(s, FAKE_MODEL))


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
