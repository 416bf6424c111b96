"""Evaluation and the promotion gate on the built-in model, with real training and real MLflow.

Three LoRAs of the shipped shapes model (the session's `brand_lora`): acme for 400 steps (a
well-trained brand), globex for 100 steps (another brand's data, evaluated as acme) and acme for
10 steps (too few). Each is evaluated like a job does (`finetune.evaluation.evaluate`) on four
acme images the LoRAs never saw, against the base model and, after the first, against the good
version as production; the versions are registered in an MLflow registry (SQLite, in-process)
and promoted through `registry.promotion`, the path the alias route and `auto_promote` share.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from finetune import world
from registry.adapters import AdapterRegistry, AdapterVersion
from registry.promotion import (
    FORCED_AT_TAG,
    GATE_TAG,
    RUN_NOTE_TAG,
    EvalFigures,
    EvaluationFailed,
    PromotionPolicy,
    after_registration,
    check_gate,
    promote,
    read_policy,
    write_policy,
)

pytestmark = pytest.mark.slow  # trains LoRAs (minutes on 2 cores)

SHIPPED = Path(__file__).resolve().parents[2] / "registry" / "builtin" / "brandfarm-shapes"
BRAND = "acme"
DEFAULT = PromotionPolicy()  # the farm's defaults: min_improvement 0.10, max drop 0.10


@dataclass(frozen=True)
class Evaluated:
    adapter: Path
    figures: EvalFigures
    grid_size: tuple[int, int]


@pytest.fixture(scope="module")
def evaluations(brand_lora) -> dict[str, Evaluated]:
    from diffusers import StableDiffusionPipeline

    from finetune.base_model import load_defaults
    from finetune.evaluation import evaluate

    good, wrong, few = brand_lora(BRAND, 400), brand_lora("globex", 100), brand_lora(BRAND, 10)
    # Held out: acme images of another seed than the LoRAs' dataset (seed 0).
    heldout = list(world.generate_brand(BRAND, 4, seed=123))
    prompts = [caption for _, caption in heldout]
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    defaults = load_defaults(SHIPPED)

    def run(adapter: Path, production: Path | None) -> Evaluated:
        result = evaluate(
            pipe,
            adapter,
            production,
            prompts,
            heldout,
            steps=defaults["default_steps"],
            size=defaults["default_size"],
            guidance_scale=defaults["default_guidance_scale"],
            loss_draws=8,
            brand=world.get_brand(BRAND),
            production_version=1 if production else None,
        )
        return Evaluated(adapter, result.figures, result.grid.size)

    out = {
        "good": run(good, None),
        "wrong": run(wrong, good),
        "few": run(few, good),
    }
    for name, e in out.items():
        print(f"{name}: reference {e.figures.reference}: {e.figures.scores}")
    return out


def test_evaluation_measures_base_production_and_candidate(evaluations) -> None:
    good = evaluations["good"].figures
    assert good.reference == "base" and set(good.scores) == {"base", "candidate"}
    base, cand = good.scores["base"], good.scores["candidate"]
    assert set(cand) == {"heldout_denoise_loss", "brand_score", "prompt_adherence"}
    assert cand["brand_score"] >= base["brand_score"] + 0.4
    assert cand["heldout_denoise_loss"] < base["heldout_denoise_loss"]
    wrong = evaluations["wrong"].figures
    assert wrong.reference == "production" and wrong.production_version == 1
    assert set(wrong.scores) == {"base", "production", "candidate"}
    # The production column is the good LoRA rendered again: the same figures.
    assert wrong.scores["production"] == pytest.approx(cand, abs=1e-4)
    assert evaluations["wrong"].grid_size == (3 * 128, 14 + 4 * 128)  # 3 variants x 4 prompts
    # Figures survive the trip through version tags.
    back = EvalFigures.from_tags(wrong.to_tags()).scores
    for variant, scores in wrong.scores.items():
        assert back[variant] == pytest.approx(scores, rel=1e-5)


def test_gate_passes_the_good_brand_and_fails_wrong_data_and_few_steps(evaluations) -> None:
    good = check_gate(evaluations["good"].figures, DEFAULT)
    assert good.passed and good.metric == "brand_score" and good.improvement >= 0.4
    for name in ("wrong", "few"):
        decision = check_gate(evaluations[name].figures, DEFAULT)
        print(name, decision.to_dict())
        assert not decision.passed, (name, decision)
        assert decision.improvement < DEFAULT.min_improvement
    # A version with no evaluation (registered by hand) passes and says so.
    assert check_gate(None, DEFAULT).evaluated is False


@pytest.fixture
def sqlite_mlflow(tmp_path) -> Iterator[tuple[str, Path]]:
    """A real MLflow store in a SQLite file. Its model registry looks logged models up through
    the global tracking URI (not the client's), so that is pointed here meanwhile."""
    import mlflow

    root = tmp_path / "mlflow"
    root.mkdir()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield uri, root
    finally:
        mlflow.set_tracking_uri(before)


def test_promotion_through_the_registry_auto_promote_409_and_force(
    evaluations, sqlite_mlflow
) -> None:
    uri, root = sqlite_mlflow
    client = MlflowClient(uri)
    experiment = client.create_experiment("gate", artifact_location=(root / "art").as_uri())
    registry = AdapterRegistry(uri)
    tenant = "gate-co"

    def register(name: str) -> AdapterVersion:
        e = evaluations[name]
        run = client.create_run(experiment).info.run_id
        tags = {
            "base_model": "brandfarm-shapes",
            "base_model_revision": "r",
            "dataset_sha256": "d" * 64,
            "job_id": f"job-{name}",
            "trigger_word": BRAND,
            "rank": 4,
            "alpha": 4,
            "steps": 1,
            **e.figures.to_tags(),
        }
        return registry.register(tenant, BRAND, e.adapter, run_id=run, tags=tags)

    # auto_promote: the good version becomes production by itself at the end of its "job".
    v1 = register("good")
    write_policy(registry, tenant, BRAND, PromotionPolicy(auto_promote=True))
    assert read_policy(registry, tenant, BRAND, DEFAULT).auto_promote is True
    decision, promoted = after_registration(registry, v1, DEFAULT)
    assert decision.passed and promoted
    assert registry.get(tenant, BRAND, 1).aliases == ("production", "staging")
    assert registry.get(tenant, BRAND, 1).tags[GATE_TAG] == "pass"

    # Another brand's data, then too few steps: not promoted, and refused when asked.
    for name, number in (("wrong", 2), ("few", 3)):
        v = register(name)
        assert v.version == number
        decision, promoted = after_registration(registry, v, DEFAULT)
        assert not decision.passed and not promoted
        assert "production" in registry.get(tenant, BRAND, 1).aliases
        with pytest.raises(EvaluationFailed) as refused:
            promote(registry, tenant, BRAND, "production", number, default=DEFAULT)
        assert refused.value.decision.improvement < DEFAULT.min_improvement
        assert "min_improvement" in str(refused.value)

    # Forced: the alias moves, the version and its run record it.
    forced = promote(registry, tenant, BRAND, "production", 2, default=DEFAULT, force=True)
    assert "production" in forced.aliases and forced.tags[FORCED_AT_TAG]
    note = client.get_run(forced.run_id).data.tags[RUN_NOTE_TAG]
    assert "by force" in note and "min_improvement" in note
    # Any other alias needs no gate; a passing version needs no force.
    assert "staging" in promote(registry, tenant, BRAND, "staging", 3, default=DEFAULT).aliases
    assert (
        "production" in promote(registry, tenant, BRAND, "production", 1, default=DEFAULT).aliases
    )

    # The alias route's service answers 409 evaluation_failed with the figures.
    from serve.adapters import AdapterService, AliasRequest
    from serve.errors import APIError

    service = AdapterService(registry, default_policy=DEFAULT)
    with pytest.raises(APIError) as answer:
        asyncio.run(service.set_alias(tenant, BRAND, "production", AliasRequest(version=3)))
    assert answer.value.status == 409 and answer.value.code == "evaluation_failed"
    assert answer.value.details["gate"]["improvement"] < DEFAULT.min_improvement
    with pytest.raises(APIError) as foreign:
        asyncio.run(service.get_policy("other-co", BRAND))
    assert foreign.value.status == 404
