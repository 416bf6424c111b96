"""Adapter references → concrete registered versions, in the ingress, with a short TTL cache.

A request names `acme`, `acme@staging` or `acme:3`; the tenant comes from its API key. The
resolver asks the MLflow registry (tenant-scoped: another tenant's brand is "not found") and
returns an `AdapterSpec`: version, sha256 and weights location.

- A version is immutable (its sha256 and weights never change, and versions are never
  deleted), so what the registry said about `acme:3` is kept for the life of the process
  (size-bounded): a render by explicit version needs MLflow only the first time.
- Alias lookups are reused for `ttl_s` seconds, so a promotion or rollback reaches serving within
  the TTL without a redeploy. "Not found" is never cached, so a new brand is usable at once.
  `invalidate(tenant, brand)` drops a brand's alias answers at once (`serve.alias_events`: the
  farm's alias API and MLflow's alias webhook call it), so the TTL only matters without them.
- While MLflow cannot be reached, an alias's last answer keeps serving for up to `stale_s`
  seconds after it was fetched, so brands already in use keep rendering through a registry
  outage; a reference never resolved before gets the registry's error (503).
- A `production` lookup also reads the brand's canary (`registry.canary`), cached with it: a
  render then uses the champion or the challenger by a stable hash of its render id.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from cachetools import LRUCache

from registry.adapter_refs import PRODUCTION, AdapterRef
from registry.adapters import AdapterRegistry, RegistryError
from registry.canary import Canary
from serve.adapter_cache import AdapterLoadError
from serve.protocol import AdapterSpec

log = logging.getLogger(__name__)

_MAX_ENTRIES = 10_000


class AdapterResolver:
    def __init__(
        self,
        registry: AdapterRegistry,
        ttl_s: float,
        stale_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.ttl_s = ttl_s
        self.stale_s = stale_s
        self.clock = clock
        # (tenant, brand, version) -> (sha256, weights uri, dataset sha256): immutable facts.
        self._versions: LRUCache[tuple[str, str, int], tuple[str, str, str]] = LRUCache(
            _MAX_ENTRIES
        )
        # (tenant, brand, alias ref) -> (fetched at, version, the canary of a production alias).
        self._aliases: LRUCache[tuple[str, str, str], tuple[float, int, Canary | None]] = LRUCache(
            _MAX_ENTRIES
        )
        # Alias answers invalidated since they were fetched: never served fresh again, but still
        # the last answer there is while MLflow cannot be reached (within `stale_s`).
        self._invalidated: set[tuple[str, str, str]] = set()
        # Bumped by every invalidation: a lookup that raced one does not store its answer.
        self._generation = 0
        self._lock = threading.Lock()

    def invalidate(self, tenant: str, brand: str) -> None:
        """Expire the alias answers (canary included) of `tenant`'s `brand`: the next request
        asks MLflow. An expired answer is kept only as the outage fallback (`stale_s`), as one
        past its TTL is: a change that reaches the farm just before MLflow goes down must not
        stop a brand in use from rendering."""
        with self._lock:
            self._generation += 1
            self._invalidated.update(k for k in self._aliases if k[0] == tenant and k[1] == brand)

    def invalidate_all(self) -> None:
        """Expire every alias answer (events were missed: a poller fell too far behind)."""
        with self._lock:
            self._generation += 1
            self._invalidated.update(self._aliases.keys())

    def resolve(
        self, tenant: str, ref: AdapterRef, scale: float, render_id: str | None = None
    ) -> AdapterSpec:
        """The version `ref` names for `tenant` now (`AdapterNotFound`, `RegistryError`). While
        the brand runs a canary, a `production` reference of render `render_id` gets the
        champion or the challenger (`Canary.assign`); without a render id, the champion."""
        version, canary, role = ref.version, None, None
        if version is None:
            version, canary = self._alias_version(tenant, ref)
        if canary is not None and render_id is not None:
            version, role = canary.assign(render_id, ref.brand, champion=version)
        key = (tenant, ref.brand, version)
        with self._lock:
            known = self._versions.get(key)
        if known is None:
            known = self._lookup(tenant, AdapterRef(ref.brand, version=version))[1]
        sha256, uri, dataset_sha256 = known
        return AdapterSpec(
            tenant=tenant,
            brand=ref.brand,
            version=version,
            scale=scale,
            sha256=sha256,
            weights_uri=uri,
            ref=str(ref),
            dataset_sha256=dataset_sha256,
            canary=role,
        )

    def _alias_version(self, tenant: str, ref: AdapterRef) -> tuple[int, Canary | None]:
        key = (tenant, ref.brand, str(ref))
        now = self.clock()
        with self._lock:
            hit = self._aliases.get(key)
            generation = self._generation
            fresh = hit is not None and key not in self._invalidated and now - hit[0] < self.ttl_s
        if fresh:
            return hit[1], hit[2]
        try:
            version, _ = self._lookup(tenant, ref)
            canary = self.registry.canary(tenant, ref.brand) if ref.alias == PRODUCTION else None
        except RegistryError:
            if hit is None or now - hit[0] >= self.stale_s:
                raise
            # MLflow is unreachable: the last answer is the best one there is, for a while.
            log.warning(
                "registry unavailable; serving %s/%s as version %d (looked up %.0fs ago)",
                tenant,
                ref,
                hit[1],
                now - hit[0],
            )
            return hit[1], hit[2]
        with self._lock:
            if generation == self._generation:  # else an alias moved during the lookup
                self._aliases[key] = (now, version, canary)
                self._invalidated.discard(key)
            # Keys the LRU dropped need no mark (bounded like the cache it marks).
            self._invalidated.intersection_update(self._aliases.keys())
        return version, canary

    def _lookup(self, tenant: str, ref: AdapterRef) -> tuple[int, tuple[str, str, str]]:
        """Ask the registry; remember the version's immutable facts."""
        found = self.registry.resolve(tenant, ref)
        if not found.sha256:
            raise AdapterLoadError(
                500,
                "adapter_corrupt",
                f"adapter {ref.brand!r} version {found.version} has no sha256 in the registry, "
                "so it cannot be verified; register it again",
            )
        key = (tenant, ref.brand, found.version)
        with self._lock:
            known = self._versions.get(key)
        if known is None:
            dataset = found.tags.get("dataset_sha256", "")
            known = (found.sha256, self.registry.weights_uri(found), dataset)
            with self._lock:
                self._versions[key] = known
        return found.version, known
