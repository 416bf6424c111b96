"""What runs where on the farm's Ray cluster: its nodes, the diffusion replicas on each node, and
the adapters each replica holds (`brandfarm status`).

Nodes and replicas come from Ray itself (the state API), never from our own bookkeeping. Adapters
are what each replica publishes (`serve.replica_state`), joined with the live replica actors, so a
dead replica's leftover record never shows.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from serve.serve_config import APP_NAME, REPLICA

LOCAL_WORKER_PREFIX = "brandfarm_local_worker_"


def local_worker_resource(index: int) -> str:
    """The custom resource (amount 1) that names local worker node `index` in Ray."""
    return f"{LOCAL_WORKER_PREFIX}{index}"


def node_name(resources: dict[str, float], is_head: bool) -> str:
    """`head`, `ray-worker-<i>` for a local worker node of the embedded stack, else ``."""
    if is_head:
        return "head"
    for resource in resources:
        if resource.startswith(LOCAL_WORKER_PREFIX):
            return f"ray-worker-{resource.removeprefix(LOCAL_WORKER_PREFIX)}"
    return ""


def alive_nodes(dashboard_url: str, timeout: float = 2.0) -> list[dict]:
    """The ALIVE nodes, as the dashboard's state API lists them (plain HTTP: no Ray client);
    [] when the dashboard does not answer."""
    query = urllib.parse.urlencode(
        {
            "detail": "1",
            "limit": "10000",
            "filter_keys": "state",
            "filter_predicates": "=",
            "filter_values": "ALIVE",
        }
    )
    try:
        with urllib.request.urlopen(f"{dashboard_url}/api/v0/nodes?{query}", timeout=timeout) as r:
            return json.loads(r.read())["data"]["result"]["result"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        return []


@dataclass(frozen=True)
class NodeView:
    node_id: str
    name: str  # head, ray-worker-<i> (local worker nodes), or empty
    ip: str
    cpus: float
    gpus: float


@dataclass(frozen=True)
class ReplicaView:
    actor_name: str
    node_id: str | None  # None while the actor waits for resources
    state: str  # Ray's actor state: ALIVE, PENDING_CREATION, RESTARTING
    adapters: tuple[str, ...] = ()  # active in the pipeline, as the replica published
    host_cached: tuple[str, ...] = ()  # parsed weights in host RAM


@dataclass(frozen=True)
class Topology:
    nodes: list[NodeView]
    replicas: list[ReplicaView] = field(default_factory=list)

    def replicas_on(self, node_id: str) -> list[ReplicaView]:
        return [r for r in self.replicas if r.node_id == node_id and r.state == "ALIVE"]


def replica_class_name(app: str = APP_NAME, deployment: str = REPLICA) -> str:
    """The Ray actor class of a Serve deployment's replicas."""
    return f"ServeReplica:{app}:{deployment}"


def read_topology(address: str | None = None, app: str = APP_NAME) -> Topology:
    """Alive nodes, the app's diffusion replicas that are not dead, and their adapters.
    Connects to the cluster at `address` unless this process already is connected."""
    import ray
    from ray.util.state import list_actors, list_nodes

    from serve import replica_state

    connect = not ray.is_initialized()
    if connect:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        # Filtered in Python: with server-side filters Ray's state API reports the rows it
        # filtered out as "missing output" and raises.
        nodes = [
            n
            for n in list_nodes(detail=True, limit=10_000, raise_on_missing_output=False)
            if n.state == "ALIVE"
        ]
        actors = [
            a
            for a in list_actors(
                filters=[("class_name", "=", replica_class_name(app))],
                detail=True,
                limit=10_000,
                raise_on_missing_output=False,
            )
            if a.state != "DEAD"
        ]
        records = replica_state.read_all()
    finally:
        if connect:
            ray.shutdown()
    return Topology(
        nodes=[
            NodeView(
                node_id=n.node_id,
                name=node_name(n.resources_total, n.is_head_node),
                ip=n.node_ip,
                cpus=n.resources_total.get("CPU", 0.0),
                gpus=n.resources_total.get("GPU", 0.0),
            )
            for n in sorted(nodes, key=lambda n: (not n.is_head_node, n.node_id))
        ],
        replicas=[
            ReplicaView(
                actor_name=a.name,
                node_id=a.node_id or None,
                state=a.state,
                adapters=tuple(records.get(a.name, {}).get("adapters", ())),
                host_cached=tuple(records.get(a.name, {}).get("host_cached", ())),
            )
            for a in sorted(actors, key=lambda a: a.name or "")
        ],
    )
