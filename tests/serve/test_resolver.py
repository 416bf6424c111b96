"""The resolver's cache policy: versions are immutable facts, aliases live `ttl_s`, and an
alias's last answer serves for `stale_s` while the registry is unreachable.

The registry here is an in-memory table with the `AdapterRegistry` methods the resolver calls
(the real MLflow path is exercised by tests/e2e and tests/chaos); it can be switched off like a
killed MLflow server.
"""

from __future__ import annotations

import datetime as dt

import pytest

from registry.adapter_refs import AdapterRef
from registry.adapters import AdapterNotFound, AdapterVersion, RegistryError
from serve.resolver import AdapterResolver


class Registry:
    def __init__(self) -> None:
        self.aliases = {("acme", "production"): 1}
        self.up = True
        self.calls = 0

    def resolve(self, tenant: str, ref: AdapterRef) -> AdapterVersion:
        self.calls += 1
        if not self.up:
            raise RegistryError("MLflow unreachable")
        version = ref.version or self.aliases.get((ref.brand, ref.alias))
        if version is None or version > 3:
            raise AdapterNotFound(f"no {ref}")
        return AdapterVersion(
            tenant,
            ref.brand,
            version,
            (),
            {},
            {},
            "run",
            f"models:/m-{version}",
            f"sha{version}",
            dt.datetime.now(dt.UTC),
        )

    def weights_uri(self, found: AdapterVersion) -> str:
        return f"s3://artifacts/{found.version}/weights"


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup():
    registry, clock = Registry(), Clock()
    return registry, clock, AdapterResolver(registry, ttl_s=2.0, stale_s=60.0, clock=clock)


def test_a_version_is_looked_up_once(setup):
    registry, clock, resolver = setup
    first = resolver.resolve("t", AdapterRef("acme", version=2), 1.0)
    registry.up = False
    clock.now = 10_000.0
    again = resolver.resolve("t", AdapterRef("acme", version=2), 0.5)
    assert (again.version, again.sha256, again.weights_uri) == (2, "sha2", first.weights_uri)
    assert again.scale == 0.5 and registry.calls == 1


def test_an_alias_moves_after_the_ttl(setup):
    registry, clock, resolver = setup
    assert resolver.resolve("t", AdapterRef.parse("acme"), 1.0).version == 1
    registry.aliases[("acme", "production")] = 3
    clock.now = 1.0
    assert resolver.resolve("t", AdapterRef.parse("acme"), 1.0).version == 1
    clock.now = 2.5
    spec = resolver.resolve("t", AdapterRef.parse("acme"), 1.0)
    assert (spec.version, spec.sha256, spec.ref) == (3, "sha3", "acme@production")


def test_registry_down_serves_the_last_alias_answer_for_stale_s_only(setup):
    registry, clock, resolver = setup
    resolver.resolve("t", AdapterRef.parse("acme"), 1.0)
    registry.up = False
    clock.now = 30.0
    assert resolver.resolve("t", AdapterRef.parse("acme"), 1.0).version == 1
    clock.now = 61.0
    with pytest.raises(RegistryError):
        resolver.resolve("t", AdapterRef.parse("acme"), 1.0)
    # Never resolved before: nothing to fall back on.
    with pytest.raises(RegistryError):
        resolver.resolve("t", AdapterRef.parse("acme@staging"), 1.0)


def test_not_found_is_never_cached(setup):
    registry, clock, resolver = setup
    with pytest.raises(AdapterNotFound):
        resolver.resolve("t", AdapterRef.parse("acme@canary"), 1.0)
    registry.aliases[("acme", "canary")] = 2
    assert resolver.resolve("t", AdapterRef.parse("acme@canary"), 1.0).version == 2
