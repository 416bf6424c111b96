"""Adapter references → concrete registered versions, in the ingress, with a short TTL cache.

A request names `acme`, `acme@staging` or `acme:3`; the tenant comes from its API key. The
resolver asks the MLflow registry (tenant-scoped: another tenant's brand is "not found") and
returns an `AdapterSpec`: version, sha256 and weights location. Alias lookups are reused for
`ttl_s` seconds, so a promotion or rollback reaches serving within the TTL without a redeploy;
"not found" is never cached, so a new brand is usable at once. A version's weights location
never changes and is kept for the life of the process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from registry.adapter_refs import AdapterRef
from registry.adapters import AdapterRegistry
from serve.adapter_cache import AdapterLoadError
from serve.protocol import AdapterSpec

_MAX_ENTRIES = 10_000


class AdapterResolver:
    def __init__(
        self,
        registry: AdapterRegistry,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.ttl_s = ttl_s
        self.clock = clock
        self._versions: dict[tuple[str, str], tuple[float, int, str]] = {}
        self._uris: dict[tuple[str, str, int], str] = {}
        self._lock = threading.Lock()

    def resolve(self, tenant: str, ref: AdapterRef, scale: float) -> AdapterSpec:
        """The version `ref` names for `tenant` now (`AdapterNotFound`, `RegistryError`)."""
        key = (tenant, str(ref))
        now = self.clock()
        with self._lock:
            hit = self._versions.get(key)
        if hit is not None and hit[0] > now:
            _, version, sha256 = hit
        else:
            found = self.registry.resolve(tenant, ref)
            version, sha256 = found.version, found.sha256
            if not sha256:
                raise AdapterLoadError(
                    500,
                    "adapter_corrupt",
                    f"adapter {ref.brand!r} version {version} has no sha256 in the registry, so "
                    "it cannot be verified; register it again",
                )
            uri_key = (tenant, ref.brand, version)
            if uri_key not in self._uris:
                uri = self.registry.weights_uri(found)
                with self._lock:
                    self._uris[uri_key] = uri
            with self._lock:
                if len(self._versions) >= _MAX_ENTRIES:
                    self._versions.clear()
                self._versions[key] = (now + self.ttl_s, version, sha256)
        return AdapterSpec(
            tenant=tenant,
            brand=ref.brand,
            version=version,
            scale=scale,
            sha256=sha256,
            weights_uri=self._uris[(tenant, ref.brand, version)],
            ref=str(ref),
        )
