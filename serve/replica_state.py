"""What each diffusion replica holds, published where `brandfarm status` can read it.

A replica writes one JSON record (its actor name, node, active adapters and host-RAM tier) into
the Ray cluster's internal key-value store whenever its adapter set changes. Readers join the
records with Ray's state API (live actors only), so a dead replica's leftover record is ignored.
"""

from __future__ import annotations

import json
import time
from typing import Any

NAMESPACE = "brandfarm"
PREFIX = "replica:"


def publish(actor_name: str, record: dict[str, Any]) -> None:
    """Store `record` for the replica actor `actor_name` (call inside a Ray worker)."""
    from ray.experimental.internal_kv import _internal_kv_put

    body = {**record, "actor_name": actor_name, "updated_at": time.time()}
    _internal_kv_put(
        f"{PREFIX}{actor_name}",
        json.dumps(body, sort_keys=True),
        overwrite=True,
        namespace=NAMESPACE,
    )


def forget(actor_name: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(f"{PREFIX}{actor_name}", namespace=NAMESPACE)


def read_all() -> dict[str, dict[str, Any]]:
    """actor name -> its last record, for every replica that published one (Ray initialised)."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    out: dict[str, dict[str, Any]] = {}
    for key in _internal_kv_list(PREFIX, namespace=NAMESPACE):
        raw = _internal_kv_get(key, namespace=NAMESPACE)
        if raw:
            record = json.loads(raw)
            out[record["actor_name"]] = record
    return out
