"""The farm's Ray Serve config file (`serve deploy`, KubeRay `serveConfigV2`) from `Settings`.

Its replica options come from `serve.placement.replica_deployment_options`, the function
`serve.app.build_app` uses in code (replica count or autoscaling, resources, placement group,
max replicas per node), and its `args` rebuild the same `Settings` in `serve.builder:app` on the
cluster, so a config file cannot drift from the app.
"""

from __future__ import annotations

from typing import Any

from registry.settings import SECRET_FIELDS, Settings
from serve.placement import ingress_deployment_options, replica_deployment_options

APP_NAME = "brandfarm"  # == serve.app.APP_NAME (a test checks; importing it would pull in Ray)
IMPORT_PATH = "serve.builder:app"
INGRESS = "Ingress"
REPLICA = "DiffusionReplica"


def secret_fields() -> frozenset[str]:
    """Settings fields left out of a config file: `registry.settings.SECRET_FIELDS`."""
    return SECRET_FIELDS


def settings_args(settings: Settings) -> dict[str, Any]:
    """The application's `args`: every non-secret field whose value differs from its default,
    as JSON values. Fields not listed (secrets, endpoints left at default) come from the
    replicas' `BRANDFARM_*` environment; a listed field wins over the environment."""
    values = settings.model_dump(mode="json", exclude=set(secret_fields()))
    defaults = Settings.model_construct().model_dump(mode="json", exclude=set(secret_fields()))
    return {name: value for name, value in values.items() if value != defaults[name]}


def http_options(settings: Settings) -> dict[str, Any]:
    """Serve's HTTP proxy options: where it listens and its end-to-end request timeout."""
    return {
        "host": settings.host,
        "port": settings.api_port,
        "request_timeout_s": settings.request_timeout_s,
    }


def serve_config(settings: Settings) -> dict[str, Any]:
    """The Serve config-file dict (Ray's `ServeDeploySchema`) that deploys this farm's app."""
    return {
        "proxy_location": "EveryNode",
        "http_options": http_options(settings),
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": settings_args(settings),
                "deployments": [
                    {"name": INGRESS, **ingress_deployment_options(settings)},
                    {"name": REPLICA, **replica_deployment_options(settings)},
                ],
            }
        ],
    }
