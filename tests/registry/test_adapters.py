"""The MLflow adapter registry against the farm's real MLflow server (artifacts proxied to S3)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow.diffusers
import pytest
from mlflow import MlflowClient

from registry.adapters import (
    LINEAGE_TAGS,
    WEIGHTS_NAME,
    AdapterCorrupt,
    AdapterNotFound,
    AdapterRef,
    AdapterRegistry,
    AdapterVersion,
    registered_model_name,
    sha256_file,
)
from registry.base_models import TINY_RANDOM, BaseModelInfo, ensure_base_model, load_pipeline

BRAND = "acme"


@dataclass(frozen=True)
class Adapters:
    base: BaseModelInfo
    first: Path  # a LoRA folder (weights + lora_training.json naming the base folder)
    second: Path  # the same LoRA with other weights


@dataclass(frozen=True)
class Registered:
    tenant: str  # owns BRAND with versions 1 (first) and 2 (second)
    other: str  # another tenant, with no adapters
    v1: AdapterVersion  # as `register` returned them
    v2: AdapterVersion
    run1: str
    hub_calls: list[str]  # base models the diffusers flavor tried to look up on the hub


def lineage(job_id: str, base: BaseModelInfo) -> dict[str, object]:
    return {
        "base_model": base.id,
        "base_model_revision": base.revision,
        "dataset_sha256": "d" * 64,
        "job_id": job_id,
        "trigger_word": "zqx",
        "rank": 4,
        "alpha": 4,
        "steps": 10,
    }


def not_found_message(call: Callable[[], object]) -> str:
    with pytest.raises(AdapterNotFound) as e:
        call()
    return str(e.value)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Adapters:
    """Two small real diffusers LoRA folders on the tiny base model, made without training."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("adapters")
    base = ensure_base_model(TINY_RANDOM, root / "models", 1024)
    pipe = load_pipeline(base, "cpu")
    torch.manual_seed(0)
    pipe.unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )

    def save(folder: Path) -> Path:
        StableDiffusionPipeline.save_lora_weights(
            folder,
            unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
            weight_name=WEIGHTS_NAME,
            safe_serialization=True,
        )
        (folder / "lora_training.json").write_text(json.dumps({"base_model": base.path}))
        return folder

    first = save(root / "first")
    with torch.no_grad():
        for p in pipe.unet.parameters():
            if p.requires_grad:
                p.add_(0.01)
    return Adapters(base, first, save(root / "second"))


@pytest.fixture(scope="module")
def registry(farm) -> AdapterRegistry:
    return AdapterRegistry(farm.settings.resolved_mlflow_uri)


@pytest.fixture(scope="module")
def client(farm) -> MlflowClient:
    return MlflowClient(farm.settings.resolved_mlflow_uri)


def new_run(client: MlflowClient, tenant: str, **metrics: float) -> str:
    name = f"adapter-tests-{tenant}"
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run_id = client.create_run(experiment_id).info.run_id
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    return run_id


@pytest.fixture(scope="module")
def acme(registry: AdapterRegistry, client: MlflowClient, adapters: Adapters) -> Registered:
    tenant, other = f"ta-{uuid.uuid4().hex[:8]}", f"tb-{uuid.uuid4().hex[:8]}"
    hub_calls: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            "mlflow.utils.huggingface_utils.get_latest_commit_for_repo",
            lambda repo: hub_calls.append(repo) or "0" * 40,
        )
        run1 = new_run(client, tenant, loss=0.25, clip_score=0.5)
        # Like the training job: the base folder comes from the adapter's lora_training.json.
        v1 = registry.register(
            tenant, BRAND, adapters.first, run_id=run1, tags=lineage("job-1", adapters.base)
        )
        v2 = registry.register(
            tenant,
            BRAND,
            adapters.second,
            run_id=new_run(client, tenant, loss=0.125),
            tags=lineage("job-2", adapters.base),
            base_model_path=adapters.base.path,
        )
    return Registered(tenant, other, v1, v2, run1, hub_calls)


def test_register_tags_the_version_with_its_lineage_and_stages_it(
    acme: Registered, adapters: Adapters
) -> None:
    v1 = acme.v1
    assert (v1.tenant, v1.brand, v1.version, v1.aliases) == (acme.tenant, BRAND, 1, ("staging",))
    sha = sha256_file(adapters.first / WEIGHTS_NAME)
    assert v1.sha256 == sha
    expected = {k: str(v) for k, v in lineage("job-1", adapters.base).items()}
    assert set(expected) == set(LINEAGE_TAGS)
    assert v1.tags == {**expected, "tenant": acme.tenant, "brand": BRAND, "sha256": sha}
    assert v1.metrics == {"loss": 0.25, "clip_score": 0.5}
    assert v1.run_id == acme.run1 and v1.source.startswith("models:/")
    assert v1.to_dict()["aliases"] == ["staging"]
    assert acme.hub_calls == []  # catalog ids never reach the hub


def test_second_register_is_version_2_and_takes_staging(
    registry: AdapterRegistry, acme: Registered, adapters: Adapters
) -> None:
    assert acme.v2.version == 2 and acme.v2.aliases == ("staging",)
    assert acme.v2.sha256 == sha256_file(adapters.second / WEIGHTS_NAME) != acme.v1.sha256
    assert registry.brands(acme.tenant) == [BRAND]
    newest, oldest = registry.versions(acme.tenant, BRAND)
    assert (newest.version, oldest.version) == (2, 1)
    assert "staging" in newest.aliases and "staging" not in oldest.aliases
    assert newest.metrics == {"loss": 0.125} and newest.tags["job_id"] == "job-2"


def test_a_version_is_a_loadable_diffusers_model(
    acme: Registered, adapters: Adapters, farm, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", farm.settings.resolved_mlflow_uri)
    name = registered_model_name(acme.tenant, BRAND)
    model = mlflow.diffusers.load_model(f"models:/{name}/1", dst_path=str(tmp_path))
    assert model.base_model == str(Path(adapters.base.path).resolve())
    assert model.base_model_revision is None  # nothing was asked of the hub
    assert sha256_file(Path(model.adapter_path) / WEIGHTS_NAME) == acme.v1.sha256
    pipe = model.load_pipeline(device="cpu")
    assert pipe.get_list_adapters() == {"unet": ["default_0"]}


def test_promotion_and_rollback_move_the_production_alias(
    registry: AdapterRegistry, acme: Registered
) -> None:
    production = AdapterRef.parse(BRAND)
    for version in (1, 2, 1):  # promote 1, promote 2, roll back to 1
        moved = registry.set_alias(acme.tenant, BRAND, "production", version)
        assert moved.version == version and "production" in moved.aliases
        assert registry.resolve(acme.tenant, production).version == version
    aliases = {v.version: v.aliases for v in registry.versions(acme.tenant, BRAND)}
    assert aliases == {1: ("production",), 2: ("staging",)}


def test_resolve_reads_aliases_and_versions(registry: AdapterRegistry, acme: Registered) -> None:
    registry.set_alias(acme.tenant, BRAND, "production", 1)
    resolve = lambda text: registry.resolve(acme.tenant, AdapterRef.parse(text))  # noqa: E731
    assert resolve("acme").version == 1
    assert resolve("acme@staging").version == 2
    assert resolve("acme:2").version == 2 and resolve("acme:2").sha256 == acme.v2.sha256
    assert "no alias 'canary'" in not_found_message(lambda: resolve("acme@canary"))
    assert "no version 9" in not_found_message(lambda: resolve("acme:9"))


def test_set_alias_checks_the_alias_and_the_version(
    registry: AdapterRegistry, acme: Registered
) -> None:
    registry.set_alias(acme.tenant, BRAND, "production", 1)
    for bad in ("Production", "latest", "v2", "", "9lives", "a" * 33):
        with pytest.raises(ValueError, match="alias"):
            registry.set_alias(acme.tenant, BRAND, bad, 2)
    assert "no version 9" in not_found_message(
        lambda: registry.set_alias(acme.tenant, BRAND, "production", 9)
    )
    assert registry.resolve(acme.tenant, AdapterRef.parse(BRAND)).version == 1


def test_another_tenant_cannot_see_or_touch_the_adapters(
    registry: AdapterRegistry, acme: Registered, tmp_path: Path
) -> None:
    registry.set_alias(acme.tenant, BRAND, "production", 1)
    b = acme.other
    # What B hears about A's brand is exactly what it hears about a brand nobody has.
    missing = not_found_message(lambda: registry.versions(b, "nosuch")).replace("nosuch", BRAND)
    forged = dataclasses.replace(acme.v1, tenant=b)  # A's version record, relabelled as B's
    calls = {
        "versions": lambda: registry.versions(b, BRAND),
        "get": lambda: registry.get(b, BRAND, 1),
        "resolve alias": lambda: registry.resolve(b, AdapterRef.parse(BRAND)),
        "resolve version": lambda: registry.resolve(b, AdapterRef.parse(f"{BRAND}:1")),
        "set_alias": lambda: registry.set_alias(b, BRAND, "production", 2),
        "download": lambda: registry.download(forged, tmp_path),
    }
    for what, call in calls.items():
        assert not_found_message(call) == missing, what
    assert registry.brands(b) == []
    assert not (tmp_path / WEIGHTS_NAME).exists()
    assert registry.resolve(acme.tenant, AdapterRef.parse(BRAND)).version == 1


def test_brands_match_the_tenant_prefix_exactly(
    registry: AdapterRegistry, client: MlflowClient, acme: Registered
) -> None:
    # Names a LIKE 'tenant.%' filter may let through (case-insensitive backends), or that are no
    # brand of ours; and a neighbouring tenant whose id starts with this one's.
    for name in (f"{acme.tenant.upper()}.shout", f"{acme.tenant}.Not_A_Brand"):
        client.create_registered_model(name)
    client.create_registered_model(f"{acme.tenant}-x.{BRAND}")
    assert registry.brands(acme.tenant) == [BRAND]
    assert registry.brands(f"{acme.tenant}-x") == [BRAND]


def test_download_checks_the_weights_against_the_sha256_tag(
    registry: AdapterRegistry,
    client: MlflowClient,
    acme: Registered,
    adapters: Adapters,
    tmp_path: Path,
) -> None:
    got = registry.download(acme.v1, tmp_path / "ok")
    assert got == tmp_path / "ok" / WEIGHTS_NAME
    assert got.read_bytes() == (adapters.first / WEIGHTS_NAME).read_bytes()

    name = registered_model_name(acme.tenant, BRAND)
    client.set_model_version_tag(name, "1", "sha256", "0" * 64)
    try:
        tampered = registry.get(acme.tenant, BRAND, 1)
        with pytest.raises(AdapterCorrupt, match="damaged"):
            registry.download(tampered, tmp_path / "bad")
        assert list((tmp_path / "bad").iterdir()) == []  # nothing half-checked is left behind
        with pytest.raises(AdapterCorrupt, match="refusing"):
            registry.download(acme.v1, tmp_path / "stale")  # resolved before the tag changed
    finally:
        client.set_model_version_tag(name, "1", "sha256", acme.v1.sha256)


def test_a_checksum_mismatch_at_register_registers_nothing(
    registry: AdapterRegistry,
    client: MlflowClient,
    acme: Registered,
    adapters: Adapters,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def half_upload(self: AdapterRegistry, artifacts_uri: str, dst_dir: Path) -> Path:
        (dst_dir / WEIGHTS_NAME).write_bytes(b"the first half of an upload")
        return dst_dir / WEIGHTS_NAME

    monkeypatch.setattr(AdapterRegistry, "_fetch_weights", half_upload)
    for brand in ("acme-new", BRAND):  # a brand's first version, and a third one of BRAND
        with pytest.raises(AdapterCorrupt, match="nothing was registered"):
            registry.register(
                acme.tenant,
                brand,
                adapters.second,
                run_id=new_run(client, acme.tenant),
                tags=lineage("job-bad", adapters.base),
            )
    assert registry.brands(acme.tenant) == [BRAND]
    assert list(client.search_model_versions(f"name = '{acme.tenant}.acme-new'")) == []
    assert [v.version for v in registry.versions(acme.tenant, BRAND)] == [2, 1]
    assert registry.resolve(acme.tenant, AdapterRef.parse("acme@staging")).version == 2


def test_register_refuses_incomplete_input_before_logging_anything(
    registry: AdapterRegistry,
    client: MlflowClient,
    acme: Registered,
    adapters: Adapters,
    tmp_path: Path,
) -> None:
    run_id = new_run(client, acme.tenant)
    tags = lineage("job-x", adapters.base)

    def register(**changes: object) -> None:
        kw = {"tenant": acme.tenant, "brand": BRAND, "adapter_dir": adapters.first}
        kw.update(run_id=run_id, tags=tags)
        kw.update(changes)
        registry.register(kw.pop("tenant"), kw.pop("brand"), kw.pop("adapter_dir"), **kw)

    without = {k: v for k, v in tags.items() if k != "dataset_sha256"}
    with pytest.raises(ValueError, match="dataset_sha256"):
        register(tags=without)
    with pytest.raises(ValueError, match="set by the registry"):
        register(tags={**tags, "sha256": "0" * 64})
    with pytest.raises(ValueError, match=WEIGHTS_NAME):
        register(adapter_dir=tmp_path)
    with pytest.raises(ValueError, match="brand"):
        register(brand="Acme")
    with pytest.raises(ValueError, match="tenant"):
        register(tenant="a_b")
    with pytest.raises(ValueError, match="base_model_path"):
        register(base_model_path=tmp_path)
    with pytest.raises(ValueError, match="not a run"):
        register(run_id="0" * 32)
    client.set_terminated(run_id, "FAILED")
    with pytest.raises(ValueError, match="FAILED"):
        register()
    assert [v.version for v in registry.versions(acme.tenant, BRAND)] == [2, 1]


@pytest.mark.parametrize(
    ("text", "brand", "alias", "version"),
    [
        ("acme", "acme", "production", None),
        ("acme@staging", "acme", "staging", None),
        ("acme:3", "acme", None, 3),
        ("acme-2@canary_1", "acme-2", "canary_1", None),
        ("7up:12", "7up", None, 12),
    ],
)
def test_adapter_ref_parses(text: str, brand: str, alias: str | None, version: int | None) -> None:
    ref = AdapterRef.parse(text)
    assert (ref.brand, ref.alias, ref.version) == (brand, alias, version)
    assert AdapterRef.parse(str(ref)) == ref


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "brand"),
        ("a", "brand"),
        ("Acme", "brand"),
        ("-acme", "brand"),
        ("acme.x", "brand"),
        ("ac me", "brand"),
        ("@staging", "brand"),
        ("acme@", "alias"),
        ("acme@Prod", "alias"),
        ("acme@latest", "reserved"),
        ("acme@v1", "reserved"),
        ("acme:", "integer from 1 to 2147483647"),
        ("acme:0", "integer from 1 to 2147483647"),
        ("acme:-1", "integer from 1 to 2147483647"),
        ("acme:x", "integer from 1 to 2147483647"),
        ("acme:1.5", "integer from 1 to 2147483647"),
        ("acme:2147483648", "integer from 1 to 2147483647"),
        ("acme:99999999999999999999", "integer from 1 to 2147483647"),
        ("acme@a:1", "malformed"),
        ("acme:1@a", "malformed"),
        ("acme@@a", "malformed"),
        ("acme::1", "malformed"),
        ("acme:²", "integer from 1 to 2147483647"),
    ],
)
def test_adapter_ref_rejects_malformed_text(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        AdapterRef.parse(text)


def test_registered_model_name_checks_both_parts() -> None:
    assert registered_model_name("tenant-1", "acme") == "tenant-1.acme"
    for bad in ("A", "a", "a_b", "a.b", "a%", "-ab", "a" * 64, "ab'"):
        with pytest.raises(ValueError, match="tenant"):
            registered_model_name(bad, "acme")
        with pytest.raises(ValueError, match="brand"):
            registered_model_name("acme", bad)


def test_importing_the_registry_does_not_import_torch() -> None:
    code = "import sys, registry.adapters; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False"
