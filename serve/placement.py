"""How the diffusion replicas are placed on the cluster, from `Settings` alone.

`replica_deployment_options(settings)` is the one source of the replica deployment's options:
`serve.app.build_app` passes them to `DiffusionReplica.options(...)` and `serve.serve_config`
writes the same values into the Serve config file, so code and config cannot drift.
No Ray import here: the config writer and the tests use it without Ray.

Placement, in Ray's terms:
- count: a fixed `num_replicas`, or Serve's request-based `autoscaling_config`
  (`min_replicas`..`max_replicas`, aiming at `target_ongoing_requests` per replica);
- resources: `ray_actor_options` (CPUs, GPUs, memory) of each replica actor;
- spread: Serve schedules replicas with Ray's SPREAD strategy (a preference for different
  nodes); `max_replicas_per_node` makes it a hard limit;
- a replica with k > 1 GPUs: one placement group per replica with a single bundle holding its
  CPUs, k GPUs and memory, strategy STRICT_PACK. A bundle never spans nodes, so the k GPUs are on
  one node, and the replica actor (pinned to bundle 0 by Serve) sees all k of them as
  cuda:0..k-1, where `registry.device_plan` spreads the pipeline's components.
"""

from __future__ import annotations

from typing import Any

from registry.settings import Settings

MIB = 1024 * 1024
# Ray Serve's default `metrics_interval_s` (ray.serve.config.DEFAULT_METRICS_INTERVAL_S; a test
# checks). Ray deprecates the field, so it is written only when a farm changes it.
RAY_DEFAULT_METRICS_INTERVAL_S = 10.0
MULTI_GPU_STRATEGY = "STRICT_PACK"


def autoscaling_config(settings: Settings) -> dict[str, Any]:
    """Serve's `autoscaling_config` for the replicas (used when `settings.autoscale`)."""
    config: dict[str, Any] = {
        "min_replicas": settings.min_replicas,
        "max_replicas": settings.max_replicas,
        "target_ongoing_requests": settings.target_ongoing_requests,
        "upscale_delay_s": settings.autoscale_upscale_delay_s,
        "downscale_delay_s": settings.autoscale_downscale_delay_s,
        "look_back_period_s": settings.autoscale_look_back_s,
    }
    if settings.autoscale_metrics_interval_s != RAY_DEFAULT_METRICS_INTERVAL_S:
        config["metrics_interval_s"] = settings.autoscale_metrics_interval_s
    return config


def request_path_runtime_env(settings: Settings) -> dict[str, Any]:
    """The runtime env of the request-path actors: MLflow calls fail within the registry
    timeout instead of MLflow's default retries (minutes while MLflow is down). Never secrets:
    Ray shows a runtime env to anyone who can reach its dashboard."""
    return {"env_vars": settings.mlflow_client_env()}


def ingress_actor_options(settings: Settings) -> dict[str, Any]:
    """The ingress actor: no CPU reserved (it only waits on I/O), the request-path env."""
    return {"num_cpus": 0, "runtime_env": request_path_runtime_env(settings)}


def replica_actor_options(settings: Settings) -> dict[str, Any]:
    """Resources Ray reserves for each replica actor, and the request-path env."""
    options: dict[str, Any] = {
        "num_cpus": settings.cpus_per_replica,
        "num_gpus": settings.gpus_per_replica,
        "runtime_env": request_path_runtime_env(settings),
    }
    if settings.memory_per_replica_mb is not None:
        options["memory"] = settings.memory_per_replica_mb * MIB
    return options


def replica_bundles(settings: Settings) -> list[dict[str, float]] | None:
    """The placement-group bundles of a multi-GPU replica (None for 0..1 GPU): one bundle with
    everything the replica actor reserves, so it fits the bundle Serve pins it to."""
    if settings.gpus_per_replica <= 1:
        return None
    actor = replica_actor_options(settings)
    bundle = {
        "CPU": float(actor["num_cpus"]),
        "GPU": float(actor["num_gpus"]),
        "memory": float(actor.get("memory", 0)),
    }
    return [{name: amount for name, amount in bundle.items() if amount > 0}]


def ingress_deployment_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of `Ingress.options(...)` (also the config file's fields):
    `ingress_replicas` of them, whose tenant limits hold across them (`registry.render_limits`
    keeps them in the farm database). The ingress is async and light. Each replica admits more
    requests at once than one tenant may have in flight (`ingress_max_ongoing_requests`), so
    that a tenant over its limit reaches it and gets 429 rather than waiting at the proxy, and
    at least as many as the replicas can hold, so that Serve's default of 5 does not cap every
    replica's batch."""
    replicas = settings.max_replicas if settings.autoscale else settings.num_replicas
    return {
        "num_replicas": settings.ingress_replicas,
        "ray_actor_options": ingress_actor_options(settings),
        "max_ongoing_requests": max(
            settings.ingress_max_ongoing_requests, settings.max_ongoing_requests * replicas
        ),
    }


def replica_deployment_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of `DiffusionReplica.options(...)` (also the config file's fields)."""
    options: dict[str, Any] = {}
    if settings.autoscale:
        options["autoscaling_config"] = autoscaling_config(settings)
    else:
        options["num_replicas"] = settings.num_replicas
    options["max_ongoing_requests"] = settings.max_ongoing_requests
    if settings.max_queued_requests is not None:
        options["max_queued_requests"] = settings.max_queued_requests
    options["ray_actor_options"] = replica_actor_options(settings)
    bundles = replica_bundles(settings)
    if bundles is not None:
        options["placement_group_bundles"] = bundles
        options["placement_group_strategy"] = MULTI_GPU_STRATEGY
    if settings.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = settings.max_replicas_per_node
    return options
