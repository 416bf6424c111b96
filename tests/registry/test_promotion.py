"""The promotion gate's decision and its storage format (no MLflow needed: pure functions)."""

from __future__ import annotations

import pytest

from registry.promotion import EvalFigures, PromotionPolicy, check_gate

POLICY = PromotionPolicy(min_improvement=0.05, max_adherence_drop=0.10)


def figures(reference: str = "base", **scores: dict[str, float]) -> EvalFigures:
    return EvalFigures(scores=scores, reference=reference, prompts=4, heldout_images=4)


def test_any_base_model_compares_the_relative_heldout_loss() -> None:
    better = figures(base={"heldout_denoise_loss": 0.20}, candidate={"heldout_denoise_loss": 0.15})
    decision = check_gate(better, POLICY)
    assert decision.passed and decision.metric == "heldout_denoise_loss"
    assert decision.improvement == pytest.approx(0.25)
    same = figures(base={"heldout_denoise_loss": 0.20}, candidate={"heldout_denoise_loss": 0.195})
    refused = check_gate(same, POLICY)
    assert not refused.passed and "min_improvement" in refused.summary()
    assert check_gate(same, PromotionPolicy(min_improvement=-0.1)).passed


def test_the_built_in_model_compares_brand_score_with_production_and_bounds_adherence() -> None:
    scores = {
        "base": {"brand_score": 0.1, "prompt_adherence": 0.9, "heldout_denoise_loss": 0.3},
        "production": {"brand_score": 0.6, "prompt_adherence": 0.9, "heldout_denoise_loss": 0.2},
        "candidate": {"brand_score": 0.8, "prompt_adherence": 0.7, "heldout_denoise_loss": 0.3},
    }
    decision = check_gate(figures("production", **scores), POLICY)
    # Better brand_score than production (not base), but adherence dropped by 0.2.
    assert decision.metric == "brand_score" and decision.improvement == pytest.approx(0.2)
    assert decision.adherence_drop == pytest.approx(0.2) and not decision.passed
    assert "prompt adherence" in decision.summary()
    lenient = PromotionPolicy(min_improvement=0.05, max_adherence_drop=0.25)
    assert check_gate(figures("production", **scores), lenient).passed


def test_unevaluated_passes_and_nothing_measured_fails() -> None:
    assert check_gate(None, POLICY).passed and not check_gate(None, POLICY).evaluated
    empty = check_gate(figures(base={}, candidate={}), POLICY)
    assert not empty.passed and "nothing to compare" in empty.summary()


def test_figures_and_policy_round_trip_through_tags() -> None:
    f = figures(
        "production",
        base={"heldout_denoise_loss": 0.25},
        candidate={"heldout_denoise_loss": 0.125, "brand_score": 0.75},
    )
    f = EvalFigures(f.scores, f.reference, production_version=3, prompts=4, heldout_images=2)
    back = EvalFigures.from_tags({**f.to_tags(), "eval.gate": "pass", "job_id": "x"})
    assert back == f
    assert EvalFigures.from_tags({"job_id": "x"}) is None
    policy = PromotionPolicy(min_improvement=-0.5, max_adherence_drop=0.0, auto_promote=True)
    assert PromotionPolicy.from_tags(policy.to_tags(), POLICY) == policy
    # A hand-edited, unreadable tag falls back to the default.
    assert PromotionPolicy.from_tags({"policy.min_improvement": "lots"}, POLICY) == POLICY
