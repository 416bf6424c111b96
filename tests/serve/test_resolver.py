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
from registry.canary import Canary
from serve.resolver import AdapterResolver


class Registry:
    def __init__(self) -> None:
        self.aliases = {("acme", "production"): 1}
        self.canaries: dict[str, Canary] = {}
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

    def canary(self, tenant: str, brand: str) -> Canary | None:
        self.calls += 1
        if not self.up:
            raise RegistryError("MLflow unreachable")
        return self.canaries.get(brand)

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


def test_an_invalidated_alias_asks_mlflow_but_still_serves_through_an_outage(setup):
    """An invalidation (an alias event) makes the next request ask MLflow at once, inside the
    TTL; if MLflow is down by then, the invalidated answer is still the outage fallback (an
    event that arrives just before MLflow dies must not stop a brand in use)."""
    registry, clock, resolver = setup
    assert resolver.resolve("t", AdapterRef.parse("acme"), 1.0).version == 1
    registry.aliases[("acme", "production")] = 3
    resolver.invalidate("t", "acme")
    assert resolver.resolve("t", AdapterRef.parse("acme"), 1.0).version == 3  # inside the TTL
    calls = registry.calls
    assert resolver.resolve("t", AdapterRef.parse("acme"), 1.0).version == 3
    assert registry.calls == calls  # fresh again: cached
    resolver.invalidate("t", "acme")
    resolver.invalidate_all()
    registry.up = False
    clock.now = 30.0
    assert resolver.resolve("t", AdapterRef.parse("acme"), 1.0).version == 3
    clock.now = 61.0
    with pytest.raises(RegistryError):
        resolver.resolve("t", AdapterRef.parse("acme"), 1.0)


def test_not_found_is_never_cached(setup):
    registry, clock, resolver = setup
    with pytest.raises(AdapterNotFound):
        resolver.resolve("t", AdapterRef.parse("acme@canary"), 1.0)
    registry.aliases[("acme", "canary")] = 2
    assert resolver.resolve("t", AdapterRef.parse("acme@canary"), 1.0).version == 2


# --- canary -----------------------------------------------------------------------------------


def test_a_canary_splits_production_by_render_id_and_never_pinned_refs(setup):
    registry, clock, resolver = setup
    registry.canaries["acme"] = Canary(challenger=2, share=0.5)
    ids = [f"render-{i}" for i in range(400)]
    specs = {i: resolver.resolve("t", AdapterRef.parse("acme"), 1.0, render_id=i) for i in ids}
    chosen = {s.version for s in specs.values()}
    assert chosen == {1, 2}
    for i, spec in specs.items():
        assert spec.canary == ("challenger" if spec.version == 2 else "champion")
        assert (spec.sha256, spec.ref) == (f"sha{spec.version}", "acme@production")
        # Stable: the same render id gets the same version, again and through another alias
        # spelling of production.
        again = resolver.resolve("t", AdapterRef("acme", alias="production"), 1.0, render_id=i)
        assert again.version == spec.version
    challengers = sum(s.version == 2 for s in specs.values())
    assert 150 <= challengers <= 250  # 0.5 of 400: mean 200, sd 10
    # Pinned references and other aliases are not split, render id or not.
    registry.aliases[("acme", "staging")] = 3
    for i in ids[:50]:
        assert resolver.resolve("t", AdapterRef.parse("acme:1"), 1.0, render_id=i).version == 1
        pinned = resolver.resolve("t", AdapterRef.parse("acme@staging"), 1.0, render_id=i)
        assert (pinned.version, pinned.canary) == (3, None)
    # Without a render id (nothing to hash), the champion.
    plain = resolver.resolve("t", AdapterRef.parse("acme"), 1.0)
    assert (plain.version, plain.canary) == (1, None)


@pytest.mark.parametrize(("share", "expected"), [(0.0, {1}), (1.0, {2})])
def test_share_zero_and_one_send_everything_to_one_side(setup, share, expected):
    registry, clock, resolver = setup
    registry.canaries["acme"] = Canary(challenger=2, share=share)
    ids = [f"r{i}" for i in range(300)]
    used = {resolver.resolve("t", AdapterRef.parse("acme"), 1.0, render_id=i).version for i in ids}
    assert used == expected


def test_a_canary_starts_and_ends_with_the_alias_ttl(setup):
    registry, clock, resolver = setup
    ids = [f"r{i}" for i in range(100)]

    def versions() -> set[int]:
        return {
            resolver.resolve("t", AdapterRef.parse("acme"), 1.0, render_id=i).version for i in ids
        }

    assert versions() == {1}
    registry.canaries["acme"] = Canary(challenger=3, share=0.5)
    assert versions() == {1}  # cached with the production alias
    clock.now = 2.5
    assert versions() == {1, 3}
    registry.canaries.clear()
    registry.up = False  # MLflow down: the last answer (the canary) serves for stale_s
    clock.now = 5.0
    assert versions() == {1, 3}
    registry.up = True
    assert versions() == {1}


def test_assignment_is_a_pure_function_of_render_id_and_brand() -> None:
    canary = Canary(challenger=7, share=0.3)
    ids = [f"render-{i:04d}" for i in range(2000)]
    first = [canary.assign(i, "acme", champion=4) for i in ids]
    assert first == [Canary(7, 0.3).assign(i, "acme", champion=4) for i in ids]
    share = sum(v == 7 for v, _ in first) / len(ids)
    assert abs(share - 0.3) < 4 * (0.3 * 0.7 / len(ids)) ** 0.5
    # Another brand draws independently: not the same set of render ids.
    other = [canary.assign(i, "globex", champion=4)[0] for i in ids]
    assert other != [v for v, _ in first]
    # Growing the share only moves renders from champion to challenger.
    wider = [Canary(7, 0.5).assign(i, "acme", champion=4)[0] for i in ids]
    assert all(w == 7 for (v, _), w in zip(first, wider, strict=True) if v == 7)


def test_a_canary_share_outside_0_to_1_is_refused_and_a_bad_tag_reads_as_0() -> None:
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="share"):
            Canary(2, bad)
    for tag in ("abc", "2", "nan", "-1"):
        read = Canary.from_model({"challenger": "2", "production": "1"}, {"canary.share": tag})
        assert (read.challenger, read.share, read.champion) == (2, 0.0, 1)
    assert Canary.from_model({"production": "1"}, {"canary.share": "0.5"}) is None
